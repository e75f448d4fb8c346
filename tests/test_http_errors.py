"""Errors over real HTTP: status codes, both wire shapes, the parameter named, and never a 500 for user input.

The module's server has a 64 KiB body limit, so 413 is cheap to provoke.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading

import httpx
import openai
import pytest

from server import registry as registry_module
from model.errors import CheckpointError
from server.app import create_app
from server.settings import load_settings
from tests.server_fixtures import (
    NODELAY,
    TEST_ENGINE_SETTINGS,
    openai_client,
    running_server,
    serve_app,
    wait_until_ready,
)

MAX_BODY = 65536


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, max_body_bytes=MAX_BODY) as running:
        yield running



@pytest.fixture(scope="module")
def base(tiny_model_dir):
    """A valid chat body, changed one field at a time below."""
    return {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("temperature", -0.5, "temperature"),
        ("temperature", 2.5, "temperature"),
        ("top_p", 0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("n", 0, "n"),
        ("n", 17, "n"),
        ("max_tokens", 0, "max_tokens"),
        ("max_completion_tokens", 0, "max_completion_tokens"),
        ("presence_penalty", 3, "presence_penalty"),
        ("seed", 2**70, "seed"),
        ("messages", [], "messages"),
        ("messages", "hello", "messages"),
        ("messages", [{"role": "robot", "content": "hi"}], "messages[0].role"),
        ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
        ("messages", [{"role": "user", "content": 5}], "messages[0].content"),
        ("logit_bias", {"abc": 1}, "logit_bias"),
        ("logit_bias", {"99999": 1}, "logit_bias"),
        ("logit_bias", {"5": 500}, "logit_bias.5"),
        ("top_logprobs", 3, "top_logprobs"),  # without logprobs: true
        ("stop", 5, "stop"),
        ("stream_options", {"include_usage": True}, "stream_options"),  # without stream: true
        ("response_format", {"type": "xml"}, "response_format.type"),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}}}}, "response_format.json_schema.schema"),
        ("tools", [{"type": "retrieval"}], "tools[0].type"),
        ("tool_choice", "required", "tool_choice"),  # without tools
    ],
)
def test_invalid_chat_parameter_is_400_naming_it(http, base, field, value, param):
    error = openai_error(http.post("/v1/chat/completions", json={**base, field: value}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error["message"]


@pytest.mark.parametrize(
    ("prompt_or_field", "param", "words"),
    [
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [[]]}, "prompt", "empty"),
        ({"prompt": [99999]}, "prompt", "outside"),
        ({"prompt": {"text": "x"}}, "prompt", "token-id"),
        ({"prompt": ["a", [1, 2]]}, "prompt", "token-id"),
        ({"suffix": "tail"}, "suffix", "fill-in-the-middle"),
        ({"echo": True, "logprobs": 1}, "echo", "not supported"),
        ({"best_of": 3}, "best_of", "not supported"),
    ],
)
def test_invalid_completion_request_is_400(http, tiny_model_dir, prompt_or_field, param, words):
    body = {"model": tiny_model_dir.name, "prompt": "To be", "max_tokens": 2, **prompt_or_field}
    error = openai_error(http.post("/v1/completions", json=body), 400)
    assert error["param"] == param and words in error["message"]


def test_sdk_error_classes(server, base):
    client = openai_client(server.url)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{**base, "temperature": -1})
    assert caught.value.status_code == 400 and caught.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**{**base, "model": "no-such-model"})
    assert caught.value.code == "model_not_found" and "no-such-model" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_context_overflow_states_limit_and_request(http, base, tiny_model_dir):
    error = openai_error(http.post("/v1/chat/completions", json={**base, "max_tokens": 1000}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "256" in error["message"] and "1009" in error["message"]  # 9 prompt tokens + 1000
    long_prompt = {"model": tiny_model_dir.name, "prompt": [5] * 300}  # no max_tokens: the prompt alone is too long
    error = openai_error(http.post("/v1/completions", json=long_prompt), 400)
    assert error["code"] == "context_length_exceeded" and "256" in error["message"] and "300" in error["message"]
    ollama = http.post("/api/generate", json={"model": tiny_model_dir.name, "prompt": "hi", "options": {"num_ctx": 4}})
    assert ollama.status_code == 400 and "maximum context length is 4 tokens" in ollama.json()["error"]


def test_malformed_bodies(http, tiny_model_dir):
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        for content in (b'{"model": ', b"[1, 2]", b"", b"\xff\xfe", b'"just a string"', b'{"temperature": NaN}'):
            error = openai_error(http.post(path, content=content), 400)
            assert "JSON" in error["message"]
    for path in ("/api/chat", "/api/generate", "/api/show"):
        response = http.post(path, content=b'{"model": ')
        assert response.status_code == 400 and set(response.json()) == {"error"} and "JSON" in response.json()["error"]
    # curl -d labels JSON as a form (Ollama's docs use it that way): still parsed as JSON.
    body = json.dumps({"model": tiny_model_dir.name, "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
    form = http.post("/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and form.json()["done"] is True


def test_unknown_model_is_404_in_both_shapes(http, base):
    error = openai_error(http.post("/v1/chat/completions", json={**base, "model": "nope"}), 404)
    assert error["code"] == "model_not_found"
    assert openai_error(http.get("/v1/models/nope"), 404)["param"] == "model"
    ollama = http.post("/api/show", json={"model": "nope"})
    assert ollama.status_code == 404 and "nope" in ollama.json()["error"]


def test_oversized_body_is_413(http, base):
    padding = "x" * (MAX_BODY + 1)
    declared = http.post("/v1/chat/completions", json={**base, "user": padding})
    assert openai_error(declared, 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "x", "pad": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    streamed = http.post("/api/chat", content=chunked())
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]


def test_full_queue_is_429_with_retry_after(server, base, monkeypatch):
    """One running slot, no queue: of several simultaneous requests, the extra ones are refused."""
    monkeypatch.setattr(server.engine.config, "max_num_seqs", 1)  # admission limits, read per request
    monkeypatch.setattr(server.engine.config, "max_waiting", 0)
    busy = {**base, "max_tokens": 100, "ignore_eos": True}

    async def burst():
        transport = httpx.AsyncHTTPTransport(socket_options=NODELAY)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, transport=transport) as client:
            openai_side = [client.post("/v1/chat/completions", json=busy) for _ in range(4)]
            ollama_side = [client.post("/api/chat", json={**busy, "stream": False}) for _ in range(2)]
            return await asyncio.gather(*openai_side, *ollama_side)

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 429 in statuses[:4] and set(statuses) <= {200, 429}
    for response in responses[:4]:
        if response.status_code == 429:
            error = openai_error(response, 429)
            assert response.headers["retry-after"] == "1" and error["type"] == "rate_limit_error"
    for response in responses[4:]:
        if response.status_code == 429:
            assert "retry" in response.json()["error"]


def test_429_names_the_limit_and_the_waiting_count_as_the_metric_does(tiny_model_dir, base):
    """--max-waiting 2, one slot, four requests at an idle engine: one runs, two wait, the fourth is refused
    saying 2 wait (a request admitted into a free slot is not waiting), as hearth_num_requests_waiting says."""
    busy = {**base, "max_tokens": 80, "ignore_eos": True, "stream": True}

    async def burst(url):
        transport = httpx.AsyncHTTPTransport(socket_options=NODELAY)
        async with httpx.AsyncClient(base_url=url, timeout=60, transport=transport) as client:
            async def one():
                async with client.stream("POST", "/v1/chat/completions", json=busy) as response:
                    text = (await response.aread()).decode()
                    return response.status_code, text

            async def watch(requests):  # the gauge, sampled while the requests run
                samples = []
                while not requests.done():
                    metrics = (await client.get("/metrics")).text
                    samples += [float(line.split()[-1]) for line in metrics.splitlines()
                                if line.startswith("hearth_num_requests_waiting")]
                    await asyncio.sleep(0.02)
                return samples

            requests = asyncio.gather(*(one() for _ in range(4)))
            samples = await watch(requests)
            return await requests, samples

    with running_server(tiny_model_dir, max_num_seqs=1, max_waiting=2) as one_slot:
        results, samples = asyncio.run(burst(one_slot.url))
    refused = [json.loads(text)["error"]["message"] for status, text in results if status == 429]
    assert sorted(status for status, _ in results) == [200, 200, 200, 429], results
    assert "(2 waiting for a free slot, limit 2: --max-waiting)" in refused[0], refused[0]
    assert samples and max(samples) == 2, samples


def test_unknown_fields_are_ignored_and_logged(http, base, caplog):
    with caplog.at_level(logging.WARNING, logger="hearth.server"):
        response = http.post("/v1/chat/completions", json={**base, "frobnicate": 1, "stream_options": None})
        assert response.status_code == 200
        nested = {**base, "messages": [{"role": "user", "content": "hi", "mood": "happy"}]}
        assert http.post("/v1/chat/completions", json=nested).status_code == 200
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "frobnicate" in logged and "mood" in logged


def test_tokenize_and_detokenize(http, tokenizer, tiny_model_dir):
    tokens = http.post("/tokenize", json={"prompt": "To be, or not"}).json()
    assert tokens["tokens"] == tokenizer.encode("To be, or not", add_bos=True) and tokens["max_model_len"] == 256
    text = http.post("/detokenize", json={"model": tiny_model_dir.name, "tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "To be, or not", "content": "To be, or not"}  # vLLM's and llama.cpp's names
    llama = http.post("/tokenize", json={"content": "To be, or not"}).json()  # llama.cpp: no BOS unless add_special
    assert llama["tokens"] == tokenizer.encode("To be, or not")
    assert http.post("/tokenize", json={"content": "To", "add_special": True}).json()["tokens"] == tokenizer.encode("To", add_bos=True)
    pieces = http.post("/tokenize", json={"content": "To be", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "To be" and [p["id"] for p in pieces] == tokenizer.encode("To be")
    assert openai_error(http.post("/tokenize", json={"content": "x", "prompt": "y"}), 400)["param"] == "prompt"
    assert openai_error(http.post("/detokenize", json={"tokens": [10**6]}), 400)["param"] == "tokens"
    assert openai_error(http.post("/tokenize", json={"prompt": "x", "messages": []}), 400)["param"] == "prompt"


# Values of the wrong type or range; none may produce a 500 in any field of any route.
ODD_VALUES = [None, -1, 1e308, 2**70, "x", [], {}]
FUZZED_FIELDS = {
    "/v1/chat/completions": ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logit_bias",
                             "logprobs", "top_logprobs", "stream", "stream_options", "response_format", "top_k",
                             "repetition_penalty"],
    "/v1/completions": ["prompt", "max_tokens", "n", "stop", "echo", "logprobs", "suffix", "best_of", "seed", "stream"],
    "/api/chat": ["model", "messages", "options", "stream", "format", "logprobs"],
    "/api/generate": ["prompt", "system", "raw", "context", "options", "format"],
}
OPTIONS = ["num_predict", "top_k", "temperature", "repeat_penalty", "stop", "num_ctx", "seed"]


def fuzzed_bodies(base):
    bodies = {
        "/v1/chat/completions": {**base, "stream": True},
        "/v1/completions": {"model": base["model"], "prompt": "hi", "max_tokens": 2, "stream": True},
        "/api/chat": {"model": base["model"], "messages": base["messages"], "options": {"num_predict": 2}},
        "/api/generate": {"model": base["model"], "prompt": "hi", "options": {"num_predict": 2}},
    }
    for path, fields in FUZZED_FIELDS.items():
        for field, value in itertools.product(fields, ODD_VALUES):
            yield path, {**bodies[path], field: value}
    for value in ODD_VALUES:
        yield "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": value}]}
        yield "/v1/chat/completions", {**base, "messages": [{"role": value, "content": "hi"}]}
        for option in OPTIONS:
            yield "/api/generate", {**bodies["/api/generate"], "options": {"num_predict": 2, option: value}}
        for path in ("/api/show", "/tokenize", "/detokenize"):
            yield path, {"model": value, "tokens": value, "prompt": value}


async def first_lines(response: httpx.Response, count: int) -> str:
    """The start of a streamed body (closing the stream then cancels the rest of a long generation)."""
    lines = []
    async for line in response.aiter_lines():
        lines.append(line)
        if len(lines) >= count:
            break
    return "\n".join(lines)


def test_no_user_input_produces_a_500(server, base):
    async def send(client, semaphore, path, body):
        async with semaphore, client.stream("POST", path, json=body) as response:
            text = await first_lines(response, 6) if response.status_code == 200 else (await response.aread()).decode()
            return path, body, response.status_code, text

    async def send_all():
        semaphore = asyncio.Semaphore(8)  # several in flight: the run is bound by CPU, not round trips
        transport = httpx.AsyncHTTPTransport(socket_options=NODELAY)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, transport=transport) as client:
            return await asyncio.gather(*(send(client, semaphore, path, body) for path, body in fuzzed_bodies(base)))

    results = asyncio.run(send_all())
    for path, body, status, text in results:
        assert status < 500, (path, body, text)
        assert ('"error"' in text) == (status >= 400), (path, body, text)
    assert {200, 400, 404} <= {status for _, _, status, _ in results}


def test_health_is_503_while_loading_then_200(tiny_model_dir, monkeypatch):
    release = threading.Event()
    real_load = registry_module.load_engine

    def slow_load(path, settings):
        release.wait(30)
        return real_load(path, settings)

    monkeypatch.setattr(registry_module, "load_engine", slow_load)
    app = create_app(settings=load_settings(models=[str(tiny_model_dir)], **TEST_ENGINE_SETTINGS))
    with serve_app(app) as url:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        body = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        waiting = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert openai_error(waiting, 503)["code"] == "model_loading" and waiting.headers["retry-after"]
        release.set()
        wait_until_ready(url)
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "models": [tiny_model_dir.name]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200


def test_failed_load_is_reported(tiny_model_dir, monkeypatch):
    def broken_load(path, settings):
        raise CheckpointError(f"{path}/model.safetensors: corrupt safetensors file")

    failures = []
    monkeypatch.setattr(registry_module, "load_engine", broken_load)
    app = create_app(settings=load_settings(models=[str(tiny_model_dir)]), on_load_failure=failures.append)
    with serve_app(app) as url:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "corrupt" in health.json()["error"]
    assert len(failures) == 1 and isinstance(failures[0], CheckpointError)


def test_serve_refuses_a_missing_checkpoint(tmp_path, capsys):
    from cli.main import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: checkpoint folder not found"
