"""Tool calling, API-neutral: tool specs, the grammar a tool choice implies, and the parser
that turns generated text into text and tool calls (whole or streamed).

    config = ToolConfig.from_openai(body.tools, body.tool_choice, body.parallel_tool_calls)
    spec = config.grammar_spec()                    # None for tool_choice "none"
    parser = ToolCallParser()
    for fragment in texts: events = parser.feed(fragment)   # TextEvent / CallStart / ArgumentsDelta
    events += parser.finish()

Design choices:
- The call syntax is the ChatML/Hermes one that Qwen-style templates use:
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and Hearth's
  own template teaches the same (model/chat.py renders the tools and earlier
  calls in it).
- tool_choice maps to a Lark grammar with one `%json` rule per tool (each
  tool's schema keeps its own `$defs` at its root, so `$ref`s resolve):
  "required" = one call or more (one when parallel_tool_calls is false),
  a named function = exactly one call of it, "auto" = plain text that never
  contains `<tool_call>`, or text then calls; "none" = no tools at all
  (they are not even rendered).
- Every tool's parameters are compiled on their own first, so a schema that
  cannot be enforced is a 400 naming `tools[i].function.parameters`.
- JSON in calls is compact (the grammar allows no whitespace), so the
  arguments are streamed as the raw text the model wrote: the streamed
  fragments concatenate to exactly the non-streamed arguments, and a
  parameterless tool gives "{}".
- The same parser serves both: a non-streamed answer is the parser fed the
  whole text at once. A call cut off by max_tokens is not a call in a whole
  answer (its raw text stays in the content, finish_reason "length"); a
  stream has already sent its start and argument fragments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.engine.grammar import GrammarSpec, close_objects
from server.engine.types import InvalidRequestError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NO_PARAMETERS = {"type": "object", "properties": {}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema for the arguments object
    parameters_field: str = "tools"  # where the request holds the schema (errors name it)

    def as_openai(self) -> dict[str, Any]:
        """The shape chat templates (transformers) and OpenAI use."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolConfig:
    tools: tuple[ToolSpec, ...]
    mode: str  # "auto", "required" or "function" ("none" never makes a config)
    function: str | None = None  # the forced tool, for mode "function"
    parallel: bool = True

    @classmethod
    def from_openai(cls, tools: Any, tool_choice: Any = None, parallel: bool | None = None, field: str = "tools",
                    flat: bool = False) -> "ToolConfig | None":
        """OpenAI's (and Ollama's) tools + tool_choice -> a config, or None when no tool may be called.

        flat: the Responses API's tools, {"type", "name", "parameters"...} without the "function" level."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidRequestError("tool_choice", "tool_choice needs tools")
            return None
        if not isinstance(tools, list):
            raise InvalidRequestError(field, f"{field} must be a list of tools")
        specs = tuple(parse_tool(tool, f"{field}[{index}]", flat) for index, tool in enumerate(tools))
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise InvalidRequestError(field, f"{field}: tool names must be unique")
        mode, function = parse_tool_choice(tool_choice, names)
        if mode == "none":
            return None
        return cls(specs, mode, function, True if parallel is None else bool(parallel))

    def template_tools(self) -> list[dict[str, Any]]:
        """Every tool, as the chat template renders them."""
        return [tool.as_openai() for tool in self.tools]

    def callable_tools(self) -> tuple[ToolSpec, ...]:
        return tuple(t for t in self.tools if self.function is None or t.name == self.function)

    def grammar_spec(self) -> GrammarSpec:
        """The Lark grammar of this choice: calls (and for auto, text) in the template's syntax."""
        bodies = [f"call_{i}: %json {json.dumps(call_schema(tool))}" for i, tool in enumerate(self.callable_tools())]
        body = "body: " + " | ".join(f"call_{i}" for i in range(len(bodies)))
        more = " more*" if self.parallel and self.mode != "function" else ""
        call = f'"{CALL_OPEN}" body "{CALL_CLOSE}"'
        if self.mode == "auto":
            start = f'start: TEXT | lead body "{CALL_CLOSE}"{more}\n'
            start += f'TEXT: /(.|\\n)+/ & ~/(.|\\n)*{re.escape(CALL_OPEN)}(.|\\n)*/\n'
            start += f'lead[suffix="{CALL_OPEN}"]: /(.|\\n)*/\n'
        else:
            start = f"start: {call}{more}\n"
        lark = start + f"more: {call}\n{body}\n" + "\n".join(bodies) + "\n"
        return GrammarSpec.lark(lark, "tools")


def parse_tool(tool: Any, where: str, flat: bool = False) -> ToolSpec:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequestError(f"{where}.type", f"{where}: only tools of type 'function' are supported")
    function, path = (tool, where) if flat else (tool.get("function"), f"{where}.function")
    if not isinstance(function, dict):
        raise InvalidRequestError(path, f"{path} must be an object with a 'name'")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise InvalidRequestError.for_field(f"{path}.name", "must be 1-64 letters, digits, '_', '.' or '-'")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = NO_PARAMETERS
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequestError.for_field(f"{path}.parameters", "must be a JSON schema of type object")
    description = function.get("description") or ""
    return ToolSpec(name, description if isinstance(description, str) else "", parameters, f"{path}.parameters")


def parse_tool_choice(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return tool_choice or "auto", None
    name = None
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
    elif isinstance(tool_choice, dict):
        name = tool_choice.get("name")  # the Responses API's {"type": "function", "name": ...}
    if not isinstance(name, str):
        raise InvalidRequestError("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in names:
        raise InvalidRequestError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
    return "function", name


def call_schema(tool: ToolSpec) -> dict[str, Any]:
    """{"name": <this tool>, "arguments": <its parameters>}, with the parameters' $defs at the root."""
    parameters = close_objects(tool.parameters)
    definitions = {key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters}
    properties = {"name": {"const": tool.name}, "arguments": parameters}
    schema = {"type": "object", "properties": properties, "required": ["name", "arguments"], "additionalProperties": False}
    return {**schema, **definitions, "x-guidance": {"whitespace_flexible": False}}


def parameter_specs(config: ToolConfig) -> list[GrammarSpec]:
    """One spec per callable tool's parameters: compiled first, so errors name the tool."""
    return [GrammarSpec.json_schema(tool.parameters, tool.parameters_field) for tool in config.callable_tools()]


async def tool_grammar_spec(engine: Any, config: ToolConfig) -> GrammarSpec:
    """Compile each callable tool's parameters (errors name the tool), then return the call grammar."""
    for spec in parameter_specs(config):
        await engine.grammars.compile_async(spec)
    return config.grammar_spec()


# ------------------------------------------------------------------ parsing the output


@dataclass
class TextEvent:
    text: str


@dataclass
class CallStart:
    index: int  # which call of this choice (0, 1, ...)
    call_id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    fragment: str  # raw JSON text of the arguments; all fragments of a call concatenate to its arguments


@dataclass
class CallEnd:
    index: int
    call_id: str = ""
    name: str = ""
    arguments: str = ""  # the call's whole arguments (raw JSON text)


_CALL_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCallParser:
    """Splits generated text into plain text and `<tool_call>` blocks, incrementally."""

    in_call: bool = False
    pending: str = ""  # text not yet emitted: a possible start of CALL_OPEN, or the current call's text
    calls: int = 0  # calls started
    arguments_sent: int = -1  # characters of the current call's arguments emitted; -1: call not started
    head_length: int = 0  # length of '{"name":"...","arguments":' in pending
    current: dict[str, Any] | None = None  # the call being generated: {"id", "name", "arguments"}
    finished_calls: list[dict[str, Any]] = field(default_factory=list)  # complete calls, in order
    unfinished: str = ""  # at finish: the raw text of a call cut off before its end (max_tokens)

    def feed(self, text: str) -> list[Any]:
        self.pending += text
        events: list[Any] = []
        while True:
            progressed = self._call_step(events) if self.in_call else self._text_step(events)
            if not progressed:
                return events

    def finish(self) -> list[Any]:
        """End of generation: flush what is left (an unfinished call stays as it was streamed)."""
        events: list[Any] = []
        if not self.in_call and self.pending:
            events.append(TextEvent(self.pending))
        elif self.in_call and self.arguments_sent < 0:
            events.append(TextEvent(CALL_OPEN + self.pending))  # never became a call: it was text
        elif self.in_call:
            self.unfinished = CALL_OPEN + self.pending  # streamed as a call already; whole answers keep it as text
        self.pending = ""
        return events

    def _text_step(self, events: list[Any]) -> bool:
        start = self.pending.find(CALL_OPEN)
        if start < 0:
            keep = _partial_suffix(self.pending, CALL_OPEN)
            if len(self.pending) > keep:
                events.append(TextEvent(self.pending[: len(self.pending) - keep]))
                self.pending = self.pending[len(self.pending) - keep:]
            return False
        if start:
            events.append(TextEvent(self.pending[:start]))
        self.pending = self.pending[start + len(CALL_OPEN):]
        self.in_call, self.arguments_sent = True, -1
        return True

    def _call_step(self, events: list[Any]) -> bool:
        if self.arguments_sent < 0:
            head = _CALL_HEAD.match(self.pending)
            if head is None:
                return self._call_without_head(events)
            name = json.loads(head.group(1))
            self._start_call(events, name)
            self.head_length = head.end()
            self.arguments_sent = 0
        arguments = self.pending[self.head_length:]
        end = _json_value_end(arguments)
        visible = arguments if end is None else arguments[:end]
        if len(visible) > self.arguments_sent:
            events.append(ArgumentsDelta(self.calls - 1, visible[self.arguments_sent:]))
            self.arguments_sent = len(visible)
        close = self.pending.find(CALL_CLOSE, self.head_length + (end or len(arguments)))
        if end is None or close < 0:
            return False
        self._end_call(events, visible)
        self.pending = self.pending[close + len(CALL_CLOSE):]
        return True

    def _call_without_head(self, events: list[Any]) -> bool:
        """A call whose JSON does not start with "name" then "arguments": parse it whole once closed."""
        close = self.pending.find(CALL_CLOSE)
        if close < 0:
            return False
        raw, self.pending = self.pending[:close], self.pending[close + len(CALL_CLOSE):]
        try:
            call = json.loads(raw)
            name, arguments = call["name"], call.get("arguments", {})
            assert isinstance(name, str) and isinstance(arguments, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            self.in_call = False
            events.append(TextEvent(CALL_OPEN + raw + CALL_CLOSE))  # not a call after all: keep it as text
            return True
        self._start_call(events, name)
        text = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        events.append(ArgumentsDelta(self.calls - 1, text))
        self._end_call(events, text)
        return True

    def _start_call(self, events: list[Any], name: str) -> None:
        events.append(CallStart(self.calls, new_call_id(), name))
        self.current = {"id": events[-1].call_id, "name": name, "arguments": ""}
        self.calls += 1

    def _end_call(self, events: list[Any], arguments: str) -> None:
        call = {**self.current, "arguments": arguments}
        self.finished_calls.append(call)
        self.current = None
        events.append(CallEnd(self.calls - 1, call["id"], call["name"], arguments))
        self.in_call, self.arguments_sent, self.head_length = False, -1, 0


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that is a proper start of marker (held back)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def _json_value_end(text: str) -> int | None:
    """Where the JSON value at the start of text ends (its length), or None if it is not complete yet."""
    depth, in_string, escaped = 0, False, False
    for position, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return position + 1
    return None


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """A whole answer -> (its text outside complete calls, [{"id", "name", "arguments" (raw JSON text)}]).

    A call cut off by max_tokens is not a call: its raw text stays in the content."""
    parser = ToolCallParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(event.text for event in events if isinstance(event, TextEvent)) + parser.unfinished
    return content, parser.finished_calls
