"""The native kernels' fp32 path (csrc/vec.h: AVX2 + FMA on x86-64, NEON on ARM64): fp32 activations
and KV cache, bf16 / int8 / int4 weights. Each kernel against an fp32 (or fp64) reference, rows
independent of the row count, the one-call decoder's bits against the modules', the engine's
greedy tokens against the reference generator, and how the path is chosen and refused.

The path is forced (HEARTH_NATIVE_ISA) to the one this machine's architecture has, so an AVX-512
machine tests its AVX2 code too; where the CPU runs neither (no AVX2, not ARM64) the tests skip.
The NEON code is also checked under qemu on x86 (tests/test_native_neon.py)."""

import logging

import pytest
import torch
import torch.nn.functional as F

from model import native
from model.quant_kernels import quantize_int4, quantize_int8, unpack_nibbles
from test_native import assert_native_decoder_matches_the_modules, run_rows  # the same steps, in fp32 here

FP32_PATHS = ("avx2", "neon")


@pytest.fixture(autouse=True)
def fp32_path(monkeypatch):
    """Force the fp32 path of this machine's architecture; the default selection comes back after."""
    runnable = [name for name in FP32_PATHS if name in native.runnable_isas()]
    if not runnable:
        pytest.skip(f"the CPU runs no fp32 native path (runnable: {native.runnable_isas() or 'none'})")
    monkeypatch.setenv("HEARTH_NATIVE_ISA", runnable[0])
    native.forget_kernels()
    assert native.activation_dtype() == torch.float32, "the forced fp32 path did not load (see the log)"
    yield runnable[0]
    native.forget_kernels()


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def bf16_values(*shape, seed=0):
    """fp32 numbers that are bf16 values (a bf16 checkpoint's weights loaded as fp32)."""
    return randn(*shape, seed=seed).to(torch.bfloat16).float()


def assert_close_to_fp64(out, x, weight):
    """An fp32 sum of K products: error within a few fp32 ulps of sum |x w|."""
    expected = x.double() @ weight.double().T
    bound = (x.double().abs() @ weight.double().abs().T) * (x.shape[-1] * 2**-23) + 1e-30
    assert out.dtype == torch.float32 and ((out.double() - expected).abs() <= bound).all()


SHAPES = [(37, 40), (64, 64), (130, 3072), (8, 2), (33, 7)]  # tails in N (not 32) and K (odd)


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_bf16_weight_linear_matches_fp64(out_features, in_features, rows):
    weight, x = bf16_values(out_features, in_features), randn(rows, in_features, seed=1)
    out = native.linear_bf16(x, native.pack_bf16_weight(weight), out_features)
    assert out.shape == (rows, out_features)
    assert_close_to_fp64(out, x, weight)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-g32", "int4-g32", "int4-g128"])
def test_rows_do_not_depend_on_the_row_count(kind):
    """Each row alone equals the same row among up to 70 others: batch invariance by construction."""
    out_features, in_features = 70, 256
    run = linear_of_kind(kind, out_features, in_features)
    x = randn(70, in_features, seed=1)
    alone = torch.cat([run(x[i:i + 1]) for i in range(70)])
    for rows in (2, 3, 4, 5, 8, 17, 70):
        assert torch.equal(run(x[:rows]), alone[:rows]), rows


def linear_of_kind(kind, out_features, in_features):
    weight = bf16_values(out_features, in_features, seed=2)
    if kind == "bf16":
        packed = native.pack_bf16_weight(weight)
        return lambda x: native.linear_bf16(x, packed, out_features)
    method, _, group = kind.partition("-g")
    group_size = int(group) if group else None
    if method == "int8":
        quantized = quantize_int8(weight, group_size)
        packed = native.pack_int8_weight(quantized.data, quantized.scales)
        return lambda x: native.linear_int8(x, packed, out_features, group_size or 0)
    quantized = quantize_int4(weight, group_size)
    packed = native.pack_int4_weight(unpack_nibbles(quantized.data), quantized.scales, quantized.zeros)
    return lambda x: native.linear_int4(x, packed, out_features, group_size)


@pytest.mark.parametrize("group_size", [None, 2, 32])
@pytest.mark.parametrize("out_features,in_features,rows", [(37, 64, 1), (130, 3072, 4), (33, 96, 9)])
def test_int8_linear_matches_fp64(group_size, out_features, in_features, rows):
    quantized = quantize_int8(randn(out_features, in_features, seed=3), group_size)
    x = randn(rows, in_features, seed=4)
    out = native.linear_int8(x, native.pack_int8_weight(quantized.data, quantized.scales), out_features,
                             group_size or 0)
    assert_close_to_fp64(out, x, quantized.dequantize(torch.float64))


@pytest.mark.parametrize("group_size", [32, 64, 256])
@pytest.mark.parametrize("out_features,in_features,rows", [(37, 256, 1), (130, 3072, 4), (33, 512, 9)])
def test_int4_linear_matches_fp64(group_size, out_features, in_features, rows):
    """W = (q - 8) * scale + zero: the kernel sums scale * sum(x q) + (zero - 8 scale) * sum(x) per
    group, so its error scales with sum |x| |scale|, not only with sum |x w|."""
    quantized = quantize_int4(randn(out_features, in_features, seed=5), group_size)
    x = randn(rows, in_features, seed=6)
    packed = native.pack_int4_weight(unpack_nibbles(quantized.data), quantized.scales, quantized.zeros)
    out = native.linear_int4(x, packed, out_features, group_size)
    weight = quantized.dequantize(torch.float64)
    expected = x.double() @ weight.T
    scale_bound = 16 * (x.double().abs() @ weight.abs().T + 1e-3) * in_features * 2**-23
    assert ((out.double() - expected).abs() <= scale_bound).all()


def test_odd_widths_and_bad_group_sizes_are_refused_with_a_reason():
    quantized = quantize_int4(randn(32, 96), 32)
    packed = native.pack_int4_weight(unpack_nibbles(quantized.data), quantized.scales, quantized.zeros)
    with pytest.raises(ValueError, match="group size 48"):
        native.linear_int4(randn(1, 96), packed, 32, 48)
    int8 = quantize_int8(randn(8, 64), 32)
    with pytest.raises(ValueError, match="group size 3"):
        native.linear_int8(randn(1, 64), native.pack_int8_weight(int8.data, int8.scales), 8, 3)


def test_packed_linear_takes_bf16_valued_fp32_weights_and_leaves_true_fp32_ones():
    from server.engine.cpu_fast import PackedLinear, is_plain_bf16_linear

    bf16_valued, true_fp32 = (torch.nn.Linear(64, 40, bias=False) for _ in range(2))
    with torch.no_grad():
        bf16_valued.weight.copy_(bf16_values(40, 64))
        true_fp32.weight.copy_(randn(40, 64) + 1e-4)
    assert is_plain_bf16_linear(bf16_valued) and not is_plain_bf16_linear(true_fp32)
    packed, x = PackedLinear(bf16_valued), randn(3, 64)
    assert packed.kernel == "native"
    assert_close_to_fp64(packed(x), x, bf16_valued.weight.detach())


# ----------------------------------------------------------------------------- attention, rotary, norm


def paged_setup(num_heads=4, num_kv_heads=2, head_dim=32, block_size=4, num_blocks=40, seed=0):
    """A layer's fp32 cache [KV, slots, hd] with random contents, and two shuffled block tables."""
    keys, values = randn(num_kv_heads, num_blocks * block_size, head_dim, seed=seed), randn(
        num_kv_heads, num_blocks * block_size, head_dim, seed=seed + 1)
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    return keys, values, [order[:18].tolist(), order[18:36].tolist()]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 32), (4, 4, 8), (3, 1, 64)])
def test_paged_attention_matches_dense_fp64(num_heads, num_kv_heads, head_dim):
    block_size, scale = 4, head_dim ** -0.5
    keys, values, tables = paged_setup(num_heads, num_kv_heads, head_dim, block_size)
    rows = [(tables[0], 0), (tables[1], 70), (tables[0], 33), (tables[1], 5), (tables[0], 6)]
    q = randn(len(rows), num_heads, head_dim, seed=3)
    out = run_rows(q, keys, values, rows, block_size, scale)
    for row, (table, position) in enumerate(rows):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(position + 1)])
        k, v = keys[:, slots].double(), values[:, slots].double()  # [KV, T, hd]
        group = num_heads // num_kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        probs = torch.softmax((q[row].double()[:, None] * k).sum(-1) * scale, dim=-1)  # [H, T]
        expected = (probs[..., None] * v).sum(1)
        assert (out[row].double() - expected).abs().max() <= 1e-5


def test_paged_attention_rows_are_the_same_in_a_prefill_and_a_decode():
    keys, values, tables = paged_setup()
    q = randn(30, 4, 32, seed=4)
    chunk = run_rows(q, keys, values, [(tables[0], p) for p in range(30)], 4, 0.2)
    for position in (0, 7, 29):
        alone = run_rows(q[position:position + 1], keys, values, [(tables[0], position)], 4, 0.2)
        assert torch.equal(alone[0], chunk[position])


def test_rope_gives_apply_ropes_fp32_bits_and_writes_k_and_v_to_their_slots():
    from model.config import ModelConfig
    from model.decoder import Transformer, apply_rope

    heads, kv_heads, head_dim, rows = 4, 2, 32, 6
    config = ModelConfig(dim=heads * head_dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, ffn_dim=64, vocab_size=16)
    cos, sin = Transformer(config).rope(torch.tensor([[0, 5, 6, 7, 300, 41]]))
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, seed=8)
    by_head = qkv.view(rows, heads + 2 * kv_heads, head_dim)
    expected = apply_rope(by_head[:, :heads + kv_heads].transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    keys, values = torch.zeros(2, kv_heads, 40, head_dim)
    slots = torch.tensor([3, 9, 10, 11, 39, 0])
    rotated = qkv.clone()
    native.rope_write_kv(rotated, cos[0, 0].contiguous(), sin[0, 0].contiguous(), heads, kv_heads, keys, values, slots)
    rotated = rotated.view(rows, heads + 2 * kv_heads, head_dim)
    assert torch.equal(rotated[:, :heads + kv_heads], expected)
    assert torch.equal(keys[:, slots], rotated[:, heads:heads + kv_heads].transpose(0, 1))
    assert torch.equal(values[:, slots], by_head[:, heads + kv_heads:].transpose(0, 1))


def test_rms_norm_and_swiglu_match_the_modules_within_fp32_rounding():
    from model.decoder import RMSNorm
    from server.engine.cpu_fast import NativeRMSNorm, can_use_native_norm

    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(96, seed=6))
    x = randn(2, 5, 96, seed=7) * 3
    assert can_use_native_norm(norm)
    fast, expected = NativeRMSNorm(norm)(x), norm(x)
    assert fast.shape == expected.shape and torch.allclose(fast, expected, rtol=1e-6, atol=1e-7)
    gate_up = randn(7, 2 * 40, seed=9) * 30  # gates well into both tails of the sigmoid
    gate, up = gate_up.split(40, dim=-1)
    assert torch.allclose(native.silu_mul(gate_up, 40), F.silu(gate) * up, rtol=2e-6, atol=1e-30)


# ----------------------------------------------------------------------------- the decoder and the engine


def bf16_valued_tiny_model(tokenizer, seed: int):
    """The tiny model with large weights (silu, softmax and the norms see varied inputs), its
    weights rounded to bf16 values but kept in fp32: a bf16 checkpoint as the fp32 path loads it."""
    from conftest import make_tiny_model

    model = make_tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((param if name.endswith("norm.weight") else param * 15).to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_native_decoder_gives_the_modules_bits(tokenizer, seed):
    assert_native_decoder_matches_the_modules(bf16_valued_tiny_model(tokenizer, seed), seed, torch.float32)


def test_native_decoder_takes_int8_and_int4_layers(tokenizer, tmp_path):
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.quant import quantize_checkpoint

    save_checkpoint(tmp_path / "bf16", bf16_valued_tiny_model(tokenizer, 0).to(torch.bfloat16), tokenizer)
    for method, group_size in (("int8", None), ("int8", 32), ("int4", 32)):
        folder = quantize_checkpoint(tmp_path / "bf16", tmp_path / f"{method}-{group_size}", method, group_size).out
        assert_native_decoder_matches_the_modules(load_checkpoint(folder, dtype=torch.float32).model, 0, torch.float32)


def test_engine_dtype_auto_is_fp32_here_and_greedy_tokens_match_the_reference(tokenizer, tmp_path):
    """A bf16 checkpoint served with dtype auto: fp32 activations and cache, bf16-packed weights, the
    one-call decoder; greedy tokens equal the reference generator's in fp32 (the same weights and
    math up to the order of the sums: a step may differ only where the top two logits nearly tie)."""
    import asyncio

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.generate import GenerationSettings, generate
    from server.engine import Engine, EngineConfig
    from server.engine.types import GenerationRequest, SamplingParams

    save_checkpoint(tmp_path / "bf16", bf16_valued_tiny_model(tokenizer, 3).to(torch.bfloat16), tokenizer)
    engine = Engine.from_checkpoint(tmp_path / "bf16", EngineConfig(device="cpu", kv_cache_blocks=64))
    engine.start()
    reference = load_checkpoint(tmp_path / "bf16", dtype=torch.float32).model
    try:
        assert engine.worker.cache.keys.dtype == torch.float32 and engine.worker.native_decoder is not None
        for prompt in ("The king", "Once upon a time there was", "a"):
            ids = tokenizer.encode(prompt)

            async def run():
                tokens = []
                params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
                async for output in engine.generate(GenerationRequest(prompt, ids, params)):
                    tokens += [t for delta in output.deltas for t in delta.token_ids]
                return tokens

            served = asyncio.run(run())
            expected = list(generate(reference, ids, GenerationSettings(max_tokens=24, temperature=0.0)))
            assert_same_tokens_but_near_ties(reference, ids, served, expected)
    finally:
        engine.shutdown()


def assert_same_tokens_but_near_ties(model, prompt, served, expected):
    """Equal token for token, except that from the first step where the reference's top two logits are
    within 1e-4 of each other the two may part (a different fp32 sum order may pick the other)."""
    for step, (got, want) in enumerate(zip(served, expected)):
        if got == want:
            continue
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + expected[:step]]))[0, -1]
        top = logits.topk(2).values
        assert (top[0] - top[1]).item() < 1e-4, f"step {step}: {got} != {want}, logit gap {top[0] - top[1]}"
        return


# ----------------------------------------------------------------------------- choosing the path


def test_a_forced_path_the_cpu_cannot_run_is_refused_in_one_line(monkeypatch, caplog):
    other = "neon" if native.platform.machine() in native.X86 else "avx2"
    monkeypatch.setenv("HEARTH_NATIVE_ISA", other)
    native.forget_kernels()
    with caplog.at_level(logging.WARNING, logger="hearth.native"):
        assert native.selected_isa() is None and native.linear_bf16_kernel() is None
    message = next(r.getMessage() for r in caplog.records if r.name == "hearth.native")
    assert other in message and "\n" not in message


def test_an_unknown_path_is_refused_and_off_turns_them_off(monkeypatch, caplog):
    for value, expected in (("avx1024", "is not one of"), ("off", "off")):
        monkeypatch.setenv("HEARTH_NATIVE_ISA", value)
        native.forget_kernels()
        with caplog.at_level(logging.INFO, logger="hearth.native"):
            assert native.selected_isa() is None and native.activation_dtype() is None
        assert expected in caplog.text


def test_a_path_that_fails_its_self_check_is_not_used(monkeypatch, caplog):
    """Wrong output from the compiled kernels (a broken compiler, a CPU bug): PyTorch's kernels, one line."""
    monkeypatch.setattr(native, "pack_bf16_weight", lambda weight, isa=None: torch.zeros(4096, dtype=torch.int32))
    native.forget_kernels()
    with caplog.at_level(logging.WARNING, logger="hearth.native"):
        assert native.selected_isa() is None
    assert "self-check" in caplog.text


def test_every_path_of_the_architecture_builds_under_its_own_name(tmp_path, monkeypatch):
    """What the Docker image does at build time: all x86 paths (or the ARM one), each its own file."""
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    libraries = native.build_all()
    names = {path.name.split("-")[-2] for path in libraries}
    expected = {name for name, isa in native.ISAS.items() if native.platform.machine() in isa.machines}
    assert names == expected and all(path.is_file() for path in libraries)


def test_an_all_native_worker_pads_no_rows(tokenizer):
    """MKL's fp32 GEMM needs decode rows padded to 4 for batch invariance; the native kernels do not,
    so a one-row decode step computes one row."""
    from server.engine.worker import ModelWorker

    worker = ModelWorker(bf16_valued_tiny_model(tokenizer, 0), 16, 16)
    assert worker.native_decoder is not None and worker.row_multiple == 1 and worker.padded(1) == 1


def test_the_native_fp32_engine_is_batch_invariant(tokenizer, tmp_path):
    """A request's greedy tokens and logprobs alone equal the same request among five others, with
    nothing padded (the all-native worker) and prompt chunks mixed with decodes."""
    import asyncio

    from model.checkpoint import save_checkpoint
    from server.engine import Engine, EngineConfig
    from server.engine.types import GenerationRequest, SamplingParams

    save_checkpoint(tmp_path / "bf16", bf16_valued_tiny_model(tokenizer, 4).to(torch.bfloat16), tokenizer)
    engine = Engine.from_checkpoint(tmp_path / "bf16", EngineConfig(device="cpu", kv_cache_blocks=96,
                                                                    max_num_seqs=8, max_num_batched_tokens=24,
                                                                    enable_prefix_caching=False))
    engine.start()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)
    texts = ["The king", "Once upon a time", "a b c d e f g h i j k", "To be or not", "Hello", "What light"]
    prompts = [tokenizer.encode(text) for text in texts]

    async def run(request_id, prompt):
        tokens, logprobs = [], []
        async for output in engine.generate(GenerationRequest(request_id, prompt, params)):
            for delta in output.deltas:
                tokens += delta.token_ids
                logprobs += [entry.logprob for entry in delta.logprobs or []]
        return tokens, logprobs

    async def crowded():
        return await asyncio.gather(*(run(f"crowd-{i}", p) for i, p in enumerate(prompts)))

    try:
        assert engine.worker.row_multiple == 1
        alone = asyncio.run(run("alone", prompts[0]))
        assert asyncio.run(crowded())[0] == alone
    finally:
        engine.shutdown()


@pytest.mark.parametrize("method,group_size", [("int8", 32), ("int8", None), ("int4", 32)])
def test_a_head_tied_to_a_quantized_embedding_reads_its_codes(tokenizer, tmp_path, method, group_size):
    """GGUF files store token_embd quantized and tie the LM head to it: the engine's head is the native
    kernel over the embedding's codes (not the fp32 table the lookup uses), with the same logits up
    to the sum order."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.quant import quantize_checkpoint
    from server.engine.cpu_fast import PackedInt4Linear, PackedInt8Linear, pack_model

    save_checkpoint(tmp_path / "bf16", bf16_valued_tiny_model(tokenizer, 5).to(torch.bfloat16), tokenizer)
    folder = quantize_checkpoint(tmp_path / "bf16", tmp_path / "q", method, group_size).out
    plain = load_checkpoint(folder, dtype=torch.float32).model
    packed = load_checkpoint(folder, dtype=torch.float32).model
    assert plain.config.tie_embeddings and packed.lm_head.weight is packed.embed.weight
    pack_model(packed)
    assert type(packed.lm_head) is (PackedInt8Linear if method == "int8" else PackedInt4Linear)
    hidden = randn(5, plain.config.dim, seed=11)
    with torch.inference_mode():
        expected, got = plain.lm_head(hidden), packed.lm_head(hidden)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
