"""LoRA adapters per request: exactness against merged checkpoints, batch invariance with base and
other-adapter rows, prefix cache per adapter, checks at load, and the HTTP routes."""

from __future__ import annotations

import asyncio
import json
import platform
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_model
from model import native
from model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from model.generate import GenerationSettings, generate
from server.engine import Engine, EngineConfig
from server.engine.lora import ServingAdapter, read_serving_adapter
from server.engine.types import AdapterBusyError, GenerationRequest, SamplingParams, UnknownAdapterError
from trainer.lora import AdapterError, LoRAConfig, apply_lora, lora_modules, save_adapter
from trainer.sft import merge_adapter_folder

GREEDY = SamplingParams(max_tokens=20, temperature=0, logprobs=2)
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# --- adapters made in the test ----------------------------------------------------------------


def hearth_adapter(base: Path, out: Path, tokenizer, rank: int, targets, seed: int) -> Path:
    """A Hearth adapter (trainer code) with random non-zero B, large enough to change greedy tokens."""
    checkpoint = load_checkpoint(base)
    config = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=tuple(targets))
    apply_lora(checkpoint.model, config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(checkpoint.model).values():
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=generator) * 0.3)
    return save_adapter(out, checkpoint.model, config, base, checkpoint.metadata)


def peft_adapter(base: Path, out: Path, rank: int, alpha: float, seed: int, merged_out: Path | None = None,
                 **extra_config) -> Path:
    """A PEFT-format folder (Hugging Face names) with random A and B; optionally the merged checkpoint too."""
    checkpoint = load_checkpoint(base)
    model, generator = checkpoint.model, torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, block in enumerate(model.layers):
        for target in ("q", "v", "down"):
            linear = getattr(block.attn if target in "qkvo" else block.mlp, target)
            a = torch.randn(rank, linear.in_features, generator=generator) * 0.3
            b = torch.randn(linear.out_features, rank, generator=generator) * 0.3
            prefix = f"base_model.model.model.layers.{layer}.{HF_NAMES[target]}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            with torch.no_grad():
                linear.weight += (alpha / rank) * (b @ a)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none", "base_model_name_or_path": "tiny",
              "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM", **extra_config}
    (out / "adapter_config.json").write_text(json.dumps(config))
    if merged_out is not None:
        save_checkpoint(merged_out, model, checkpoint.tokenizer)
    return out


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, tiny_model_dir, tokenizer):
    root = tmp_path_factory.mktemp("lora")
    weights = root / "weights"
    dirs = {"root": root, "weights": weights}
    dirs["alpha"] = hearth_adapter(tiny_model_dir, weights / "alpha", tokenizer, 4, ("q", "k", "v", "o", "gate", "up", "down"), 1)
    dirs["beta"] = hearth_adapter(tiny_model_dir, weights / "beta", tokenizer, 8, ("o", "up"), 2)
    dirs["alpha_merged"] = merge_adapter_folder(tiny_model_dir, dirs["alpha"], root / "alpha-merged")
    dirs["beta_merged"] = merge_adapter_folder(tiny_model_dir, dirs["beta"], root / "beta-merged")
    dirs["peft"] = peft_adapter(tiny_model_dir, weights / "peft", 4, 8.0, 3, merged_out=root / "peft-merged")
    dirs["peft_merged"] = root / "peft-merged"
    return dirs


def load_adapter(engine: Engine, name: str, folder: Path, base: Path) -> ServingAdapter:
    adapter = read_serving_adapter(name, folder, engine.model_config, base, read_metadata(base),
                                   engine.config.max_lora_rank)
    engine.add_lora(adapter)
    return adapter


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, lora_dirs):
    engine = Engine.from_checkpoint(tiny_model_dir, EngineConfig(dtype="float32", max_num_seqs=16,
                                                                  max_num_batched_tokens=48))
    engine.start()
    for name in ("alpha", "beta", "peft"):
        load_adapter(engine, name, lora_dirs[name], tiny_model_dir)
    yield engine
    engine.shutdown()


def prompts(tokenizer, count):
    words = "to be or not to be that is the question whether tis nobler in the mind to suffer".split() * 12
    return [tokenizer.encode(" ".join(words[i:i + 2 + 7 * i]), add_bos=True) for i in range(count)]


async def collect(engine, request_id, prompt, params, lora=None):
    tokens, logprobs, usage = [], [], None
    async for output in engine.generate(GenerationRequest(request_id, list(prompt), params, lora=lora)):
        for delta in output.deltas:
            tokens += delta.token_ids
            logprobs += [entry.logprob for entry in delta.logprobs or []]
        usage = output.usage or usage
    return tokens, logprobs, usage


def run_all(engine, jobs):
    """jobs: [(prompt, lora)] submitted together -> [(tokens, logprobs, usage)]."""
    async def main():
        return await asyncio.gather(*(collect(engine, f"job-{i}", p, GREEDY, lora) for i, (p, lora) in enumerate(jobs)))
    return asyncio.run(main())


def reference(model_dir: Path, prompt, tokenizer, max_tokens: int = 20) -> list[int]:
    model = load_checkpoint(model_dir).model
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0, stop_ids=tuple(tokenizer.stop_ids))
    return list(generate(model, prompt, settings))


# --- the engine ---------------------------------------------------------------------------------


def test_adapter_greedy_tokens_equal_its_merged_checkpoint(lora_engine, lora_dirs, tiny_model_dir, tokenizer):
    prompt = prompts(tokenizer, 4)[3]
    base_tokens = reference(tiny_model_dir, prompt, tokenizer)
    for name in ("alpha", "beta", "peft"):
        tokens, _, _ = run_all(lora_engine, [(prompt, name)])[0]
        assert tokens == reference(lora_dirs[f"{name}_merged"], prompt, tokenizer), name
        assert tokens != base_tokens, f"{name}: the adapter must change the output for this test to mean anything"
    assert run_all(lora_engine, [(prompt, None)])[0][0] == base_tokens


def test_mixed_batch_equals_each_request_alone(lora_engine, lora_dirs, tiny_model_dir, tokenizer):
    """Batch invariance: tokens and logprobs bit for bit, whatever else (base or other adapters) shares the steps."""
    batch = prompts(tokenizer, 8)
    loras = ["alpha", None, "beta", "alpha", "peft", None, "beta", "alpha"]
    jobs = list(zip(batch, loras))
    alone = [run_all(lora_engine, [job])[0][:2] for job in jobs]
    mixed = [result[:2] for result in run_all(lora_engine, jobs)]
    assert mixed == alone
    merged = {None: tiny_model_dir, "alpha": lora_dirs["alpha_merged"], "beta": lora_dirs["beta_merged"],
              "peft": lora_dirs["peft_merged"]}
    for (prompt, lora), (tokens, _) in zip(jobs[:3], mixed[:3]):
        assert tokens == reference(merged[lora], prompt, tokenizer)


def test_prefix_cache_is_keyed_by_adapter(lora_engine, lora_dirs, tokenizer):
    prompt = prompts(tokenizer, 6)[5]  # 37 words: several full blocks
    run_all(lora_engine, [(prompt, None)])
    tokens, _, usage = run_all(lora_engine, [(prompt, "alpha")])[0]
    assert usage.cached_tokens == 0  # the base's blocks were computed with other weights
    assert tokens == reference(lora_dirs["alpha_merged"], prompt, lora_engine.tokenizer)
    again, _, usage = run_all(lora_engine, [(prompt, "alpha")])[0]
    assert usage.cached_tokens > 0 and again == tokens


def test_unknown_adapter_and_unloading_one_in_use(lora_engine, lora_dirs, tiny_model_dir, tokenizer):
    prompt = prompts(tokenizer, 2)[1]
    with pytest.raises(UnknownAdapterError, match="gamma"):
        run_all(lora_engine, [(prompt, "gamma")])
    with pytest.raises(UnknownAdapterError):
        lora_engine.remove_lora("gamma")

    async def unload_while_running():
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        stream = lora_engine.generate(GenerationRequest("long", list(prompt), params, lora="beta"))
        await stream.__anext__()
        with pytest.raises(AdapterBusyError, match="beta"):
            lora_engine.remove_lora("beta")
        await stream.aclose()  # abort: the pin is released when the engine drops it

    asyncio.run(unload_while_running())
    for _ in range(200):
        try:
            removed = lora_engine.remove_lora("beta")
            break
        except AdapterBusyError:
            time.sleep(0.05)
    assert removed.name == "beta"
    with pytest.raises(UnknownAdapterError):
        run_all(lora_engine, [(prompt, "beta")])
    load_adapter(lora_engine, "beta", lora_dirs["beta"], tiny_model_dir)  # back for the other tests
    assert run_all(lora_engine, [(prompt, "beta")])[0][0] == reference(lora_dirs["beta_merged"], prompt, tokenizer)


# --- checks at load -------------------------------------------------------------------------------


def read(folder, base, max_rank=64):
    config = load_checkpoint(base).model.config
    return read_serving_adapter("x", folder, config, base, read_metadata(base), max_rank)


def test_rank_and_targets_the_engine_cannot_serve_are_refused(lora_dirs, tiny_model_dir, tmp_path):
    with pytest.raises(AdapterError, match="rank 8 is above the engine's limit of 4"):
        read(lora_dirs["beta"], tiny_model_dir, max_rank=4)
    head = peft_adapter(tiny_model_dir, tmp_path / "head", 4, 8.0, 5)
    save_file({**{k: v for k, v in load_safetensors(head).items()},
               "base_model.model.lm_head.lora_A.weight": torch.ones(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.ones(10, 4)}, str(head / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lm_head.lora_A.weight is not a LoRA A/B"):
        read(head, tiny_model_dir)
    dora = peft_adapter(tiny_model_dir, tmp_path / "dora", 4, 8.0, 5, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        read(dora, tiny_model_dir)
    with pytest.raises(AdapterError, match="neither a Hearth adapter .* nor a PEFT LoRA adapter"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
        read(tmp_path / "other", tiny_model_dir)


def load_safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_an_adapter_for_another_base_is_refused_naming_both(lora_dirs, tokenizer, tmp_path):
    other = save_checkpoint(tmp_path / "other-base", make_tiny_model(tokenizer, seed=7), tokenizer)
    with pytest.raises(AdapterError, match=f"trained on .*tiny.*weights of the served base {other}"):
        read(lora_dirs["alpha"], other)
    wider = save_checkpoint(tmp_path / "wider", make_tiny_model(tokenizer, ffn_dim=256), tokenizer)
    with pytest.raises(AdapterError, match=f"trained on .*tiny.*differs from the served base {wider}"):
        read(lora_dirs["alpha"], wider)
    with pytest.raises(AdapterError, match=r"layer 0 down: A \[4, 192\].*expects A \[4, 256\]"):
        read(lora_dirs["peft"], wider)  # PEFT: no fingerprint, the shapes say it


# --- the native delta (csrc/lora_delta.c) against PyTorch ------------------------------------------


def random_adapter(num_layers: int, shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> ServingAdapter:
    generator = torch.Generator().manual_seed(seed)
    weights = {(layer, target): (torch.randn(rank, fan_in, generator=generator),
                                 torch.randn(fan_out, rank, generator=generator))
               for layer in range(num_layers) for target, (fan_in, fan_out) in shapes.items()}
    return ServingAdapter(f"random-{seed}", Path("."), "hearth", rank, 0.75, weights)


def native_delta(x, y, adapters_rows, layer, sites):
    """y + the native deltas of (adapter, rows) pairs on sites [(target, first column)] of `layer`."""
    from server.engine.lora import LoRAStep

    step = LoRAStep(row_multiple=1, num_layers=2, native=True)
    row_adapters = [None] * x.shape[0]
    for adapter, rows in adapters_rows:
        for row in rows:
            row_adapters[row] = adapter
    step.plan(row_adapters, torch.device("cpu"))
    out = y.clone()
    native.lora_add(x, out, step.native_groups, layer,
                    (native.LoRASite * len(sites))(*[native.LoRASite(*site) for site in sites]))
    return out


@pytest.fixture(params=[name for name, isa in native.ISAS.items() if platform.machine() in isa.machines])
def native_path(request, monkeypatch):
    """Each native path this CPU runs, forced in turn (an AVX-512 BF16 machine tests its AVX2 code too)."""
    if request.param not in native.runnable_isas():
        pytest.skip(f"the CPU cannot run the {request.param} path")
    monkeypatch.setenv("HEARTH_NATIVE_ISA", request.param)
    native.forget_kernels()
    assert native.lora_add_kernel() is not None, f"the {request.param} path did not load (see the log)"
    yield request.param
    native.forget_kernels()


def test_native_delta_matches_pytorch_and_leaves_other_rows_alone(native_path):
    """Ranks and widths that are no multiple of 8, two adapters, base rows between: each adapter row gets
    scale * (x @ A.T) @ B.T on its targets' columns (fp64 reference), other rows and columns keep their bits."""
    dtype = native.activation_dtype()
    generator = torch.Generator().manual_seed(0)
    shapes = {"q": (48, 24), "k": (48, 12), "v": (48, 12)}  # a fused qkv of width 48: q 0-24, k 24-36, v 36-48
    first, second = random_adapter(2, shapes, 5, 1), random_adapter(2, {"k": (48, 12)}, 3, 2)
    x = torch.randn(7, 48, generator=generator).to(dtype)
    y = torch.randn(7, 48, generator=generator).to(dtype)
    sites = [(0, 0), (1, 24), (2, 36)]
    out = native_delta(x, y, [(first, [0, 3, 4]), (second, [5])], 1, sites)
    expected = y.double().clone()
    for adapter, rows in ((first, [0, 3, 4]), (second, [5])):
        for (target, column) in zip("qkv", (0, 24, 36)):
            if (1, target) in adapter.weights:
                a, b = adapter.weights[(1, target)]
                delta = adapter.scale * (x[rows].double() @ a.double().T) @ b.double().T
                expected[rows, column:column + b.shape[0]] += delta
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(out[[1, 2, 6]], y[[1, 2, 6]])  # base rows
    assert torch.equal(out[5, :24], y[5, :24]) and torch.equal(out[5, 36:], y[5, 36:])  # `second` only has k


def test_native_delta_of_a_row_does_not_depend_on_its_neighbours(native_path):
    """Batch invariance: a row's result, bit for bit, alone or among 40 rows of the same or other adapters."""
    dtype = native.activation_dtype()
    generator = torch.Generator().manual_seed(1)
    first, second = random_adapter(1, {"down": (96, 40)}, 16, 3), random_adapter(1, {"down": (96, 40)}, 8, 4)
    x = torch.randn(41, 96, generator=generator).to(dtype)
    y = torch.randn(41, 40, generator=generator).to(dtype)
    crowded = native_delta(x, y, [(first, range(0, 41, 2)), (second, range(1, 41, 2))], 0, [(6, 0)])
    for row in (0, 7, 40):
        adapter = first if row % 2 == 0 else second
        alone = native_delta(x[row:row + 1], y[row:row + 1], [(adapter, [0])], 0, [(6, 0)])
        assert torch.equal(alone[0], crowded[row])


def bf16_valued_base(tmp_path, tokenizer) -> Path:
    """A checkpoint whose fp32 weights hold bf16 values: the native kernels (and one-call decoder) take it."""
    model = make_tiny_model(tokenizer, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    return save_checkpoint(tmp_path / "bf16-valued", model, tokenizer)


def test_native_decoder_keeps_adapter_steps_in_one_call_with_the_same_bits(tmp_path, tokenizer):
    """On the native kernels, steps with adapter rows stay in the one-call decoder (csrc/lora_delta.c); base and
    adapter rows give the same bits mixed as alone, and the same as the per-layer path with its hooks."""
    base = bf16_valued_base(tmp_path, tokenizer)
    adapter = hearth_adapter(base, tmp_path / "adapter", tokenizer, 4, ("q", "v", "o", "gate", "down"), 4)
    engine = Engine.from_checkpoint(base, EngineConfig(dtype="float32", max_num_seqs=16, max_num_batched_tokens=48))
    engine.start()
    try:
        load_adapter(engine, "a", adapter, base)
        batch = prompts(tokenizer, 6)
        jobs = list(zip(batch, [None, "a", None, "a", None, "a"]))
        alone = [run_all(engine, [job])[0][:2] for job in jobs]
        assert [result[:2] for result in run_all(engine, jobs)] == alone
        assert alone[1][0] != run_all(engine, [(batch[1], None)])[0][0]
        if native.decoder_layers_kernel() is not None and native.is_fp32_path():
            assert engine.worker.native_decoder is not None and engine.worker.lora_step.native
            calls = count_native_calls(engine, jobs)
            assert calls["native"] > 0 and calls["per-layer"] == 0
            engine.worker.native_decoder = None  # now every step runs the modules and their hooks
            assert [result[:2] for result in run_all(engine, jobs)] == alone
    finally:
        engine.shutdown()


def count_native_calls(engine, jobs) -> dict[str, int]:
    """Run jobs, counting the worker's steps by path."""
    worker, calls = engine.worker, {"native": 0, "per-layer": 0}
    native_states, model_states = worker.native_decoder.hidden_states, worker.model.hidden_states

    def on_native(*args):
        calls["native"] += 1
        return native_states(*args)

    def on_modules(*args):
        calls["per-layer"] += 1
        return model_states(*args)

    worker.native_decoder.hidden_states, worker.model.hidden_states = on_native, on_modules
    try:
        run_all(engine, jobs)
    finally:
        del worker.native_decoder.hidden_states, worker.model.hidden_states
    return calls


# --- the HTTP routes ------------------------------------------------------------------------------

KEY = {"Authorization": "Bearer sekrit"}


@pytest.fixture(scope="module")
def lora_server(lora_dirs, tiny_model_dir):
    """`hearth serve --model tiny --model alpha-merged --model peft-merged --lora alpha=DIR --weights-dir W --api-key`."""
    from server.app import create_app
    from server.settings import load_settings
    from tests.server_fixtures import TEST_ENGINE_SETTINGS, serve_app, wait_until_ready

    models = [str(tiny_model_dir), str(lora_dirs["alpha_merged"]), str(lora_dirs["peft_merged"])]
    settings = load_settings(models=models, lora=[f"alpha={lora_dirs['alpha']}"], weights_dir=str(lora_dirs["weights"]),
                             api_key="sekrit", **TEST_ENGINE_SETTINGS)
    app = create_app(settings=settings)
    with serve_app(app) as url:
        wait_until_ready(url)
        with httpx.Client(base_url=url, timeout=60, headers=KEY) as client:
            yield client


def complete(client, model: str, prompt: str = "to be or not to be that is") -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["text"]


def test_adapters_are_models_with_their_base_as_parent(lora_server, tiny_model_dir):
    cards = {card["id"]: card for card in lora_server.get("/v1/models").json()["data"]}
    assert cards["alpha"]["parent"] == tiny_model_dir.name
    assert cards[tiny_model_dir.name]["parent"] is None
    assert lora_server.get("/v1/models/alpha").json()["parent"] == tiny_model_dir.name


def test_openai_and_ollama_routes_serve_the_adapter_a_request_names(lora_server, tiny_model_dir):
    adapted, merged = complete(lora_server, "alpha"), complete(lora_server, "alpha-merged")
    assert adapted == merged != complete(lora_server, tiny_model_dir.name)
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10, "temperature": 0}
    answers = [lora_server.post("/v1/chat/completions", json={**chat, "model": m}).json() for m in ("alpha", "alpha-merged")]
    assert answers[0]["model"] == "alpha"
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]
    ollama = {"prompt": "to be or not", "stream": False, "options": {"temperature": 0, "num_predict": 10}}
    texts = [lora_server.post("/api/generate", json={**ollama, "model": m}).json()["response"]
             for m in ("alpha", "alpha-merged")]
    assert texts[0] == texts[1]


def test_load_and_unload_while_serving(lora_server, lora_dirs):
    response = lora_server.post("/v1/load_lora_adapter", json={"lora_name": "pirate", "lora_path": "peft"})
    assert response.status_code == 200, response.text
    assert "pirate" in [card["id"] for card in lora_server.get("/v1/models").json()["data"]]
    assert complete(lora_server, "pirate") == complete(lora_server, "peft-merged")
    assert lora_server.post("/v1/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
    gone = lora_server.post("/v1/completions", json={"model": "pirate", "prompt": "x", "max_tokens": 2})
    assert gone.status_code == 404 and "pirate" in gone.json()["error"]["message"]
    assert lora_server.post("/v1/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 404


def test_unloading_an_adapter_with_a_running_request_is_409(lora_server, monkeypatch):
    """The request's steps are held (the worker waits on an event) while the unload is tried, so it is still
    running however fast the engine is."""
    from server.engine.worker import ModelWorker

    entered, release, execute = threading.Event(), threading.Event(), ModelWorker.execute

    def held(worker, output):
        if any(item.seq.lora is not None and item.seq.lora.name == "busy" for item in output.scheduled):
            entered.set()
            release.wait(30)
        return execute(worker, output)

    monkeypatch.setattr(ModelWorker, "execute", held)
    assert lora_server.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "beta"}).status_code == 200
    body = {"model": "busy", "prompt": "to be", "max_tokens": 200, "ignore_eos": True, "stream": True}
    first_line, close = [], threading.Event()

    def stream_then_close():  # on its own client: the answer's headers come with its first token
        with httpx.Client(base_url=lora_server.base_url, headers=KEY, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as stream:
                first_line.append(next(stream.iter_lines()))
                close.wait(30)

    streamer = threading.Thread(target=stream_then_close)
    streamer.start()
    try:
        assert entered.wait(30)  # the request runs, its step held
        refused = lora_server.post("/v1/unload_lora_adapter", json={"lora_name": "busy"})
        release.set()
        assert refused.status_code == 409 and "busy" in refused.json()["error"]["message"]
        assert complete(lora_server, "busy")  # still served
    finally:
        release.set()
        close.set()
        streamer.join(60)
    assert first_line
    for _ in range(200):  # the closed stream's request is aborted within a step
        if lora_server.post("/v1/unload_lora_adapter", json={"lora_name": "busy"}).status_code == 200:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the adapter stayed busy after its request ended")


def test_load_errors(lora_server, lora_dirs, tiny_model_dir):
    def load(**body):
        return lora_server.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "peft", **body})

    outside = load(lora_path=str(lora_dirs["alpha_merged"]))
    assert outside.status_code == 400 and "outside the weights folder" in outside.json()["error"]["message"]
    assert load(lora_path="../alpha-merged").status_code == 400
    assert load(base_model="nope").status_code == 404
    other = load(lora_path="alpha", base_model="alpha-merged")
    assert other.status_code == 400
    assert str(tiny_model_dir) in other.json()["error"]["message"] and "alpha-merged" in other.json()["error"]["message"]
    assert load(lora_name="alpha").status_code == 400  # taken
    assert load(lora_name=tiny_model_dir.name).status_code == 400  # a base model's name
    assert load(lora_path="missing").status_code == 400
    assert lora_server.post("/v1/completions", json={"model": "x", "prompt": "a"}).status_code == 404


def test_adapter_routes_need_the_api_key(lora_server):
    body = {"lora_name": "y", "lora_path": "peft"}
    assert httpx.post(f"{lora_server.base_url}/v1/load_lora_adapter", json=body).status_code == 401
    assert httpx.post(f"{lora_server.base_url}/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 401


def test_a_startup_adapter_for_another_base_is_a_load_error_naming_both(lora_dirs, tiny_model_dir):
    from server.app import create_app
    from server.settings import load_settings
    from tests.server_fixtures import TEST_ENGINE_SETTINGS, serve_app

    merged = lora_dirs["alpha_merged"]
    settings = load_settings(models=[str(merged)], lora=[f"alpha={lora_dirs['alpha']}"], **TEST_ENGINE_SETTINGS)
    with serve_app(create_app(settings=settings)) as url:
        for _ in range(600):
            health = httpx.get(f"{url}/health").json()
            if health["status"] != "loading":
                break
            time.sleep(0.05)
    assert health["status"] == "error"
    assert "--lora alpha=" in health["error"] and str(tiny_model_dir) in health["error"] and str(merged) in health["error"]


def test_bad_lora_flags_fail_before_the_server_starts(lora_dirs, tiny_model_dir):
    from model.errors import HearthError
    from server.app import create_app
    from server.settings import load_settings

    for entries, message in ((["alpha"], "expected NAME=ADAPTER_DIR"),
                             ([f"{tiny_model_dir.name}={lora_dirs['alpha']}"], "already a model"),
                             ([f"a={lora_dirs['alpha']}", f"a={lora_dirs['beta']}"], "already a model or another adapter"),
                             ([f"a={lora_dirs['root']}/missing"], "--lora a: .*adapter folder not found")):
        with pytest.raises(HearthError, match=message):
            create_app(settings=load_settings(models=[str(tiny_model_dir)], lora=entries))


def test_n_choices_keep_their_adapter(lora_engine, tokenizer):
    prompt = prompts(tokenizer, 3)[2]
    single = run_all(lora_engine, [(prompt, "alpha")])[0][0]

    async def two_choices():
        params = SamplingParams(max_tokens=20, temperature=0, n=2)
        choices: dict[int, list[int]] = {}
        async for output in lora_engine.generate(GenerationRequest("n2", list(prompt), params, lora="alpha")):
            for delta in output.deltas:
                choices.setdefault(delta.index, []).extend(delta.token_ids)
        return choices

    choices = asyncio.run(two_choices())
    assert choices[0] == choices[1] == single  # greedy: the forked choice decodes with the adapter too


def test_a_peft_adapter_on_an_int8_base_serves_and_is_batch_invariant(tiny_model_dir, lora_dirs, tokenizer, tmp_path):
    """Quantized bases take PEFT adapters (the delta is added to the quantized matmul's output)."""
    from model.quant import quantize_checkpoint

    quantized = quantize_checkpoint(tiny_model_dir, tmp_path / "int8", "int8").out
    engine = Engine.from_checkpoint(quantized, EngineConfig(dtype="float32", max_num_seqs=8, max_num_batched_tokens=48))
    engine.start()
    try:
        load_adapter(engine, "peft", lora_dirs["peft"], quantized)
        with pytest.raises(AdapterError, match="quantized"):  # a Hearth adapter records its unquantized base
            load_adapter(engine, "alpha", lora_dirs["alpha"], quantized)
        jobs = list(zip(prompts(tokenizer, 4), ["peft", None, "peft", None]))
        alone = [run_all(engine, [job])[0][:2] for job in jobs]
        assert [result[:2] for result in run_all(engine, jobs)] == alone
        assert alone[0][0] != run_all(engine, [(jobs[0][0], None)])[0][0]
    finally:
        engine.shutdown()


def test_peft_rslora_scale_and_adapters_on_some_layers_only(lora_dirs, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "rs"
    folder.mkdir()
    tensors = load_file(str(lora_dirs["peft"] / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".layers.1." in k}, str(folder / "adapter_model.safetensors"))
    config = json.loads((lora_dirs["peft"] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True, "layers_to_transform": [1]}))
    adapter = read(folder, tiny_model_dir)
    assert adapter.scale == pytest.approx(8.0 / 2.0)  # lora_alpha / sqrt(r), r = 4
    assert {layer for layer, _ in adapter.weights} == {1} and adapter.targets == ["q", "v", "down"]


def test_embeddings_for_an_adapter_are_refused_naming_its_base(lora_server, tiny_model_dir):
    """Embeddings are the base's hidden states; an adapter name must not silently give the base's vectors."""
    for route, body in (("/v1/embeddings", {"input": "hello"}), ("/api/embed", {"input": "hello"})):
        response = lora_server.post(route, json={**body, "model": "alpha"})
        assert response.status_code == 400, (route, response.text)
        assert "alpha" in response.text and tiny_model_dir.name in response.text
    assert lora_server.post("/v1/embeddings", json={"input": "hello", "model": tiny_model_dir.name}).status_code == 200
