"""Tool calling: the call parser, the grammar of each tool_choice, prompt rendering, and the OpenAI
and Ollama routes driven by their real clients (the tiny model is random: the grammar makes the calls).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from model.chat import encode_chat
from model.tokenizer import Tokenizer, TokenizerInfo
from server.engine.types import InvalidRequestError
from server.tools import ArgumentsDelta, CallStart, TextEvent, ToolCallParser, ToolConfig, parse_tool_calls
from tests.server_fixtures import ollama_client, openai_client, running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "type": "object", "properties": {"a": {"$ref": "#/$defs/small"}, "b": {"$ref": "#/$defs/small"}},
                                  "required": ["a", "b"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}  # parameterless
TOOLS = [WEATHER, ADD, NOW]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {tool["function"]["name"]: tool["function"].get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
           for tool in TOOLS}

TEXT = ('Let me check. <tool_call>{"name":"get_weather","arguments":{"city":"Pa\\"}ris","unit":"c"}}</tool_call>'
        '<tool_call>{"name":"now","arguments":{}}</tool_call>')


def stream_events(text: str, step: int) -> list:
    parser = ToolCallParser()
    events = []
    for start in range(0, len(text), step):
        events += parser.feed(text[start:start + step])
    return events + parser.finish()


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
def test_the_parser_streams_what_it_parses_whole(step):
    content, calls = parse_tool_calls(TEXT)
    assert content == "Let me check. " and [c["name"] for c in calls] == ["get_weather", "now"]
    assert [c["arguments"] for c in calls] == ['{"city":"Pa\\"}ris","unit":"c"}', "{}"]
    events = stream_events(TEXT, step)
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == content
    assert [e.name for e in events if isinstance(e, CallStart)] == ["get_weather", "now"]
    for index, call in enumerate(calls):
        assert "".join(e.fragment for e in events if isinstance(e, ArgumentsDelta) and e.index == index) == call["arguments"]


def test_the_parser_keeps_what_is_not_a_call_as_text():
    assert parse_tool_calls("a <tool_call>nonsense</tool_call> b <tool") == ("a <tool_call>nonsense</tool_call> b <tool", [])
    assert parse_tool_calls('<tool_call>{"arguments":{"x":1},"name":"f"}</tool_call>')[1][0]["arguments"] == '{"x":1}'
    assert parse_tool_calls('<tool_call>{"name":"f","argu') == ('<tool_call>{"name":"f","argu', [])
    cut = '<tool_call>{"name":"now","arguments":{}}</tool_call><tool_call>{"name":"f","arguments":{"a":'  # max_tokens
    content, calls = parse_tool_calls(cut)
    assert content == '<tool_call>{"name":"f","arguments":{"a":' and [(c["name"], c["arguments"]) for c in calls] == [("now", "{}")]


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "retrieval"}], None, "tools[0].type"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, "tools[0].function.parameters"),
    ([WEATHER, WEATHER], None, "tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as caught:
        ToolConfig.from_openai(tools, choice)
    assert caught.value.param == param


def test_tool_choice_none_means_no_tools():
    assert ToolConfig.from_openai(TOOLS, "none") is None and ToolConfig.from_openai(None, None) is None


def test_hearths_template_renders_tools_calls_and_results(tokenizer):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    text = tokenizer.decode(encode_chat(tokenizer, history, tools=[WEATHER]).ids, skip_special=False)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    assert '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}</tool_call>' in text
    assert "<tool_response>18 degrees</tool_response>" in text


def test_a_jinja_template_gets_tools_and_calls_as_transformers_passes_them(tokenizer):
    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
                "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% for c in m.tool_calls or [] %}"
                "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% endfor %}")
    imported = Tokenizer(tokenizer.backend, TokenizerInfo(chat_template="jinja", jinja_template=template))
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                                                             "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    text = imported.decode(encode_chat(imported, history, tools=[WEATHER]).ids, skip_special=False)
    assert text.startswith("TOOLS:get_weather;[user]")
    assert 'CALL get_weather {"city": "Paris", "unit": "c"}' in text and text.endswith("[tool]18 degrees")


# ------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def server(long_model_dir):
    with running_server(long_model_dir, kv_cache_blocks=1100) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


def check_calls(message, names=None):
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_one_of_the_tools(client, long_model_dir):
    """Parallel calls are allowed: a random model may chain calls until max_tokens; each complete one is valid."""
    finishes = []
    for seed in range(4):
        reply = client.chat.completions.create(model=long_model_dir.name, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                               temperature=1.0, seed=seed, max_completion_tokens=150)
        choice = reply.choices[0]
        check_calls(choice.message)
        finishes.append(choice.finish_reason)
        assert choice.finish_reason == "length" or choice.message.content is None  # a cut-off call stays text
    assert set(finishes) <= {"tool_calls", "length"} and finishes.count("tool_calls") >= 2


def test_a_named_function_is_called_exactly_once(client, long_model_dir):
    for name in ("add", "get_weather"):
        reply = client.chat.completions.create(model=long_model_dir.name, messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=1,
                                               tool_choice={"type": "function", "function": {"name": name}}, max_completion_tokens=80)
        message = reply.choices[0].message
        check_calls(message, {name})
        assert len(message.tool_calls) == 1 and reply.choices[0].finish_reason == "tool_calls"


def test_a_parameterless_tool_gets_empty_arguments(client, long_model_dir):
    reply = client.chat.completions.create(model=long_model_dir.name, messages=MESSAGES, tools=TOOLS, max_completion_tokens=40,
                                           tool_choice={"type": "function", "function": {"name": "now"}})
    assert [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls] == [("now", "{}")]


def test_no_parallel_calls_means_one(client, long_model_dir):
    for seed in range(3):
        reply = client.chat.completions.create(model=long_model_dir.name, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, temperature=1.0, seed=seed, max_completion_tokens=80)
        assert len(reply.choices[0].message.tool_calls) == 1


def test_streamed_calls_equal_the_non_streamed_ones_at_temperature_0(client, long_model_dir):
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        options = dict(model=long_model_dir.name, messages=MESSAGES, tools=TOOLS, tool_choice=choice, temperature=0,
                       parallel_tool_calls=False, max_completion_tokens=80)
        whole = client.chat.completions.create(**options).choices[0]
        calls, finish = {}, None
        for chunk in client.chat.completions.create(**options, stream=True):
            for part in chunk.choices:
                finish = part.finish_reason or finish
                for call in part.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                    if call.id:
                        assert entry["id"] is None and call.function.name  # id, type and name come once, first
                        entry.update(id=call.id, name=call.function.name)
                    entry["arguments"] += call.function.arguments or ""
        expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == expected
        assert finish == whole.finish_reason == "tool_calls"


def test_auto_gives_text_or_valid_calls(client, long_model_dir):
    for seed in range(4):
        reply = client.chat.completions.create(model=long_model_dir.name, messages=MESSAGES, tools=TOOLS, temperature=1.0,
                                               seed=seed, max_completion_tokens=40)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            check_calls(choice.message)
        else:
            assert "<tool_call>" not in (choice.message.content or "")


def test_a_tool_round_trip(client, long_model_dir):
    first = client.chat.completions.create(model=long_model_dir.name, messages=MESSAGES, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_completion_tokens=120).choices[0].message
    history = MESSAGES + [first.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "18 degrees and sunny"}]
    second = client.chat.completions.create(model=long_model_dir.name, messages=history, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_completion_tokens=8).choices[0]
    assert second.message.tool_calls is None and second.message.content


def test_unenforceable_parameters_are_a_400_naming_the_tool(client, long_model_dir):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=long_model_dir.name, messages=MESSAGES, tools=[WEATHER, bad], tool_choice="required")
    assert caught.value.body["param"] == "tools[1].function.parameters"


def lookup_word(word: str, language: str) -> str:
    """Look a word up in the dictionary.

    Args:
        word: the word
        language: its language
    """
    return word


def test_ollama_tools_from_a_python_function(server, long_model_dir):
    client = ollama_client(server.url)
    for seed in range(2):
        reply = client.chat(model=long_model_dir.name, messages=MESSAGES, tools=[lookup_word], options={"seed": seed, "num_predict": 40})
        for call in reply.message.tool_calls or []:  # the model may answer in text instead ("auto")
            assert call.function.name == "lookup_word" and isinstance(call.function.arguments, dict)
            assert set(call.function.arguments) == {"word", "language"}
        assert "<tool_call>" not in reply.message.content


def test_ollama_tool_calls_streamed_and_not(server, long_model_dir):
    client = ollama_client(server.url)
    for seed in range(3):
        options = {"seed": seed, "num_predict": 60, "temperature": 1.0}
        whole = client.chat(model=long_model_dir.name, messages=MESSAGES, tools=[WEATHER], options=options)
        streamed = list(client.chat(model=long_model_dir.name, messages=MESSAGES, tools=[WEATHER], stream=True, options=options))
        calls = [call for part in streamed for call in part.message.tool_calls or []]
        assert [(c.function.name, c.function.arguments) for c in calls] == \
               [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        assert "".join(part.message.content for part in streamed).strip() == whole.message.content.strip()
        for call in calls:
            jsonschema.validate(call.function.arguments, SCHEMAS["get_weather"])
    history = MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
                          {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"}]
    assert client.chat(model=long_model_dir.name, messages=history, options={"num_predict": 4}).done


def test_ollama_answers_carry_calls_as_objects_once_complete():
    """Ollama's answer objects: streamed, each call arrives whole in one object; the same calls as the whole answer."""
    from server.core.serving import ChoiceParser
    from server.engine.types import CompletionDelta
    from server.ollama.generation import MessageParts

    def steps(chunks):
        parser = ChoiceParser(0, None, tools=True)
        last = len(chunks) - 1
        return [parser.step(CompletionDelta(0, chunk, [], None, "stop" if i == last else None)) for i, chunk in enumerate(chunks)]

    whole_step, = steps([TEXT])
    whole = MessageParts().render(whole_step.parts, whole_step.finish.leftover)
    streamed, message = [], MessageParts()
    for step in steps([TEXT[i:i + 4] for i in range(0, len(TEXT), 4)]):
        streamed.append(message.render(step.parts, step.finish.leftover if step.finish else ""))
    expected = [{"function": {"name": "get_weather", "arguments": {"city": 'Pa"}ris', "unit": "c"}}},
                {"function": {"name": "now", "arguments": {}}}]
    assert whole == ("Let me check.", expected)
    assert [call for _, calls in streamed for call in calls or []] == expected
    assert sum(bool(calls) for _, calls in streamed) == 2
