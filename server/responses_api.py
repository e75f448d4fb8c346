"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

Design choices:
- A request becomes the same API-neutral pieces as a chat completion: chat
  messages for the template (`instructions` as the system turn, `input` as a
  string or items: messages, `function_call`, `function_call_output`), a
  `SamplingParams`, a `GrammarSpec` from `text.format` (server/structured.py's
  json_schema / json_object) or a `ToolConfig` from function `tools` and
  `tool_choice` (server/tools.py). Only the field names differ.
- Output items: a `message` with one `output_text` part when there is text,
  then one `function_call` item per call (ids `call_...`), parsed by the same
  parser as chat, so streamed argument deltas concatenate to the final
  arguments. `status` is "incomplete" with reason max_output_tokens when
  generation ran out of tokens.
- Streaming sends typed SSE events (`event: TYPE` + `data: {...}` with a
  `sequence_number`): response.created, response.in_progress, per item
  output_item.added / content_part.added / output_text.delta ... .done /
  function_call_arguments.delta / .done / output_item.done, then
  response.completed; a failure mid-stream is an `error` event.
- `store` (default true) keeps the response and its conversation in SQLite
  (server/response_store.py, in the data folder, bounded by count and age);
  `previous_response_id` continues from the stored conversation (its
  instructions are not carried over, as OpenAI documents).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from model.chat import encode_chat
from server.engine.grammar import GrammarSpec
from server.engine.types import InvalidRequestError, SamplingParams
from server.generation import (
    SSE_HEADERS,
    AdmittedStream,
    CancellingStreamingResponse,
    check_context,
    check_params,
    collect_unless_disconnected,
    parse_body,
    remaining_context,
    start_generation,
)
from server.http_errors import APIError, to_api_error
from server.response_store import ResponseStore
from server.structured import attach_grammar, openai_grammar_spec
from server.tools import ArgumentsDelta, CallEnd, CallStart, TextEvent, ToolCallParser, ToolConfig, tool_grammar_spec

router = APIRouter(prefix="/v1", tags=["responses"])

PARAM_NAMES = {"max_tokens": "max_output_tokens"}


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


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def store_of(request: Request) -> ResponseStore:
    """The app's response store, made on first use from its settings."""
    state = request.app.state
    if getattr(state, "response_store", None) is None:
        settings = state.settings
        path = Path(settings.data_dir).expanduser() / "responses.sqlite3"
        state.response_store = ResponseStore(path, settings.responses_max_count, settings.responses_max_age_days)
    return state.response_store


# ------------------------------------------------------------------ request -> neutral pieces


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
    """Responses' flat function tools -> the chat shape; errors name the Responses field."""
    tools = None
    if body.tools:
        tools = []
        for index, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise InvalidRequestError(f"tools[{index}].type", f"tools[{index}].type: only function tools are supported")
            tools.append({"type": "function", "function": {k: tool.get(k) for k in ("name", "description", "parameters") if tool.get(k) is not None}})
    try:
        return ToolConfig.from_openai(tools, body.tool_choice, body.parallel_tool_calls)
    except InvalidRequestError as exc:
        param = (exc.param or "").replace(".function.", ".")
        raise InvalidRequestError(param, str(exc).replace(".function.", ".")) from None


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


def sampling_params(body: ResponsesRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=body.max_output_tokens or max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
    )


# ------------------------------------------------------------------ the route


@dataclass
class Job:
    """One admitted response: what its answer and events repeat."""

    response_id: str
    created_at: int
    model: str
    body: ResponsesRequest
    conversation: list[dict[str, Any]]  # chat messages of the whole conversation so far (no instructions)
    prompt_tokens: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)  # output items, in order


@router.post("/responses")
async def create_response(request: Request) -> Response:
    body = await parse_body(request, ResponsesRequest)
    served = request.app.state.registry.get(body.model)
    conversation = await previous_conversation(request, body.previous_response_id) + input_messages(body.input)
    tools = tool_config(body)
    spec = format_spec(body)
    if tools and spec:
        raise InvalidRequestError("text.format", "text.format cannot be combined with tools")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    prompt_ids = encode_chat(served.tokenizer, system + conversation, tools=tools and tools.template_tools()).ids
    params = sampling_params(body, remaining_context(len(prompt_ids), served.max_seq_len))
    check_params(params, served.tokenizer.vocab_size, PARAM_NAMES)
    await attach_grammar(params, served.engine, await tool_grammar_spec(served.engine, tools) if tools else spec)
    check_context(len(prompt_ids), params, served.max_seq_len, "input")
    job = Job(new_id("resp"), int(time.time()), served.model_id, body, conversation, len(prompt_ids))
    outputs = await start_generation(served.engine, job.response_id, prompt_ids, params)
    if body.stream:
        events = sse_events(job, outputs, store_of(request) if body.store else None)
        return CancellingStreamingResponse(events, streams=[outputs], media_type="text/event-stream", headers=SSE_HEADERS)
    answer = await collect_unless_disconnected(request, run_to_end(job, outputs), [outputs])
    if body.store:
        await asyncio.to_thread(save, store_of(request), job, answer)
    return Response(json.dumps(answer), media_type="application/json")


async def previous_conversation(request: Request, previous_id: str | None) -> list[dict[str, Any]]:
    if previous_id is None:
        return []
    stored = await asyncio.to_thread(store_of(request).get, previous_id)
    if stored is None:
        raise APIError(404, f"previous response '{previous_id}' not found (never stored, expired or deleted)",
                       param="previous_response_id", code="response_not_found")
    return stored[1]


def save(store: ResponseStore, job: Job, answer: dict[str, Any]) -> None:
    store.put(job.response_id, time.time(), answer, job.conversation + output_messages(job.items))


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The response's output as chat messages, for a later previous_response_id."""
    text = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text}
    return [{**message, "tool_calls": calls} if calls else message]


@router.get("/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> Response:
    stored = await asyncio.to_thread(store_of(request).get, response_id)
    if stored is None:
        raise APIError(404, f"response '{response_id}' not found", param="response_id", code="response_not_found")
    return Response(json.dumps(stored[0]), media_type="application/json")


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    if not await asyncio.to_thread(store_of(request).delete, response_id):
        raise APIError(404, f"response '{response_id}' not found", param="response_id", code="response_not_found")
    return {"id": response_id, "object": "response", "deleted": True}


# ------------------------------------------------------------------ generation -> items


class ItemBuilder:
    """Turns the generated text into output items as it arrives, yielding typed events."""

    def __init__(self, job: Job):
        self.job = job
        self.parser = ToolCallParser()
        self.message: dict[str, Any] | None = None  # the open message item
        self.calls: dict[int, dict[str, Any]] = {}  # call index -> its open function_call item

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        events = []
        for event in self.parser.feed(text) + (self.parser.finish() if final else []):
            events += self._on(event)
        return events + (self.close_message() if final else [])

    def _on(self, event: Any) -> list[dict[str, Any]]:
        if isinstance(event, TextEvent):
            return self._text(event.text)
        if isinstance(event, CallStart):
            return self.close_message() + self._call_start(event)
        if isinstance(event, ArgumentsDelta):
            item = self.calls[event.index]
            item["arguments"] += event.fragment
            return [{"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": self.index(item),
                     "delta": event.fragment}]
        if isinstance(event, CallEnd):
            item = self.calls[event.index]
            item["status"] = "completed"
            return [{"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": self.index(item),
                     "name": item["name"], "arguments": item["arguments"]},
                    {"type": "response.output_item.done", "output_index": self.index(item), "item": item}]
        return []

    def index(self, item: dict[str, Any]) -> int:
        return next(i for i, each in enumerate(self.job.items) if each is item)

    def _text(self, text: str) -> list[dict[str, Any]]:
        if not text or (self.message is None and not text.strip() and self.parser.calls):
            return []
        events = []
        if self.message is None:
            self.message = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant", "content": []}
            self.job.items.append(self.message)
            part = {"type": "output_text", "text": "", "annotations": []}
            events += [{"type": "response.output_item.added", "output_index": self.index(self.message), "item": dict(self.message, content=[])},
                       {"type": "response.content_part.added", "item_id": self.message["id"], "output_index": self.index(self.message),
                        "content_index": 0, "part": part}]
            self.message["content"].append(dict(part))
        self.message["content"][0]["text"] += text
        return events + [{"type": "response.output_text.delta", "item_id": self.message["id"], "output_index": self.index(self.message),
                          "content_index": 0, "delta": text, "logprobs": []}]

    def close_message(self) -> list[dict[str, Any]]:
        if self.message is None:
            return []
        message, self.message = self.message, None
        message["status"] = "completed"
        position = {"item_id": message["id"], "output_index": self.index(message), "content_index": 0}
        part = message["content"][0]
        return [{"type": "response.output_text.done", **position, "text": part["text"], "logprobs": []},
                {"type": "response.content_part.done", **position, "part": part},
                {"type": "response.output_item.done", "output_index": position["output_index"], "item": message}]

    def _call_start(self, event: CallStart) -> list[dict[str, Any]]:
        item = {"type": "function_call", "id": new_id("fc"), "call_id": event.call_id, "name": event.name, "arguments": "",
                "status": "in_progress"}
        self.calls[event.index] = item
        self.job.items.append(item)
        return [{"type": "response.output_item.added", "output_index": self.index(item), "item": dict(item)}]


def response_object(job: Job, status: str, finish_reason: str | None = None, usage: Any = None) -> dict[str, Any]:
    body = job.body
    incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
    return {
        "id": job.response_id, "object": "response", "created_at": job.created_at, "model": job.model,
        "status": "incomplete" if incomplete and status == "completed" else status,
        "incomplete_details": incomplete, "error": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature, "top_p": 1.0 if body.top_p is None else body.top_p,
        "output": [item for item in job.items if status != "in_progress"],
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": body.previous_response_id,
        "store": body.store is not False, "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "metadata": body.metadata or {},
        "usage": usage_object(job, usage),
    }


def usage_object(job: Job, usage: Any) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


async def generation_events(job: Job, outputs: AdmittedStream) -> AsyncIterator[dict[str, Any]]:
    """Every typed event of one response, the final `response.completed` included."""
    builder = ItemBuilder(job)
    yield {"type": "response.created", "response": response_object(job, "in_progress")}
    yield {"type": "response.in_progress", "response": response_object(job, "in_progress")}
    finish_reason, usage = None, None
    async for output in outputs:
        for delta in output.deltas:
            finish_reason = delta.finish_reason or finish_reason
            for event in builder.feed(delta.text, delta.finish_reason is not None):
                yield event
        usage = output.usage or usage
    yield {"type": "response.completed", "response": response_object(job, "completed", finish_reason, usage)}


async def run_to_end(job: Job, outputs: AdmittedStream) -> dict[str, Any]:
    final = None
    async for event in generation_events(job, outputs):
        final = event
    return final["response"]


async def sse_events(job: Job, outputs: AdmittedStream, store: ResponseStore | None) -> AsyncIterator[str]:
    sequence = 0
    try:
        async for event in generation_events(job, outputs):
            if event["type"] == "response.completed" and store is not None:
                await asyncio.to_thread(save, store, job, event["response"])
            yield frame({**event, "sequence_number": sequence})
            sequence += 1
    except Exception as exc:  # mid-stream: report in-band, as OpenAI does
        error = to_api_error(exc)
        yield frame({"type": "error", "code": error.code, "message": error.message, "param": error.param, "sequence_number": sequence})


def frame(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
