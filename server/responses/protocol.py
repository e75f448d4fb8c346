"""The Responses API's request, and its parsing into API-neutral pieces.

Design choices:
- A request becomes the same pieces as a chat completion: chat messages for
  the template (`instructions` as the system turn, `input` as a string or
  items: messages, `function_call`, `function_call_output`), SamplingParams
  fields, a `GrammarSpec` from `text.format` (server/structured.py's
  json_schema / json_object) or a `ToolConfig` from function `tools` and
  `tool_choice` (server/tools.py). Only the field names differ, and every
  error names the Responses field.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.engine.grammar import GrammarSpec
from server.engine.types import InvalidRequestError
from server.structured import openai_grammar_spec
from server.tools import ToolConfig

# Engine field -> the Responses request field, for errors.
RESPONSES_FIELD_NAMES = {"max_tokens": "max_output_tokens"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "name", "description", "parameters", "strict"}]
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    seed: int | None = None  # an extra, as in chat
    user: str | None = None


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` -> chat messages (function calls and their outputs included)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role", "user"), item.get("role", "user"))
            messages.append({"role": role, "content": item_text(item.get("content"), f"input[{index}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise InvalidRequestError(f"input[{index}].type", f"input[{index}].type {kind!r} is not supported (message, function_call, function_call_output)")
    return messages


def item_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        if all(isinstance(t, str) for t in texts) and len(texts) == len(content):
            return "".join(texts)
    raise InvalidRequestError(where, f"{where} must be a string or a list of text parts (input_text / output_text)")


def tool_config(body: ResponsesRequest) -> ToolConfig | None:
    """Responses' flat function tools -> a ToolConfig; errors name the Responses field (tools[i].name)."""
    for index, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise InvalidRequestError(f"tools[{index}].type", f"tools[{index}].type: only function tools are supported")
    return ToolConfig.from_openai(body.tools, body.tool_choice, body.parallel_tool_calls, flat=True)


def format_spec(body: ResponsesRequest) -> GrammarSpec | None:
    text_format = (body.text or {}).get("format")
    if text_format is None:
        return None
    if not isinstance(text_format, dict):
        raise InvalidRequestError("text.format", "text.format must be an object with a 'type'")
    if text_format.get("type") == "json_schema":  # flat here: {"type", "name", "schema", "strict"}
        return GrammarSpec.json_schema(text_format.get("schema", {}), "text.format.schema")
    spec = openai_grammar_spec(text_format, {})
    return spec and GrammarSpec(spec.kind, spec.source, "text.format")


def sampling_fields(body: ResponsesRequest) -> dict[str, Any]:
    """SamplingParams fields; max_tokens None: the rest of the context."""
    return {
        "max_tokens": body.max_output_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
    }
