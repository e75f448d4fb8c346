"""The API-neutral serving core (server/core/): SamplingParams validated once with the engine's field
names, each API's renaming, and the event stream of real requests on the tiny model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from server.core.events import ChoiceStep, UsageEvent
from server.core.serving import GenerationInput, admit, api_field_names, collect, serve
from server.engine.types import ContextOverflowError, InvalidRequestError, SamplingParams
from server.ollama.protocol import OLLAMA_FIELD_NAMES
from server.openai.chat import CHAT_FIELD_NAMES
from server.openai.completions import COMPLETION_FIELD_NAMES
from server.responses.protocol import RESPONSES_FIELD_NAMES
from server.tools import ArgumentsDelta, CallEnd, CallStart, TextEvent, ToolConfig
from tests.server_fixtures import http_client, running_server

# ------------------------------------------------------------------ SamplingParams


@pytest.mark.parametrize("field, value, rule", [
    ("max_tokens", 0, "must be at least 1"),
    ("temperature", -0.5, "must be >= 0"),
    ("temperature", 1e308, "is out of range"),  # finite in Python, inf in the sampler's float32
    ("top_k", -1, "must be >= 0"),
    ("top_p", 0.0, "must be in (0, 1]"),
    ("min_p", 1.5, "must be in [0, 1]"),
    ("repetition_penalty", 0.0, "must be > 0"),
    ("presence_penalty", 3.0, "must be in [-2, 2]"),
    ("frequency_penalty", math.nan, "is out of range"),
    ("n", 17, "must be between 1 and 16"),
    ("logprobs", 21, "must be between 0 and 20"),
    ("stop", [""], "at most 16 non-empty strings"),
    ("stop_token_ids", ["7"], "must be token ids (integers)"),
    ("top_p", "high", "is out of range"),  # a wrong type is refused like a bad value, never a TypeError
])
def test_a_bad_value_is_refused_on_construction_naming_the_engine_field(field, value, rule):
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field and str(caught.value) == f"{field} {rule}" and caught.value.rule == rule


@pytest.mark.parametrize("bias, message", [
    ({"abc": 1.0}, "keys must be token ids, got 'abc'"),
    ({"5_0": 1.0}, "keys must be token ids"),
    ({3: math.inf}, "must be a finite number"),
    ({3: "x"}, "is not a token id and a number"),
])
def test_logit_bias_is_checked_once_when_the_params_are_made(bias, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        SamplingParams(logit_bias=bias)
    assert caught.value.param == "logit_bias"


def test_params_are_frozen_and_normalised():
    params = SamplingParams(stop=["a"], stop_token_ids=[4], logit_bias={"5": 1, 6: -2.5})
    assert params.stop == ("a",) and params.stop_token_ids == (4,) and dict(params.logit_bias) == {5: 1.0, 6: -2.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.0
    with pytest.raises(TypeError):
        params.logit_bias[7] = 1.0
    assert dataclasses.replace(params, temperature=0.0).temperature == 0.0
    with pytest.raises(InvalidRequestError, match="ignore_eos"):  # replace() validates again
        dataclasses.replace(params, ignore_eos=True, grammar=object())


def test_what_depends_on_the_model_is_checked_against_its_vocabulary():
    SamplingParams(logit_bias={511: 1.0}).check_against(512)
    for params, field in [(SamplingParams(logit_bias={512: 1.0}), "logit_bias"), (SamplingParams(stop_token_ids=[-1]), "stop_token_ids")]:
        with pytest.raises(InvalidRequestError) as caught:
            params.check_against(512)
        assert caught.value.param == field and "[0, 512)" in str(caught.value)


@pytest.mark.parametrize("names, field, expected", [
    (CHAT_FIELD_NAMES, "max_tokens", "max_completion_tokens"),
    (CHAT_FIELD_NAMES, "logprobs", "top_logprobs"),
    (COMPLETION_FIELD_NAMES, "max_tokens", "max_tokens"),
    (OLLAMA_FIELD_NAMES, "max_tokens", "options.num_predict"),
    (OLLAMA_FIELD_NAMES, "temperature", "options.temperature"),
    (OLLAMA_FIELD_NAMES, "repetition_penalty", "options.repeat_penalty"),
    (RESPONSES_FIELD_NAMES, "max_tokens", "max_output_tokens"),
    (RESPONSES_FIELD_NAMES, "temperature", "temperature"),  # not renamed: the same name
])
def test_each_api_names_its_own_field(names, field, expected):
    bad = {"max_tokens": 0, "logprobs": 99, "temperature": -1.0, "repetition_penalty": 0.0}[field]
    with pytest.raises(InvalidRequestError) as caught, api_field_names(names):
        SamplingParams(**{field: bad})
    rule = caught.value.rule
    assert caught.value.param == expected and str(caught.value) == f"{expected} {rule}"


def test_errors_without_a_rule_keep_their_message_under_the_new_name():
    error = InvalidRequestError("logit_bias", "logit_bias entry 'x': 1 is not a token id and a number")
    renamed = error.renamed({"logit_bias": "options.logit_bias"})
    assert renamed.param == "options.logit_bias" and str(renamed) == str(error)
    assert error.renamed({"other": "x"}) is error


# ------------------------------------------------------------------ event streams of real requests


@pytest.fixture(scope="module")
def served(long_model_dir):
    with running_server(long_model_dir) as running:
        yield running


def model_of(running):
    return running.app.state.registry.get(running.model_id)


async def events_of(model, job: GenerationInput, request_id: str, names=COMPLETION_FIELD_NAMES) -> list:
    generation = await admit(model, job, request_id, names)
    return [event async for event in serve(generation)]


async def collected(model, job: GenerationInput, request_id: str):
    return await collect(serve(await admit(model, job, request_id, COMPLETION_FIELD_NAMES)))


def prompt_ids(model, text: str = "To be, or not to be") -> list[int]:
    return model.tokenizer.encode(text, add_bos=True)


def test_text_deltas_concatenate_to_the_whole_answer_and_finish_and_usage_come_last(served):
    model = model_of(served)
    job = GenerationInput([prompt_ids(model)], {"max_tokens": 12, "temperature": 0, "n": 2, "logprobs": 2}, prompt_field="prompt")
    events = asyncio.run(events_of(model, job, "core-stream"))
    results, usage = asyncio.run(collected(model, job, "core-whole"))
    assert isinstance(events[-1], UsageEvent) and all(isinstance(e, ChoiceStep) for e in events[:-1])
    assert events[-1].usage.completion_tokens == sum(len(r.token_ids) for r in results.values()) == usage.completion_tokens
    for choice in (0, 1):
        steps = [e for e in events[:-1] if e.choice == choice]
        assert [s.finish is not None for s in steps] == [False] * (len(steps) - 1) + [True]  # the finish is the last step
        assert "".join(s.text for s in steps) == "".join(p.text for s in steps for p in s.parts) == results[choice].text
        assert [t for s in steps for t in s.token_ids] == results[choice].token_ids
        logprobs = [lp for s in steps for lp in s.logprobs or ()]
        assert len(logprobs) == len(results[choice].token_ids) and all(len(lp.top) == 2 for lp in logprobs)
        assert [lp.token for lp in logprobs] == [model.token_pieces.piece(t)[0] for t in results[choice].token_ids]


def test_several_prompts_are_indexed_prompt_times_n_plus_choice(served):
    model = model_of(served)
    job = GenerationInput([prompt_ids(model), prompt_ids(model, "Hello")], {"max_tokens": 3, "temperature": 0, "n": 2})
    events = asyncio.run(events_of(model, job, "core-prompts"))
    finished = sorted(e.choice for e in events if isinstance(e, ChoiceStep) and e.finish)
    assert finished == [0, 1, 2, 3] and sum(isinstance(e, UsageEvent) for e in events) == 1
    assert events[-1].usage.prompt_tokens == len(job.prompts[0]) + len(job.prompts[1])


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"], "additionalProperties": False}}}


def test_tool_call_deltas_concatenate_to_the_whole_answers_arguments(served):
    model = model_of(served)
    tools = ToolConfig.from_openai([WEATHER], "required", False)
    job = GenerationInput([prompt_ids(model, "Weather in Paris?")], {"max_tokens": 60, "temperature": 0}, tools=tools)
    events = asyncio.run(events_of(model, job, "core-tools-stream"))
    results, _ = asyncio.run(collected(model, job, "core-tools-whole"))
    parts = [p for e in events if isinstance(e, ChoiceStep) for p in e.parts]
    starts, ends = [p for p in parts if isinstance(p, CallStart)], [p for p in parts if isinstance(p, CallEnd)]
    assert [s.name for s in starts] == [e.name for e in ends] == ["get_weather"]  # the grammar forces one call
    streamed = "".join(p.fragment for p in parts if isinstance(p, ArgumentsDelta))
    assert streamed == ends[0].arguments == results[0].calls[0]["arguments"]
    assert results[0].calls[0]["name"] == "get_weather" and "city" in streamed
    assert "".join(p.text for p in parts if isinstance(p, TextEvent)).strip() == results[0].content.strip() == ""
    finish = [e.finish for e in events if isinstance(e, ChoiceStep) and e.finish][0]
    assert finish.tool_calls == 1 and results[0].finish_reason == "stop"


def test_admission_errors_are_renamed_and_raise_before_any_event(served):
    model = model_of(served)
    ids = prompt_ids(model)
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(events_of(model, GenerationInput([ids], {"max_tokens": 0}), "core-bad", CHAT_FIELD_NAMES))
    assert caught.value.param == "max_completion_tokens" and str(caught.value) == "max_completion_tokens must be at least 1"
    with pytest.raises(InvalidRequestError) as caught:  # the vocabulary check happens in the engine's admission
        asyncio.run(events_of(model, GenerationInput([ids], {"max_tokens": 2, "logit_bias": {10**6: 1.0}}), "core-oov"))
    assert caught.value.param == "logit_bias"
    with pytest.raises(ContextOverflowError) as overflow:  # Ollama's num_ctx: a lower limit than the model's
        asyncio.run(events_of(model, GenerationInput([ids], {"max_tokens": 8}, context_limit=len(ids) + 4, prompt_field="prompt"), "core-ctx"))
    assert overflow.value.param == "prompt" and overflow.value.limit == len(ids) + 4


def test_the_http_apis_report_engine_rules_under_their_own_field_names(served):
    with http_client(served.url) as http:
        ollama = http.post("/api/generate", json={"model": served.model_id, "prompt": "hi", "stream": False, "options": {"temperature": -1}})
        assert ollama.status_code == 400 and ollama.json() == {"error": "options.temperature must be >= 0"}
        ollama = http.post("/api/chat", json={"model": served.model_id, "messages": [{"role": "user", "content": "hi"}],
                                              "options": {"repeat_penalty": 0}})
        assert ollama.status_code == 400 and ollama.json() == {"error": "options.repeat_penalty must be > 0"}
        chat = http.post("/v1/chat/completions", json={"model": served.model_id, "messages": [{"role": "user", "content": "hi"}], "n": 17})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "n"
        assert chat.json()["error"]["message"] == "n must be between 1 and 16"
        responses = http.post("/v1/responses", json={"model": served.model_id, "input": "hi", "max_output_tokens": 5000})
        assert responses.status_code == 400 and responses.json()["error"]["param"] == "input"  # context overflow names the input
