"""The OpenAI-compatible API against a live server, driven by the official `openai` SDK and raw httpx.

Greedy outputs are checked token for token against the reference generator,
so these tests fail if the HTTP layer loses, reorders or mangles anything.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from model.chat import encode_chat
from tests.server_fixtures import async_openai_client, openai_client, reference_tokens

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a hood?"}]




@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


def expected_chat(tiny_model_dir, tokenizer, messages, max_tokens):
    """(text, token count incl. a stop token, finish_reason) of the reference greedy answer."""
    prompt = encode_chat(tokenizer, messages).ids
    tokens = reference_tokens(tiny_model_dir, prompt, max_tokens, tuple(tokenizer.stop_ids))
    stopped = len(tokens) < max_tokens
    return tokenizer.decode(tokens), len(tokens) + int(stopped), "stop" if stopped else "length"


def test_models_list_and_retrieve(client, tiny_model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_model_dir.name]  # the id is the checkpoint folder's name
    model = client.models.retrieve(tiny_model_dir.name)
    assert (model.id, model.object, model.owned_by) == (tiny_model_dir.name, "model", "hearth")
    from model import native

    compute = model.model_extra["compute"]  # how it runs: what dtype auto chose and the native path found
    assert compute["device"] == "cpu" and compute["native_isa"] in (*native.ISAS, "off")
    assert compute["dtype"] in ("float32", "bfloat16")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_chat_greedy_matches_reference(client, tiny_model_dir, tokenizer):
    text, num_tokens, finish = expected_chat(tiny_model_dir, tokenizer, MESSAGES, 12)
    reply = client.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == tiny_model_dir.name and reply.system_fingerprint.startswith("fp_")
    choice = reply.choices[0]
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (0, "assistant", text, finish)
    prompt_tokens = len(encode_chat(tokenizer, MESSAGES).ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, num_tokens)
    assert reply.usage.total_tokens == prompt_tokens + num_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_content_as_text_parts_equals_string(client, tiny_model_dir):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a hood?"}]}]
    plain = [{"role": "user", "content": "What is a hood?"}]
    answers = [
        client.chat.completions.create(model=tiny_model_dir.name, messages=m, max_tokens=8, temperature=0).choices[0].message.content
        for m in (parts, plain)
    ]
    assert answers[0] == answers[1]


def test_chat_stream_via_sdk(client, tiny_model_dir, tokenizer):
    text, num_tokens, finish = expected_chat(tiny_model_dir, tokenizer, MESSAGES, 10)
    stream = client.chat.completions.create(
        model=tiny_model_dir.name, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"  # the first chunk carries the role
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    choice_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == text
    assert [c.choices[0].finish_reason for c in choice_chunks][-1] == finish  # the last choice chunk
    assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
    usage_chunk = chunks[-1]  # include_usage: a separate last chunk with empty choices
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == num_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_seeded_sampling_is_reproducible_and_n_choices_differ(client, tiny_model_dir):
    def sample(seed, stream=False):
        kwargs = dict(model=tiny_model_dir.name, messages=MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=seed)
        if not stream:
            return [c.message.content for c in client.chat.completions.create(**kwargs).choices]
        texts = ["", "", ""]
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        return texts

    first = sample(7)
    assert len(first) == 3
    assert sample(7) == first  # same seed, same outputs
    assert sample(7, stream=True) == first  # streaming does not change what is sampled
    assert sample(8) != first
    assert len(set(first)) > 1  # the n choices are sampled independently


def test_completions_prompt_forms_and_echo(client, tiny_model_dir, tokenizer):
    ids = tokenizer.encode("To be, or not", add_bos=True)
    expected = tokenizer.decode(reference_tokens(tiny_model_dir, ids, 6, ()))
    single = client.completions.create(model=tiny_model_dir.name, prompt="To be, or not", max_tokens=6, temperature=0)
    assert single.object == "text_completion" and single.id.startswith("cmpl-")
    assert single.choices[0].text == expected and single.usage.prompt_tokens == len(ids)
    as_ids = client.completions.create(model=tiny_model_dir.name, prompt=ids, max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == expected
    other_ids = tokenizer.encode("What is", add_bos=True)
    other = tokenizer.decode(reference_tokens(tiny_model_dir, other_ids, 6, ()))
    batch = client.completions.create(
        model=tiny_model_dir.name, prompt=[ids, other_ids], max_tokens=6, temperature=0, n=2, echo=True
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # prompt index * n + choice
    prompts = [tokenizer.decode(ids), tokenizer.decode(other_ids)]
    assert [c.text for c in batch.choices] == [prompts[0] + expected] * 2 + [prompts[1] + other] * 2
    assert batch.usage.prompt_tokens == len(ids) + len(other_ids)
    strings = client.completions.create(model=tiny_model_dir.name, prompt=["To be, or not", "What is"], max_tokens=6, temperature=0)
    assert [c.text for c in strings.choices] == [expected, other]


def test_logprobs_are_consistent_with_greedy_choice(client, tiny_model_dir):
    reply = client.chat.completions.create(
        model=tiny_model_dir.name, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for entry in content:
        top = [alt.logprob for alt in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and entry.logprob <= 0
        assert entry.logprob == pytest.approx(top[0])  # greedy picks the most likely token
        assert entry.token == entry.top_logprobs[0].token
    if reply.choices[0].finish_reason == "length":  # no stop token: the bytes spell the content
        assert bytes(b for entry in content for b in entry.bytes).decode("utf-8", "replace") == reply.choices[0].message.content
    legacy = client.completions.create(model=tiny_model_dir.name, prompt="To be", max_tokens=5, temperature=0, logprobs=2)
    logprobs = legacy.choices[0].logprobs
    assert "".join(logprobs.tokens) == legacy.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.tokens)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)


def test_stop_string_cuts_the_output(client, tiny_model_dir):
    kwargs = dict(model=tiny_model_dir.name, prompt="What is a", max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) >= 4
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.completions.create(**kwargs, stop=[stop, "never-appears"]).choices[0]
    assert (cut.text, cut.finish_reason) == (full[: full.index(stop)], "stop")
    as_string = client.completions.create(**kwargs, stop=stop).choices[0]
    assert as_string.text == cut.text


def test_absent_max_tokens_uses_the_rest_of_the_context(client, tiny_model_dir, server):
    reply = client.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES, temperature=0)
    total = reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert total <= server.engine.max_seq_len
    if reply.choices[0].finish_reason == "length":
        assert total == server.engine.max_seq_len


def test_sse_framing_raw(http, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    frames = response.text.split("\n\n")[:-1]
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames)
    chunks = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) <= {"content"} for c in chunks[1:])
    completion_body = {"model": tiny_model_dir.name, "prompt": "To be", "max_tokens": 5, "stream": True}
    completion = http.post("/v1/completions", json=completion_body)
    assert completion.text.endswith("data: [DONE]\n\n")
    first = json.loads(completion.text.split("\n\n")[0].removeprefix("data: "))
    assert first["object"] == "text_completion"


def test_sixteen_concurrent_streams_are_independent(server, tiny_model_dir):
    def body(index):
        messages = [{"role": "user", "content": f"Tell me about item number {index}."}]
        return dict(model=tiny_model_dir.name, messages=messages, max_tokens=12, temperature=1.0, seed=index)

    async def run():
        async with async_openai_client(server.url) as aclient:
            async def streamed(index):
                text = ""
                async for chunk in await aclient.chat.completions.create(**body(index), stream=True):
                    text += "".join(c.delta.content or "" for c in chunk.choices)
                return text

            concurrent = await asyncio.gather(*(streamed(i) for i in range(16)))
            alone = [(await aclient.chat.completions.create(**body(i))).choices[0].message.content for i in range(16)]
            return concurrent, alone

    concurrent, alone = asyncio.run(run())
    assert concurrent == alone  # batching with 15 neighbours changes nothing
    assert len(set(alone)) > 8  # and the requests really were different


class RecordingEngine:
    """Wraps the real engine and records how each generate() stream ended."""

    def __init__(self, engine):
        self.engine, self.endings = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def generate(self, request):
        finished = False
        try:
            async for output in self.engine.generate(request):
                finished = output.finished
                yield output
        finally:
            self.endings.append("finished" if finished else "closed early")


@pytest.fixture
def recorder(server, tiny_model_dir):
    served = server.app.state.registry.models[tiny_model_dir.name]
    recording = RecordingEngine(served.engine)
    served.engine = recording
    yield recording
    served.engine = recording.engine


def wait_for_ending(recorder):
    deadline = time.monotonic() + 10
    while (not recorder.endings or recorder.engine.stats().num_running) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_client_disconnect_cancels_streaming_generation(http, tiny_model_dir, recorder):
    body = {"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ") and next(lines) == ""  # role chunk arrived
        next(lines)  # a first token
    wait_for_ending(recorder)
    assert recorder.endings == ["closed early"]
    assert recorder.engine.stats().num_running == 0


def test_client_disconnect_cancels_non_streaming_generation(http, tiny_model_dir, recorder):
    body = {"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 200 tokens are done
        http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.05))
    wait_for_ending(recorder)
    assert recorder.endings == ["closed early"]
    assert recorder.engine.stats().num_running == 0
