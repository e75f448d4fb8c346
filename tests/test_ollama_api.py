"""The Ollama-compatible API against a live server, driven by the official `ollama` client and raw httpx."""

from __future__ import annotations

import json

import ollama
import pytest

from model.chat import encode_chat
from tests.server_fixtures import ollama_client, reference_tokens

MESSAGES = [{"role": "user", "content": "What is a hood?"}]
# Greedy and no repeat penalty (Ollama's default is 1.1), so answers can be checked against the reference.
GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 8}




@pytest.fixture(scope="module")
def client(server):
    return ollama_client(server.url)


def reference_text(tiny_model_dir, tokenizer, prompt_ids, max_tokens):
    tokens = reference_tokens(tiny_model_dir, prompt_ids, max_tokens, tuple(tokenizer.stop_ids))
    return tokenizer.decode(tokens), tokens


def assert_final_stats(final, prompt_tokens):
    assert final.done is True and final.done_reason in ("stop", "length")
    assert final.prompt_eval_count == prompt_tokens and final.eval_count >= 1
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, name), int) and getattr(final, name) >= 0  # nanoseconds
    assert final.total_duration >= final.eval_duration > 0


def test_list_show_ps_version(http, client, server, tiny_model_dir):
    name = f"{tiny_model_dir.name}:latest"
    listed = client.list().models
    assert [m.model for m in listed] == [name]
    assert listed[0].size == (tiny_model_dir / "model.safetensors").stat().st_size
    assert listed[0].details.family == "llama" and listed[0].details.parameter_size.endswith("M")
    shown = client.show(tiny_model_dir.name)
    assert shown.modelinfo["llama.context_length"] == server.engine.max_seq_len
    assert shown.capabilities == ["completion"] and 'stop "<|end|>"' in shown.parameters
    running = client.ps().models
    assert [m.model for m in running] == [name] and running[0].context_length == server.engine.max_seq_len
    version = http.get("/api/version").json()
    assert set(version) == {"version"} and version["version"].count(".") == 2


def test_chat_matches_reference_and_openai(http, client, tiny_model_dir, tokenizer):
    prompt_ids = encode_chat(tokenizer, MESSAGES).ids
    expected, _ = reference_text(tiny_model_dir, tokenizer, prompt_ids, 8)
    reply = client.chat(model=tiny_model_dir.name, messages=MESSAGES, options=GREEDY, stream=False)
    assert reply.model == tiny_model_dir.name and reply.message.role == "assistant"
    assert reply.message.content == expected
    assert_final_stats(reply, len(prompt_ids))
    openai_reply = http.post(
        "/v1/chat/completions",
        json={"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0},
    ).json()
    assert openai_reply["choices"][0]["message"]["content"] == expected  # one engine, two protocols


def test_chat_stream(client, tiny_model_dir, tokenizer):
    whole = client.chat(model=f"{tiny_model_dir.name}:latest", messages=MESSAGES, options=GREEDY, stream=False)
    parts = list(client.chat(model=tiny_model_dir.name, messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].message.content == "" and parts[-1].done_reason == whole.done_reason
    assert_final_stats(parts[-1], len(encode_chat(tokenizer, MESSAGES).ids))


def test_generate_templates_the_prompt_and_returns_context(client, tiny_model_dir, tokenizer):
    prompt_ids = encode_chat(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]).ids
    expected, tokens = reference_text(tiny_model_dir, tokenizer, prompt_ids, 8)
    reply = client.generate(model=tiny_model_dir.name, prompt="Hi", system="Be brief.", options=GREEDY)
    assert reply.response == expected
    assert list(reply.context) == prompt_ids + tokens  # the stop token is not part of the context
    assert_final_stats(reply, len(prompt_ids))
    streamed = list(client.generate(model=tiny_model_dir.name, prompt="Hi", system="Be brief.", options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == expected and streamed[-1].done


def test_generate_raw_skips_the_template(client, tiny_model_dir, tokenizer):
    prompt_ids = tokenizer.encode("To be, or not", add_bos=True)
    expected, _ = reference_text(tiny_model_dir, tokenizer, prompt_ids, 8)
    reply = client.generate(model=tiny_model_dir.name, prompt="To be, or not", raw=True, options=GREEDY)
    assert reply.response == expected and reply.context is None


def test_seeded_sampling_is_reproducible(client, tiny_model_dir):
    def sample(seed):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 8}
        return client.chat(model=tiny_model_dir.name, messages=MESSAGES, options=options, stream=False).message.content

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_ndjson_framing_raw(http, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "messages": MESSAGES, "options": GREEDY}
    response = http.post("/api/chat", json=body)  # no "stream": Ollama streams by default
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    assert response.text.endswith("\n")
    objects = [json.loads(line) for line in response.text.splitlines()]
    assert all(set(o) >= {"model", "created_at", "message", "done"} for o in objects)
    assert objects[-1]["done"] and "eval_count" in objects[-1] and "done_reason" in objects[-1]
    assert not any("eval_count" in o for o in objects[:-1])
    whole = http.post("/api/chat", json={**body, "stream": False})
    assert whole.headers["content-type"].startswith("application/json") and whole.json()["done"] is True


def test_request_without_input_only_loads(http, client, tiny_model_dir):
    loaded = client.generate(model=tiny_model_dir.name)
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    chat = http.post("/api/chat", json={"model": tiny_model_dir.name, "messages": [], "stream": False}).json()
    assert chat["done_reason"] == "load" and chat["message"]["content"] == ""


def test_errors_use_ollama_shape(http, client, tiny_model_dir):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=MESSAGES)
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=tiny_model_dir.name, messages=MESSAGES, options={"top_p": 0}, stream=False)
    assert caught.value.status_code == 400 and "options.top_p" in caught.value.error
    refused = http.post("/api/generate", json={"model": tiny_model_dir.name, "prompt": "x", "format": "xml"})
    assert refused.status_code == 400 and "format" in refused.json()["error"]
    malformed = http.post("/api/chat", content=b'{"model": ')
    assert malformed.status_code == 400 and isinstance(malformed.json()["error"], str)
