"""Weight quantization: error bounds, packed kernels vs the dequantize reference,
checkpoint round trips, and the refusals."""

import asyncio
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import CheckpointError
from model.generate import GenerationSettings, generate
from model.quant import QuantizationError, QuantizedLinear, quantize_checkpoint
from model.quant_kernels import (
    QuantizedWeight,
    make_matmul,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    reference_matmul,
    unpack_nibbles,
)
from tests.conftest import FIXTURES, make_tiny_model
from cli.main import main


def random_weight(out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    weight[3] *= 40  # an outlier row: per-channel scales must cope
    return weight


# ---------------------------------------------------------------- formats


def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (6, 5) and torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # low nibble = even column


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_error_is_at_most_half_a_step(group_size):
    weight = random_weight(48, 128)
    quantized = quantize_int8(weight, group_size)
    assert quantized.data.dtype == torch.int8 and quantized.scales.dtype == torch.bfloat16
    assert quantized.scales.shape == ((48,) if group_size is None else (48, 4))
    error = (quantized.dequantize() - weight).abs()
    step = quantized.scales.float()
    step = step[:, None] if group_size is None else step.repeat_interleave(group_size, dim=1)
    assert (error <= 0.5 * step * 1.01 + 1e-8).all()
    assert error.max() < 0.01 * weight.abs().max()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_error_is_at_most_half_a_step(group_size):
    weight = random_weight(48, 128)
    quantized = quantize_int4(weight, group_size)
    assert quantized.data.shape == (48, 64) and quantized.data.dtype == torch.uint8
    assert quantized.scales.shape == quantized.zeros.shape == (48, 128 // group_size)
    error = (quantized.dequantize() - weight).abs()
    step = quantized.scales.float().repeat_interleave(group_size, dim=1)
    assert (error <= 0.5 * step * 1.05 + 1e-8).all()
    # each group's range is covered: its min and max are both within half a step
    grouped = weight.view(48, -1, group_size)
    assert (quantized.scales.float() * 15 >= (grouped.amax(-1) - grouped.amin(-1)) * 0.99).all()


def test_constant_and_zero_rows_stay_finite():
    weight = torch.zeros(16, 64)
    weight[1] = 0.5
    for quantized in (quantize_int8(weight), quantize_int4(weight, 32)):
        restored = quantized.dequantize()
        assert torch.isfinite(restored).all()
        assert torch.allclose(restored, weight, atol=1e-3)


# ---------------------------------------------------------------- kernels vs reference


def assert_matches_reference(weight: QuantizedWeight, kernel: str, rows: int):
    inputs = torch.randn(rows, weight.in_features).to(torch.bfloat16)
    name, matmul = make_matmul(weight, torch.device("cpu"), kernel)
    assert name == kernel
    got = matmul(inputs).float()
    expected = reference_matmul(weight)(inputs.float())  # fp32 dequantize + fp32 matmul
    assert got.shape == expected.shape
    tolerance = 2e-2 * expected.abs().max()  # bf16 output and accumulation order
    assert (got - expected).abs().max() <= tolerance, (kernel, rows)


@pytest.mark.parametrize("rows", [1, 5, 18])
def test_int8_packed_kernel_matches_reference(rows):
    assert_matches_reference(quantize_int8(random_weight(96, 160)), "int8_cpu", rows)


@pytest.mark.parametrize("rows", [1, 5, 18])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_packed_kernel_matches_reference(rows, group_size):
    # 80 outputs: one full 64-wide tile of the CPU kernel plus a 16-wide remainder
    assert_matches_reference(quantize_int4(random_weight(80, 256), group_size), "int4_cpu", rows)


def test_kernel_choice_falls_back_to_reference_where_packed_kernels_cannot_go():
    cpu = torch.device("cpu")
    assert make_matmul(quantize_int8(random_weight(32, 64), 32), cpu)[0] == "reference"  # grouped int8
    assert make_matmul(quantize_int4(random_weight(40, 64), 32), cpu)[0] == "reference"  # 40 % 16 != 0
    assert make_matmul(quantize_int4(random_weight(48, 64), 32), cpu)[0] == "int4_cpu"


@pytest.mark.parametrize("kernel", ["int8_cpu", "int4_cpu"])
def test_packed_kernels_are_batch_invariant(kernel):
    """A row's output does not depend on the rows batched with it (the engine relies on it)."""
    weight = quantize_int8(random_weight(64, 256)) if kernel == "int8_cpu" else quantize_int4(random_weight(64, 256), 32)
    matmul = make_matmul(weight, torch.device("cpu"), kernel)[1]
    inputs = torch.randn(9, 256).to(torch.bfloat16)
    together = matmul(inputs)
    for row in range(9):
        assert torch.equal(matmul(inputs[row : row + 1])[0], together[row])
        assert torch.equal(matmul(inputs[: row + 1])[row], together[row])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_stacked_layers_give_the_same_bits(method):
    quantize = (lambda w: quantize_int8(w)) if method == "int8" else (lambda w: quantize_int4(w, 32))
    layers = [QuantizedLinear.from_weight(quantize(random_weight(rows, 128, seed=rows))) for rows in (64, 32, 32)]
    stacked = QuantizedLinear.stacked(*layers)
    inputs = torch.randn(1, 3, 128, dtype=torch.bfloat16)
    assert torch.equal(stacked(inputs), torch.cat([layer(inputs) for layer in layers], dim=-1))
    with pytest.raises(ValueError, match="same input width"):
        QuantizedLinear.stacked(layers[0], QuantizedLinear.from_weight(quantize(random_weight(32, 64))))


def test_int8_kernel_takes_unaligned_weights():
    """The CPU int8 kernel faults on rows that are not 16-byte aligned: they are copied first."""
    quantized = quantize_int8(random_weight(64, 64))
    backing = torch.empty(64 * 64 + 64, dtype=torch.int8)
    start = (-backing.data_ptr()) % 64 + 8
    unaligned = backing[start : start + 64 * 64].view(64, 64)
    unaligned.copy_(quantized.data)
    quantized.data = unaligned
    assert_matches_reference(quantized, "int8_cpu", 8)


def test_quantized_linear_takes_any_leading_shape_and_dtype():
    layer = QuantizedLinear.from_weight(quantize_int4(random_weight(64, 128), 32))
    inputs = torch.randn(2, 3, 128)
    for dtype in (torch.float32, torch.bfloat16):
        out = layer(inputs.to(dtype))
        assert out.shape == (2, 3, 64) and out.dtype == dtype
    assert layer.kernel_name == "int4_cpu"
    layer.kernel = "reference"
    layer.to(torch.float32)  # moving or casting drops the packed copy
    assert layer.kernel_name is None
    assert torch.allclose(layer(inputs), inputs @ layer.quantized_weight().dequantize().T, atol=1e-5)


# ---------------------------------------------------------------- a trained tiny model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A tiny model trained briefly on Shakespeare (plain AdamW), its checkpoint and held-out tokens."""
    torch.manual_seed(0)
    ids = torch.tensor(tokenizer.encode((FIXTURES / "shakespeare_sample.txt").read_text()))
    split = int(len(ids) * 0.9)
    train, held_out = ids[:split], ids[split:]
    model = make_tiny_model(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    seq_len, batch = 64, 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and 20x faster on a busy machine
    for _ in range(120):
        starts = torch.randint(0, len(train) - seq_len - 1, (batch,)).tolist()
        inputs = torch.stack([train[s : s + seq_len] for s in starts])
        targets = torch.stack([train[s + 1 : s + seq_len + 1] for s in starts])
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.eval()
    path = tmp_path_factory.mktemp("trained") / "fp32"
    save_checkpoint(path, model, tokenizer, model_card="# trained tiny\n")
    return model, path, held_out


def perplexity(model, tokens, seq_len=64):
    windows = (len(tokens) - 1) // seq_len
    inputs = tokens[: windows * seq_len].view(windows, seq_len)
    targets = tokens[1 : windows * seq_len + 1].view(windows, seq_len)
    with torch.no_grad():
        return math.exp(F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten()).item())


def logits_cosine(reference, model, tokens):
    """The smallest per-position cosine between two models' logits."""
    with torch.no_grad():
        return F.cosine_similarity(model(tokens).float()[0], reference(tokens)[0], dim=-1).min().item()


def test_int8_logits_close_to_full_precision(trained, tmp_path):
    model, path, held_out = trained
    quantize_checkpoint(path, tmp_path / "int8", "int8")
    quantized = load_checkpoint(tmp_path / "int8").model
    assert quantized.layers[0].mlp.down.weight_int8.dtype == torch.int8
    assert logits_cosine(model, quantized, held_out[None, :256]) >= 0.99
    assert perplexity(quantized, held_out) <= perplexity(model, held_out) * 1.01
    assert quantized.layers[0].attn.q.kernel_name == "int8_cpu"


def test_int4_logits_close_to_full_precision(trained, tmp_path):
    model, path, held_out = trained
    quantize_checkpoint(path, tmp_path / "int4", "int4", 32)
    quantized = load_checkpoint(tmp_path / "int4").model
    assert logits_cosine(model, quantized, held_out[None, :256]) >= 0.97
    assert perplexity(quantized, held_out) <= perplexity(model, held_out) * 1.10
    assert quantized.layers[0].mlp.gate.kernel_name == "int4_cpu"


def test_round_trip_config_and_tensors(trained, tmp_path):
    """What is written is what loads: same tensors, metadata naming every module, a readable safetensors file."""
    model, path, _ = trained
    report = quantize_checkpoint(path, tmp_path / "q", "int4", 32, skip=[])
    metadata = json.loads((tmp_path / "q" / "config.json").read_text())
    quant = metadata["quantization"]
    assert quant["method"] == "int4" and quant["group_size"] == 32 and metadata["dtype"] == "bfloat16"
    assert set(quant["modules"]) == {"embed"} | {f"layers.{i}.{m}" for i in range(2) for m in
                                                  ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")}
    assert quant["modules"]["layers.1.mlp.down"] == {"method": "int4", "group_size": 32}
    assert report.num_quantized == 15 and report.kept == []
    assert "Quantized with `hearth quantize --method int4`" in (tmp_path / "q" / "README.md").read_text()

    loaded = load_checkpoint(tmp_path / "q").model
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as stored:  # a standard file
        for name in ("layers.0.attn.q.weight_int4", "layers.0.attn.q.scales", "layers.0.attn.q.zeros"):
            assert torch.equal(stored.get_tensor(name), loaded.state_dict()[name])
        assert stored.get_tensor("norm.weight").dtype == torch.bfloat16
        embed = QuantizedWeight("int4", stored.get_tensor("embed.weight_int4"), stored.get_tensor("embed.scales"),
                                stored.get_tensor("embed.zeros"), 64)
    # the embedding is dequantized at load, and the tied LM head is that same tensor
    assert torch.equal(loaded.embed.weight, embed.dequantize(torch.bfloat16))
    assert loaded.lm_head.weight is loaded.embed.weight
    # weights are read in place from the mapping, 64-byte aligned
    assert loaded.layers[0].attn.q.weight_int4.data_ptr() % 64 == 0


def test_int8_weights_are_used_in_place_from_the_file(trained, tmp_path):
    _, path, _ = trained
    quantize_checkpoint(path, tmp_path / "q", "int8")
    layer = load_checkpoint(tmp_path / "q").model.layers[1].mlp.up
    file_size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert layer.weight_int8.untyped_storage().nbytes() == file_size  # a view into the mapping
    layer(torch.randn(1, 4, 64, dtype=torch.bfloat16))
    assert layer.weight_int8.data_ptr() % 64 == 0 and layer.kernel_name == "int8_cpu"


def test_fp32_body_and_reference_generator_work_on_quantized_checkpoints(trained, tmp_path):
    _, path, _ = trained
    quantize_checkpoint(path, tmp_path / "q", "int8")
    checkpoint = load_checkpoint(tmp_path / "q", dtype=torch.float32)
    assert checkpoint.model(torch.tensor([[1, 2, 3]])).dtype == torch.float32
    bf16_model = load_checkpoint(tmp_path / "q").model
    prompt = checkpoint.tokenizer.encode("ROMEO:", add_bos=True)
    greedy = GenerationSettings(max_tokens=12, temperature=0)
    tokens = list(generate(bf16_model, prompt, greedy))
    assert len(tokens) == 12
    assert tokens == list(generate(bf16_model, prompt, greedy))  # deterministic through the KV cache


@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32)])
def test_engine_serves_quantized_checkpoints(trained, tmp_path, method, group_size):
    """The serving engine (bf16, paged cache, batching) gives the reference generator's greedy tokens."""
    from server.engine.engine import Engine, EngineConfig
    from server.engine.types import GenerationRequest, SamplingParams

    _, path, _ = trained
    quantize_checkpoint(path, tmp_path / "q", method, group_size)
    model = load_checkpoint(tmp_path / "q").model
    tokenizer = load_checkpoint(tmp_path / "q").tokenizer
    prompts = [tokenizer.encode(text, add_bos=True) for text in ("ROMEO:", "To be, or not", "What light through")]

    async def greedy(engine, index, prompt):
        request = GenerationRequest(f"r{index}", prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        return [t async for output in engine.generate(request) for delta in output.deltas for t in delta.token_ids]

    async def serve_all(engine):
        return await asyncio.gather(*(greedy(engine, i, p) for i, p in enumerate(prompts)))

    engine = Engine.from_checkpoint(tmp_path / "q", EngineConfig(dtype="bfloat16", max_num_seqs=4))
    engine.start()
    try:
        served = asyncio.run(serve_all(engine))
    finally:
        engine.shutdown()
    for prompt, tokens in zip(prompts, served):
        assert_greedy_matches_reference_up_to_ties(model, prompt, tokens)


def assert_greedy_matches_reference_up_to_ties(model, prompt, tokens, tolerance=0.05):
    """The engine's own kernels sum in other orders than the reference model's, so in bf16 a greedy
    choice may differ where the reference's top two logits are within rounding of each other. Anywhere
    else the tokens must be the reference's."""
    reference = list(generate(model, prompt, GenerationSettings(max_tokens=len(tokens), temperature=0)))
    if tokens == reference:
        return
    first = next(i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + reference[:first]]))[0, -1].float()
    gap = float(logits[reference[first]] - logits[tokens[first]])
    assert gap < tolerance, f"token {first}: {tokens[first]} instead of {reference[first]}, logit gap {gap:.3f}"


def test_sizes_on_disk(trained, tmp_path):
    _, path, _ = trained
    full = (path / "model.safetensors").stat().st_size
    int8 = quantize_checkpoint(path, tmp_path / "int8", "int8").out_bytes  # the defaults: everything quantized
    int4 = quantize_checkpoint(path, tmp_path / "int4", "int4", 32).out_bytes
    assert int8 <= 0.30 * full and int4 <= 0.18 * full


# ---------------------------------------------------------------- CLI and refusals


def test_cli_quantize_then_eval(trained, tmp_path, capsys):
    _, path, held_out = trained
    out = tmp_path / "cli-int8"
    assert main(["quantize", str(path), "--method", "int8", "--skip", "embed", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "quantized 14 modules" in printed and "kept in bfloat16: embed" in printed
    text = tmp_path / "held_out.txt"
    text.write_text((FIXTURES / "shakespeare_sample.txt").read_text()[-3000:])
    assert main(["eval", str(out), "--data", str(text)]) == 0
    assert main(["eval", str(path), "--data", str(text)]) == 0
    quantized_result, full_result = split_json_objects(capsys.readouterr().out)
    assert quantized_result["perplexity"] == pytest.approx(full_result["perplexity"], rel=0.02)


def split_json_objects(text):
    decoder, index, objects = json.JSONDecoder(), 0, []
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        value, index = decoder.raw_decode(text, index)
        objects.append(value)
    return objects


def test_quantizing_a_quantized_checkpoint_is_refused(trained, tmp_path, capsys):
    _, path, _ = trained
    quantize_checkpoint(path, tmp_path / "q", "int8")
    assert main(["quantize", str(tmp_path / "q"), "--method", "int4", "--out", str(tmp_path / "qq")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "already quantized (int8" in error and error.count("\n") == 1
    assert not (tmp_path / "qq").exists()


def test_group_size_that_does_not_divide_is_refused_naming_the_layer(tokenizer, tmp_path):
    # dim 64 takes groups of 64, but the input of mlp.down (ffn_dim 160) does not
    save_checkpoint(tmp_path / "fp", make_tiny_model(tokenizer, ffn_dim=160), tokenizer)
    with pytest.raises(QuantizationError, match=r"layers\.0\.mlp\.down: group size 64 does not divide its input dimension 160"):
        quantize_checkpoint(tmp_path / "fp", tmp_path / "q", "int4", 64)
    assert main(["quantize", str(tmp_path / "fp"), "--method", "int8", "--group-size", "64", "--out", str(tmp_path / "q")]) == 1
    assert not (tmp_path / "q").exists()
    quantize_checkpoint(tmp_path / "fp", tmp_path / "q", "int4", 32)  # 32 divides both


def test_other_refusals(trained, tmp_path):
    _, path, _ = trained
    with pytest.raises(QuantizationError, match="--skip: no module named 'mlp.nope'"):
        quantize_checkpoint(path, tmp_path / "q", "int8", skip=["mlp.nope"])
    with pytest.raises(QuantizationError, match="is the source folder"):
        quantize_checkpoint(path, path, "int8")
    with pytest.raises(QuantizationError, match="int4 needs a --group-size"):
        quantize_checkpoint(path, tmp_path / "q", "int4", None)
    with pytest.raises(QuantizationError, match="--group-size must be one of"):
        quantize_checkpoint(path, tmp_path / "q", "int8", 48)


def test_skip_keeps_layers_in_bf16(trained, tmp_path):
    _, path, _ = trained
    report = quantize_checkpoint(path, tmp_path / "q", "int8", skip=["layers.1", "embed"])
    assert report.num_quantized == 7 and "layers.1.mlp.down" in report.kept
    model = load_checkpoint(tmp_path / "q").model
    assert isinstance(model.layers[0].mlp.down, QuantizedLinear)
    assert model.layers[1].mlp.down.weight.dtype == torch.bfloat16


def test_bad_quantization_metadata_is_a_clear_checkpoint_error(trained, tmp_path):
    _, path, _ = trained
    quantize_checkpoint(path, tmp_path / "q", "int8")
    config_file = tmp_path / "q" / "config.json"
    metadata = json.loads(config_file.read_text())
    metadata["quantization"]["modules"]["layers.0.attn.q"] = {"method": "int3", "group_size": None}
    config_file.write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"config.json: quantization.modules.layers.0.attn.q: method must be"):
        load_checkpoint(tmp_path / "q")
    metadata["quantization"]["modules"] = {"layers.0.attn_norm": {"method": "int8", "group_size": None}}
    config_file.write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="not a bias-free linear layer or embedding"):
        load_checkpoint(tmp_path / "q")
