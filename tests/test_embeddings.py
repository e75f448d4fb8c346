"""Embeddings: pooled vectors from the engine's own batch, and the OpenAI and Ollama routes serving them.

The engine part checks the vectors against a naive reference (the model's own
`hidden_states()` in float32, pooled by hand), batch invariance bit for bit
(alone, among other inputs, beside generating requests, and the generations
unchanged by them), and that embedding requests never leave KV blocks behind.
The HTTP part drives the running test server with the `openai` and `ollama`
clients and raw httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model.checkpoint import load_checkpoint, save_checkpoint
from server.engine import Engine
from server.engine.kv_cache import KVCacheManager
from server.engine.scheduler import Scheduler, SchedulerConfig, Sequence
from server.engine.types import EmbeddingRequest, GenerationRequest, InvalidRequestError, SamplingParams
from server.settings import add_settings_arguments, load_settings, settings_from_args
from tests.conftest import make_tiny_model
from tests.test_engine import make_engine as engine_with
from tests.server_fixtures import ollama_client, openai_client, running_server

WORDS = "to be or not to be that is the question whether tis nobler in the mind to suffer".split() * 20
GREEDY = SamplingParams(max_tokens=24, temperature=0, logprobs=3)


def texts(count: int) -> list[str]:
    """Distinct texts of growing lengths (about 4 to 130 tokens)."""
    return [" ".join(WORDS[i:i + 2 + 9 * i]) for i in range(count)]


def prompts(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.encode(text, add_bos=True) for text in texts(count)]


def make_engine(path, **overrides) -> Engine:
    """tests/test_engine.py's started fp32 engine, with 48-token steps (prompts span several chunks)."""
    return engine_with(path, **{"max_num_batched_tokens": 48, **overrides})


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_checkpoint(tiny_model_dir, dtype=torch.float32).model


def naive_embedding(model, prompt: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    """The model's own hidden_states over the whole prompt in fp32, pooled and normalized by hand."""
    with torch.inference_mode():
        hidden = model.hidden_states(torch.tensor([prompt]))[0].double()
    vector = hidden.sum(0) / hidden.shape[0] if pooling == "mean" else hidden[-1]
    if normalize:
        vector = vector / vector.pow(2).sum().sqrt()
    return vector.float()


async def embed(engine, request_id: str, prompt: list[int], **options) -> torch.Tensor:
    return (await engine.embed(EmbeddingRequest(request_id, list(prompt), **options))).embedding


async def generate(engine, request_id: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    tokens, logprobs = [], []
    async for output in engine.generate(GenerationRequest(request_id, list(prompt), GREEDY)):
        for delta in output.deltas:
            tokens += delta.token_ids
            logprobs += [entry.logprob for entry in delta.logprobs or []]
    return tokens, logprobs


# ---------------------------------------------------------------- the engine


def test_the_scheduler_runs_an_embedding_prompt_uncached_and_unsampled():
    """With fake outputs (as tests/test_scheduler.py): a pooled sequence whose prompt is in the prefix cache
    still computes every row, is never sampled, and registers no block."""
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(8, 12, 128, 4), kv)
    prompt = list(range(30))
    scheduler.add_sequence(Sequence("gen", list(prompt), 30, SamplingParams(max_tokens=1)))
    while scheduler.has_work():
        output = scheduler.schedule()
        scheduler.update_from_output(output, {i.seq.seq_id: [7] for i in output.scheduled if i.num_samples})
    cached = len(kv.pool.cached_blocks)
    assert cached == 7  # the generation's full prompt blocks
    pooled = Sequence("emb", list(prompt), 30, SamplingParams(max_tokens=1), pooler=object())
    scheduler.add_sequence(pooled)
    chunks = []
    while pooled.num_computed_tokens < 30:
        output = scheduler.schedule()
        chunks += [(i.start_position, i.num_tokens, i.num_samples) for i in output.scheduled]
        scheduler.update_from_output(output, {})
    assert chunks == [(0, 12, 0), (12, 12, 0), (24, 6, 0)] and pooled.num_cached_tokens == 0
    assert len(kv.pool.cached_blocks) == cached and not pooled.is_finished  # the engine finishes it
    scheduler.finish_sequence(pooled, "stop")
    assert kv.pool.num_free_blocks == kv.num_usable_blocks



@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooled_vectors_match_the_model_own_hidden_states(engine, model, tokenizer, pooling, normalize):
    batch = prompts(tokenizer, 5) + [[7]]  # the longer ones are prefilled in several chunks (48-token budget)

    async def scenario():
        return await asyncio.gather(*(embed(engine, f"e{i}", p, pooling=pooling, normalize=normalize)
                                      for i, p in enumerate(batch)))

    for prompt, vector in zip(batch, asyncio.run(scenario())):
        expected = naive_embedding(model, prompt, pooling, normalize)
        assert vector.dtype == torch.float32 and vector.shape == (model.config.dim,)
        torch.testing.assert_close(vector, expected, atol=2e-6, rtol=1e-5)
        if normalize:
            assert abs(float(vector.double().norm()) - 1) < 1e-6
        else:
            assert float(vector.norm()) > 1.5  # RMS-normed rows: far from unit length, so a missing switch shows


def test_mean_and_last_differ_and_the_engine_defaults_apply(tiny_model_dir, model, tokenizer):
    prompt = prompts(tokenizer, 4)[-1]
    last_raw = make_engine(tiny_model_dir, pooling="last", embed_normalize=False)
    try:
        vector = asyncio.run(embed(last_raw, "x", prompt))
    finally:
        last_raw.shutdown()
    torch.testing.assert_close(vector, naive_embedding(model, prompt, "last", False), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(vector, naive_embedding(model, prompt, "mean", False), atol=1e-2)


EXACT_DTYPES = pytest.mark.parametrize("dtype", ["float32", "bfloat16"])


@EXACT_DTYPES
def test_a_vector_is_bitwise_the_same_alone_in_a_batch_and_beside_generation(tiny_model_dir, tokenizer, dtype):
    engine = make_engine(tiny_model_dir, dtype=dtype)
    steps = record_steps(engine)
    inputs, generating = prompts(tokenizer, 8)[::-1], prompts(tokenizer, 12)[8:]

    async def alone():
        vectors = [await embed(engine, "alone", p) for p in inputs]
        return vectors, [await generate(engine, "gen", p) for p in generating]

    async def together():
        embeddings = asyncio.gather(*(embed(engine, f"e{i}", p) for i, p in enumerate(inputs)))
        generations = asyncio.gather(*(generate(engine, f"g{i}", p) for i, p in enumerate(generating)))
        return await embeddings, await generations

    async def batch_only():
        return await asyncio.gather(*(embed(engine, f"b{i}", p) for i, p in enumerate(inputs)))

    try:
        solo_vectors, solo_generations = asyncio.run(alone())
        steps.clear()
        mixed_vectors, mixed_generations = asyncio.run(together())
        assert any(kinds == {"embed", "generate"} for kinds in steps)  # they really shared steps
        batch_vectors = asyncio.run(batch_only())
    finally:
        engine.shutdown()
    for solo, mixed, batched in zip(solo_vectors, mixed_vectors, batch_vectors):
        assert torch.equal(solo, mixed) and torch.equal(solo, batched)
    assert mixed_generations == solo_generations  # tokens and logprobs, bit for bit


def record_steps(engine: Engine) -> list[set[str]]:
    """Which kinds of sequences each engine step ran (wraps the worker)."""
    steps: list[set[str]] = []
    execute = engine.worker.execute

    def recording(output):
        steps.append({"embed" if item.seq.pooler is not None else "generate" for item in output.scheduled})
        return execute(output)

    engine.worker.execute = recording
    return steps


def test_a_preempted_embedding_recomputes_to_the_same_vector(tiny_model_dir, tokenizer):
    """A pool of 18 blocks for four generations growing to 100-150 tokens plus embeddings: preemption is certain."""
    small_pool = make_engine(tiny_model_dir, kv_cache_blocks=18, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    inputs = prompts(tokenizer, 10)[6:]

    async def squeezed():
        generations = [small_pool.generate(GenerationRequest(f"g{i}", p, params)) for i, p in enumerate(prompts(tokenizer, 8)[4:])]
        vectors = asyncio.gather(*(embed(small_pool, f"e{i}", p) for i, p in enumerate(inputs)))
        await asyncio.gather(*(drain(stream) for stream in generations))
        return await vectors

    try:
        vectors = asyncio.run(squeezed())
        assert small_pool.scheduler.num_preemptions > 0
        alone = [asyncio.run(embed(small_pool, "alone", p)) for p in inputs]
        assert small_pool.kv_manager.pool.num_free_blocks == small_pool.kv_manager.num_usable_blocks
    finally:
        small_pool.shutdown()
    assert all(torch.equal(a, b) for a, b in zip(vectors, alone))


async def drain(stream) -> None:
    async for _ in stream:
        pass


def test_embeddings_never_leave_kv_blocks_behind(engine, tokenizer):
    pool = engine.kv_manager.pool
    free_before, cached_before = pool.num_free_blocks, len(pool.cached_blocks)
    leaver_step, release = threading.Event(), threading.Event()
    leaver_chunks = []
    execute = engine.worker.execute

    def held_at_the_leavers_first_chunk(output):
        if any(item.seq.request_id == "leaver" for item in output.scheduled):
            leaver_chunks.append(output)
            leaver_step.set()
            release.wait(10)
        return execute(output)

    async def scenario():
        await asyncio.gather(*(embed(engine, f"k{i}", p) for i, p in enumerate(prompts(tokenizer, 10))))
        # a long input (6 chunks of 48) cancelled mid-prefill, as when the client goes away
        task = asyncio.ensure_future(embed(engine, "leaver", prompts(tokenizer, 30)[-1][:250]))
        assert await asyncio.to_thread(leaver_step.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.to_thread(wait_until, lambda: pool.num_free_blocks == free_before and not engine.scheduler.seqs_by_request)

    engine.worker.execute = held_at_the_leavers_first_chunk
    try:
        asyncio.run(scenario())
    finally:
        release.set()
        engine.worker.execute = execute
    assert len(leaver_chunks) == 1  # aborted after its first chunk, not run to the end
    assert pool.num_free_blocks == free_before
    assert len(pool.cached_blocks) == cached_before  # nothing entered the prefix cache
    assert engine.stats().num_running == 0 and not engine.scheduler.seqs_by_request and not engine._requests


def test_engine_refuses_bad_embedding_requests(engine, tokenizer):
    vocab = engine.model_config.vocab_size
    cases = [([], "prompt is empty"), ([1, vocab], f"[0, {vocab})"), ([1] * 257, "context length of 256 tokens")]
    for prompt, message in cases:
        with pytest.raises(InvalidRequestError, match=re.escape(message)) as caught:
            asyncio.run(engine.embed(EmbeddingRequest("bad", prompt)))
        assert caught.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(engine.embed(EmbeddingRequest("bad", [1, 2], pooling="max")))
    assert caught.value.param == "pooling"


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


def test_openai_client_embeddings_match_the_reference_in_both_encodings(client, server, model, tokenizer):
    inputs = texts(3)
    as_floats = client.embeddings.create(model=server.model_id, input=inputs, encoding_format="float")
    as_base64 = client.embeddings.create(model=server.model_id, input=inputs)  # the SDK asks for base64 and decodes it
    assert as_floats.object == "list" and as_floats.model == server.model_id
    assert [item.index for item in as_floats.data] == [0, 1, 2]
    encoded = [tokenizer.encode(text, add_bos=True) for text in inputs]
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == sum(map(len, encoded))
    for prompt, floats, decoded in zip(encoded, as_floats.data, as_base64.data):
        assert np.array_equal(np.asarray(floats.embedding, dtype=np.float32), np.asarray(decoded.embedding, dtype=np.float32))
        torch.testing.assert_close(torch.tensor(floats.embedding, dtype=torch.float32),
                                   naive_embedding(model, prompt, "mean", True), atol=2e-6, rtol=1e-5)


def test_token_id_inputs_equal_the_text_they_encode(client, server, tokenizer):
    text = texts(2)[1]
    ids = tokenizer.encode(text, add_bos=True)
    by_text = client.embeddings.create(model=server.model_id, input=text, encoding_format="float").data[0].embedding
    by_ids = client.embeddings.create(model=server.model_id, input=ids, encoding_format="float").data[0].embedding
    by_lists = client.embeddings.create(model=server.model_id, input=[ids, ids[:3]], encoding_format="float").data
    assert by_text == by_ids == by_lists[0].embedding and by_lists[1].embedding != by_text


def test_base64_decodes_to_the_same_float32_vector(http, server):
    body = {"model": server.model_id, "input": "a rose by any other name"}
    floats = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    encoded = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.tobytes() == np.asarray(floats, dtype=np.float32).tobytes()
    assert [float(x) for x in decoded] == floats  # JSON floats are the float32 values exactly


def test_per_request_normalization_switch(http, server, model, tokenizer):
    text = "now is the winter of our discontent"
    raw = http.post("/v1/embeddings", json={"model": server.model_id, "input": text, "embd_normalize": -1}).json()
    unit = http.post("/v1/embeddings", json={"model": server.model_id, "input": text, "embd_normalize": 2}).json()
    prompt = tokenizer.encode(text, add_bos=True)
    raw_vector, unit_vector = (torch.tensor(r["data"][0]["embedding"]) for r in (raw, unit))
    torch.testing.assert_close(raw_vector, naive_embedding(model, prompt, "mean", False), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(unit_vector, raw_vector / raw_vector.norm(), atol=1e-6, rtol=1e-5)


def test_ollama_client_embed_and_legacy_embeddings(server, client):
    ollama = ollama_client(server.url)
    inputs = texts(3)[1:]
    embedded = ollama.embed(model=server.model_id, input=inputs)
    legacy = ollama.embeddings(model=server.model_id, prompt=inputs[0])
    openai_vectors = client.embeddings.create(model=server.model_id, input=inputs, encoding_format="float").data
    assert embedded.model == server.model_id and embedded.prompt_eval_count > 0
    assert [list(v) for v in embedded.embeddings] == [item.embedding for item in openai_vectors]
    assert list(legacy.embedding) == openai_vectors[0].embedding
    assert ollama.embed(model=server.model_id, input="").embeddings == []  # Ollama's load-the-model idiom


def test_too_long_input_is_a_400_naming_the_limit_unless_truncated(http, server, tokenizer):
    long_ids = [5] * 300  # the tiny model's context is 256
    refused = http.post("/v1/embeddings", json={"model": server.model_id, "input": [[1, 2], long_ids]})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "input[1]" and "256" in error["message"] and "300" in error["message"]
    assert error["code"] == "context_length_exceeded"
    cut = http.post("/v1/embeddings", json={"model": server.model_id, "input": long_ids, "truncate": True}).json()
    first_256 = http.post("/v1/embeddings", json={"model": server.model_id, "input": long_ids[:256]}).json()
    assert cut["usage"]["prompt_tokens"] == 256 and cut["data"] == first_256["data"]
    long_text = " ".join(WORDS) * 3
    assert len(tokenizer.encode(long_text, add_bos=True)) > 256
    ollama_refused = http.post("/api/embed", json={"model": server.model_id, "input": long_text, "truncate": False})
    assert ollama_refused.status_code == 400 and "256" in ollama_refused.json()["error"]
    ollama_cut = http.post("/api/embed", json={"model": server.model_id, "input": long_text})  # truncate defaults to true
    assert ollama_cut.status_code == 200 and ollama_cut.json()["prompt_eval_count"] == 256


BAD_OPENAI_BODIES = [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": ["fine", ""]}, "input[1]"),
    ({"input": [[1, 2], []]}, "input[1]"),
    ({"input": [1, 2, 99999]}, "input"),
    ({"input": [[1], [-1]]}, "input[1]"),
    ({"input": "x", "dimensions": 3}, "dimensions"),
    ({"input": "x", "dimensions": "64"}, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "embd_normalize": 1}, "embd_normalize"),
    ({"input": ["x"] * 2049}, "input"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_OPENAI_BODIES)
def test_bad_openai_input_is_a_400_naming_the_field(http, server, fields, param):
    response = http.post("/v1/embeddings", json={"model": server.model_id, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]


def test_dimensions_equal_to_the_hidden_size_is_accepted(client, server, model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=server.model_id, input="x", dimensions=8)
    assert caught.value.param == "dimensions" and str(model.config.dim) in caught.value.message
    full = client.embeddings.create(model=server.model_id, input="x", dimensions=model.config.dim)
    assert len(full.data[0].embedding) == model.config.dim


@pytest.mark.parametrize(("path", "fields", "word"), [
    ("/api/embed", {"input": 5}, "input"),
    ("/api/embed", {"input": ["a", ""]}, "input[1]"),
    ("/api/embed", {"input": "x", "dimensions": 3}, "dimensions"),
    ("/api/embeddings", {"prompt": ["a"]}, "prompt"),
    ("/api/embed", {"input": "x", "model": "nope"}, "nope"),
])
def test_bad_ollama_input_is_an_ollama_error_naming_the_field(http, server, path, fields, word):
    response = http.post(path, json={"model": server.model_id, **fields})
    assert response.status_code in (400, 404)
    assert word in response.json()["error"]


class RecordingEngine:
    """Wraps the real engine and records how each embed() ended."""

    def __init__(self, engine):
        self.engine, self.endings = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def embed(self, request):
        try:
            output = await self.engine.embed(request)
        except asyncio.CancelledError:
            self.endings.append("cancelled")
            raise
        self.endings.append("finished")
        return output


def test_a_client_that_disconnects_leaves_no_kv_blocks_behind(http, server):
    served = server.app.state.registry.models[server.model_id]
    engine = recording = RecordingEngine(served.engine)
    served.engine = recording
    pool = engine.kv_manager.pool
    free_before = pool.num_free_blocks
    body = json.dumps({"model": server.model_id, "input": [[7 + i % 100] * 256 for i in range(1000)]}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: engine.stats().num_running > 0)  # 256,000 tokens: the engine is busy with them
        # the client has gone away
        wait_until(lambda: not engine.stats().num_running and pool.num_free_blocks == free_before)
    finally:
        served.engine = recording.engine
    assert "cancelled" in recording.endings and len(recording.endings) < 1000
    assert pool.num_free_blocks == free_before and engine.stats().num_running == 0
    assert http.post("/v1/embeddings", json={"model": server.model_id, "input": "still here"}).status_code == 200


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_pooling_and_normalize_settings_reach_the_engine(tiny_model_dir, model, tokenizer):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    from_flags = settings_from_args(parser.parse_args(["--pooling", "last", "--no-embed-normalize"]))
    assert (from_flags.pooling, from_flags.embed_normalize) == ("last", False)
    assert (load_settings().pooling, load_settings().embed_normalize) == ("mean", True)
    with pytest.raises(Exception, match="pooling"):
        load_settings(pooling="max")
    with running_server(tiny_model_dir, pooling="last", embed_normalize=False) as server:
        vector = httpx.post(server.url + "/v1/embeddings", json={"model": server.model_id, "input": "thou art"}).json()
    expected = naive_embedding(model, tokenizer.encode("thou art", add_bos=True), "last", False)
    torch.testing.assert_close(torch.tensor(vector["data"][0]["embedding"]), expected, atol=2e-6, rtol=1e-5)


def test_the_one_call_native_decoder_pools_the_same_way(tokenizer, tmp_path):
    """A bf16 checkpoint served with dtype auto: on a CPU with a native path every layer of a step is one
    native call (cpu_fast.NativeDecoder), whose hidden states the vectors come from."""
    model = make_tiny_model(tokenizer, seed=3)
    with torch.no_grad():  # large weights, so silu, softmax and the norms see varied inputs
        for name, param in model.named_parameters():
            param.copy_(param if name.endswith("norm.weight") else param * 15)
    save_checkpoint(tmp_path / "bf16", model.to(torch.bfloat16), tokenizer)
    engine = make_engine(tmp_path / "bf16", dtype="auto")
    try:
        if engine.worker.native_decoder is None:
            pytest.skip(f"no one-call native decoder on this CPU ({engine.compute()})")
        inputs = prompts(tokenizer, 6)[::-1]
        alone = [asyncio.run(embed(engine, "alone", p)) for p in inputs]

        async def beside_generation():
            generations = asyncio.gather(*(generate(engine, f"g{i}", p) for i, p in enumerate(inputs[:3])))
            vectors = await asyncio.gather(*(embed(engine, f"e{i}", p) for i, p in enumerate(inputs)))
            await generations
            return vectors

        mixed = asyncio.run(beside_generation())
    finally:
        engine.shutdown()
    assert all(torch.equal(a, b) for a, b in zip(alone, mixed))
    reference = load_checkpoint(tmp_path / "bf16", dtype=torch.float32).model
    for prompt, vector in zip(inputs, alone):  # the same math up to the order of the fp32 sums
        torch.testing.assert_close(vector, naive_embedding(reference, prompt, "mean", True), atol=1e-4, rtol=1e-3)


def test_embedding_prompt_tokens_are_counted_in_metrics(http, server):
    def prompt_tokens() -> float:
        for family in text_string_to_metric_families(http.get("/metrics").text):
            for sample in family.samples:
                if sample.name == "hearth_prompt_tokens_total" and sample.labels.get("model") == server.model_id:
                    return sample.value
        return 0.0

    before = prompt_tokens()
    answer = http.post("/v1/embeddings", json={"model": server.model_id, "input": ["one two", "three four five"]}).json()
    assert prompt_tokens() - before == answer["usage"]["prompt_tokens"] > 0
