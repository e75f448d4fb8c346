"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, through the serving core.

Design choices:
- The route parses (server/responses/protocol.py), admits through the core
  like every generation route, and renders the core's events as output
  items: a `message` with one `output_text` part when there is text, then
  one `function_call` item per call (ids `call_...`), from the same parsed
  tool-call deltas as chat, so streamed argument deltas concatenate to the
  final arguments. `status` is "incomplete" with reason max_output_tokens
  when generation ran out of tokens. Calls are parsed only when the request
  has tools (as in chat).
- Streaming sends typed SSE events (`event: TYPE` + `data: {...}` with a
  `sequence_number`): response.created, response.in_progress, per item
  output_item.added / content_part.added / output_text.delta ... .done /
  function_call_arguments.delta / .done / output_item.done, then
  response.completed; a failure mid-stream is an `error` event.
- `store` (default true) keeps the response and its conversation in SQLite
  (server/responses/store.py, in the data folder, bounded by count and age);
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
from starlette.responses import Response

from model.chat import encode_chat
from server.core.events import ChoiceStep, UsageEvent
from server.core.http import SSE_HEADERS, CancellingStreamingResponse, collect_unless_disconnected, parse_body
from server.core.serving import Generation, GenerationInput, admit, serve
from server.engine.types import InvalidRequestError
from server.http_errors import APIError, to_api_error
from server.responses.protocol import (
    RESPONSES_FIELD_NAMES,
    ResponsesRequest,
    format_spec,
    input_messages,
    sampling_fields,
    tool_config,
)
from server.responses.store import ResponseStore
from server.tools import ArgumentsDelta, CallEnd, CallStart, TextEvent

router = APIRouter(prefix="/v1", tags=["responses"])


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


@dataclass
class Job:
    """One admitted response: what its answer and events repeat."""

    response_id: str
    created_at: int
    model: str
    body: ResponsesRequest
    conversation: list[dict[str, Any]]  # chat messages of the whole conversation so far (no instructions)
    items: list[dict[str, Any]] = field(default_factory=list)  # output items, in order


async def response_input(request: Request, body: ResponsesRequest, served: Any) -> tuple[GenerationInput, list[dict[str, Any]]]:
    """The request as core input, and the conversation so far (to store)."""
    conversation = await previous_conversation(request, body.previous_response_id) + input_messages(body.input)
    tools, spec = tool_config(body), format_spec(body)
    if tools and spec:
        raise InvalidRequestError("text.format", "text.format cannot be combined with tools")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    prompt_ids = encode_chat(served.tokenizer, system + conversation, tools=tools and tools.template_tools()).ids
    return GenerationInput([prompt_ids], sampling_fields(body), spec, tools, prompt_field="input"), conversation


@router.post("/responses")
async def create_response(request: Request) -> Response:
    body = await parse_body(request, ResponsesRequest)
    served = request.app.state.registry.get(body.model)
    job_input, conversation = await response_input(request, body, served)
    job = Job(new_id("resp"), int(time.time()), served.model_id, body, conversation)
    generation = await admit(served, job_input, job.response_id, RESPONSES_FIELD_NAMES)
    store = store_of(request) if body.store else None
    if body.stream:
        events = sse_events(job, generation, store)
        return CancellingStreamingResponse(events, streams=generation.streams, media_type="text/event-stream", headers=SSE_HEADERS)
    answer = await collect_unless_disconnected(request, run_to_end(job, generation), generation.streams)
    if store is not None:
        await asyncio.to_thread(save, store, job, answer)
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


# ------------------------------------------------------------------ events -> items


class ItemBuilder:
    """Turns the core's text and tool-call deltas into output items as they arrive, yielding typed events."""

    def __init__(self, job: Job):
        self.job = job
        self.message: dict[str, Any] | None = None  # the open message item
        self.calls: dict[int, dict[str, Any]] = {}  # call index -> its function_call item

    def feed(self, step: ChoiceStep) -> list[dict[str, Any]]:
        events = []
        for part in step.parts:
            events += self._on(part)
        return events + (self.close_message() if step.finish else [])

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
        if not text or (self.message is None and not text.strip() and self.calls):
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


async def generation_events(job: Job, generation: Generation) -> AsyncIterator[dict[str, Any]]:
    """Every typed event of one response, the final `response.completed` included."""
    builder = ItemBuilder(job)
    yield {"type": "response.created", "response": response_object(job, "in_progress")}
    yield {"type": "response.in_progress", "response": response_object(job, "in_progress")}
    finish_reason, usage = None, None
    async for event in serve(generation):
        if isinstance(event, UsageEvent):
            usage = event.usage
            continue
        finish_reason = event.finish.reason if event.finish else finish_reason
        for item_event in builder.feed(event):
            yield item_event
    yield {"type": "response.completed", "response": response_object(job, "completed", finish_reason, usage)}


async def run_to_end(job: Job, generation: Generation) -> dict[str, Any]:
    final = None
    async for event in generation_events(job, generation):
        final = event
    return final["response"]


async def sse_events(job: Job, generation: Generation, store: ResponseStore | None) -> AsyncIterator[str]:
    sequence = 0
    try:
        async for event in generation_events(job, generation):
            if event["type"] == "response.completed" and store is not None:
                await asyncio.to_thread(save, store, job, event["response"])
            yield frame({**event, "sequence_number": sequence})
            sequence += 1
    except Exception as exc:  # mid-stream: report in-band, as OpenAI does
        error = to_api_error(exc)
        yield frame({"type": "error", "code": error.code, "message": error.message, "param": error.param, "sequence_number": sequence})


def frame(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
