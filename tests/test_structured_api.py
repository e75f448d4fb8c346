"""Structured outputs over HTTP with the real clients: openai's `.parse` with a pydantic model,
streamed json_schema with n = 2, vLLM's extras, Ollama's `format`, and 400s for what cannot be enforced.

The tiny model is random: only the grammar makes these outputs valid.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server_fixtures import ollama_client, openai_client

MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


class Pet(BaseModel):
    name: str = Field(max_length=8)
    species: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


PET_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["name", "legs"], "additionalProperties": False}




def test_openai_parse_with_a_pydantic_model(server, tiny_model_dir):
    client = openai_client(server.url)
    for seed in range(3):
        reply = client.chat.completions.parse(model=tiny_model_dir.name, messages=MESSAGES, response_format=Pet,
                                              temperature=1.0, seed=seed, max_completion_tokens=120)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet)  # the SDK parsed and validated it
        assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_streamed_json_schema_with_two_choices(server, tiny_model_dir):
    client = openai_client(server.url)
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
    stream = client.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES, response_format=response_format,
                                            n=2, temperature=1.0, seed=11, max_completion_tokens=80, stream=True)
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), PET_SCHEMA)
    assert texts[0] != texts[1]


def test_json_object_and_logprobs(server, tiny_model_dir):
    client = openai_client(server.url)
    reply = client.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES, response_format={"type": "json_object"},
                                           temperature=1.0, seed=2, max_completion_tokens=60, logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")
    raw = b"".join(bytes(entry.bytes) for entry in choice.logprobs.content)
    assert raw.decode("utf-8", errors="replace") == choice.message.content
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in choice.logprobs.content)


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_choice": ["alpha", "beta"]}, lambda text: text in ("alpha", "beta")),
    ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda text: len(text) == 6 and text[3] == "-" and text[:3].isdigit()),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda text: text in ("left", "right")),
    ({"structured_outputs": {"json": PET_SCHEMA}}, lambda text: jsonschema.validate(json.loads(text), PET_SCHEMA) is None),
    ({"guided_json": json.dumps(PET_SCHEMA)}, lambda text: jsonschema.validate(json.loads(text), PET_SCHEMA) is None),
    ({"structured_outputs": {"grammar": 'start: "x" DIGIT DIGIT\nDIGIT: /[0-9]/'}}, lambda text: len(text) == 3 and text[0] == "x"),
])
def test_vllm_extras_on_completions_and_chat(http, tiny_model_dir, extra, check):
    body = {"model": tiny_model_dir.name, "prompt": "Answer:", "max_tokens": 60, "temperature": 1.0, "seed": 5, **extra}
    completion = http.post("/v1/completions", json=body).json()["choices"][0]
    chat_body = {"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 60, "temperature": 1.0, "seed": 5, **extra}
    chat = http.post("/v1/chat/completions", json=chat_body).json()["choices"][0]
    for text, finish in ((completion["text"], completion["finish_reason"]), (chat["message"]["content"], chat["finish_reason"])):
        assert finish == "stop" and check(text), text


@pytest.mark.parametrize(("response_format", "param"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(["}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400(http, tiny_model_dir, response_format, param):
    body = {"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 5, "response_format": response_format}
    response = http.post("/v1/chat/completions", json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and error["message"].startswith(param.split(".")[0])


def test_two_constraints_at_once_are_a_400(http, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "messages": MESSAGES, "response_format": {"type": "json_object"}, "guided_regex": "a+"}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_regex"


def test_ollama_format_schema_and_json(server, tiny_model_dir):
    client = ollama_client(server.url)
    for seed in range(2):
        reply = client.chat(model=tiny_model_dir.name, messages=MESSAGES, format=Pet.model_json_schema(),
                            options={"seed": seed, "num_predict": 120})
        assert reply.done_reason == "stop"
        Pet.model_validate_json(reply.message.content)
    streamed = "".join(part.message.content for part in client.chat(
        model=tiny_model_dir.name, messages=MESSAGES, format=PET_SCHEMA, options={"seed": 4, "num_predict": 80}, stream=True))
    jsonschema.validate(json.loads(streamed), PET_SCHEMA)
    generated = client.generate(model=tiny_model_dir.name, prompt="JSON:", format="json", options={"seed": 1, "num_predict": 100})
    if generated.done_reason == "stop":
        assert isinstance(json.loads(generated.response), dict)


def test_ollama_format_that_cannot_be_enforced_is_a_400(http, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "messages": MESSAGES, "format": {"type": "string", "format": "bogus"}, "stream": False}
    response = http.post("/api/chat", json=body)
    assert response.status_code == 400 and response.json()["error"].startswith("format cannot be enforced")
