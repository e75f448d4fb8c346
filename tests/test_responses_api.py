"""POST /v1/responses with the real openai client: create, stream, parse, function tools,
store + previous_response_id, GET and DELETE, and the typed SSE events."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from model.chat import encode_chat
from tests.server_fixtures import http_client, openai_client, running_server

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
                          "additionalProperties": False}}


class Answer(BaseModel):
    word: str = Field(max_length=6)
    score: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def server(long_model_dir, tmp_path_factory):
    with running_server(long_model_dir, kv_cache_blocks=1100, data_dir=str(tmp_path_factory.mktemp("data"))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


def test_create_with_a_string_and_usage(client, long_model_dir):
    response = client.responses.create(model=long_model_dir.name, input="Hello there", instructions="Be brief.",
                                       max_output_tokens=6, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == long_model_dir.name
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    assert response.usage.output_tokens <= 6 and response.usage.input_tokens > 0
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"


def test_stream_events_add_up_to_the_response(client, long_model_dir):
    options = dict(model=long_model_dir.name, input=[{"role": "developer", "content": "Be brief."},
                                                     {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                   max_output_tokens=8, temperature=0)
    whole = client.responses.create(**options)
    with client.responses.stream(**options) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    for expected in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.output_item.done"):
        assert expected in types
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text


def test_parse_with_a_pydantic_model(client, long_model_dir):
    for seed in range(2):
        response = client.responses.parse(model=long_model_dir.name, input="Rate a word.", text_format=Answer,
                                          temperature=1.0, max_output_tokens=60, extra_body={"seed": seed})
        assert isinstance(response.output_parsed, Answer)


def test_function_tools_streamed_and_not(client, long_model_dir):
    options = dict(model=long_model_dir.name, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                   parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    whole = client.responses.create(**options)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    with client.responses.stream(**options) as stream:
        events = list(stream)
    arguments = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert arguments == done[0].arguments == calls[0].arguments


def test_store_previous_response_get_and_delete(client, server, long_model_dir, tokenizer):
    first = client.responses.create(model=long_model_dir.name, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    call = next(item for item in first.output if item.type == "function_call")
    second = client.responses.create(model=long_model_dir.name, previous_response_id=first.id, temperature=0, max_output_tokens=5,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}])
    assert second.previous_response_id == first.id
    conversation = [{"role": "user", "content": "Weather in Paris?"},  # stored, then the new input after it
                    {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function",
                                                                       "function": {"name": call.name, "arguments": call.arguments}}]},
                    {"role": "tool", "tool_call_id": call.call_id, "content": "18 degrees"}]
    assert second.usage.input_tokens == len(encode_chat(tokenizer, conversation).ids)
    assert client.responses.retrieve(first.id).id == first.id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=long_model_dir.name, previous_response_id=first.id, input="again")
    unstored = client.responses.create(model=long_model_dir.name, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "image", "url": "x"}]}, "input[0].type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"if": {}}}}}, "text.format.schema"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_requests_are_400s_naming_the_field(server, long_model_dir, body, param):
    with http_client(server.url) as http:
        response = http.post("/v1/responses", json={"model": long_model_dir.name, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_the_store_is_bounded_by_count_and_age(tmp_path):
    from server.responses.store import ResponseStore

    store = ResponseStore(tmp_path / "sub" / "responses.sqlite3", max_count=2, max_age_days=1)
    for index in range(3):
        store.put(f"resp_{index}", time.time() + index, {"id": f"resp_{index}"}, [{"role": "user", "content": str(index)}])
    assert store.get("resp_0") is None  # the oldest beyond max_count went
    assert store.get("resp_2") == ({"id": "resp_2"}, [{"role": "user", "content": "2"}])
    store.put("resp_old", time.time() - 2 * 86400, {"id": "resp_old"}, [])
    assert store.get("resp_old") is None and store.get("resp_1") is not None
    assert store.delete("resp_1") and not store.delete("resp_1")


def test_a_named_tool_choice_in_the_responses_shape(client, long_model_dir):
    response = client.responses.create(model=long_model_dir.name, input="Weather?", tools=[WEATHER], temperature=0,
                                       tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80)
    calls = [item for item in response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"] and response.status == "completed"
