"""POST /api/chat and /api/generate: a request -> the serving core -> Ollama answer objects.

Design choices:
- Streaming is the default, as in Ollama: one JSON object per line
  (`application/x-ndjson`); `"stream": false` gives one object. The final
  object has done true, done_reason and the timings in nanoseconds.
- /api/generate applies the chat template to the prompt (as Ollama applies
  the model's template) unless `raw` is true; `context` from a previous
  answer is prepended, and the final object returns the new context.
- A request with no prompt (or no messages) only "loads" the model, as
  Ollama's clients use it to warm a model: done at once, done_reason "load".
- Streamed, an object is sent for each engine step with text or logprobs;
  tool calls go into `message.tool_calls` (arguments as objects), each in
  the object of the step that completes it, and the content is stripped once
  a call has started. A call cut off by num_predict stays text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from starlette.responses import Response

from model.chat import encode_chat
from server.core.events import ChoiceStep, Logprob, Part, UsageEvent
from server.core.http import CancellingStreamingResponse, collect_unless_disconnected, new_id, parse_body
from server.core.serving import Generation, GenerationInput, admit, collect, serve
from server.engine.types import InvalidRequestError, Usage
from server.http_errors import to_api_error
from server.ollama.protocol import (
    OLLAMA_FIELD_NAMES,
    AlternativeLogprob,
    ChatRequest,
    ChatResponse,
    GenerateRequest,
    GenerateResponse,
    Logprob as OllamaLogprob,
    Options,
    ResponseMessage,
    now_rfc3339,
)
from server.registry import ModelRegistry, ServedModel, request_load_seconds
from server.tools import CallEnd, CallStart, TextEvent

NDJSON = "application/x-ndjson"


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


@dataclass
class Piece:
    """What one answer object carries besides the final fields."""

    content: str
    tool_calls: list[dict[str, Any]] | None = None  # [{"function": {"name", "arguments": {...}}}]
    logprobs: list[OllamaLogprob] | None = None


@dataclass
class FinalFields:
    """What the last object adds: done_reason, timings, and the tokens for `context`."""

    done_reason: str
    stats: dict[str, int]
    generated_ids: list[int]


MakeObject = Callable[[Piece, "FinalFields | None"], Any]


@dataclass
class OllamaJob:
    """One admitted Ollama generation and what its answer objects repeat."""

    model_name: str  # as the client spelled it (echoed back, like Ollama)
    prompt_ids: list[int]
    generation: Generation
    started: float  # perf_counter at arrival, for total_duration


async def admit_job(body: Any, served: ServedModel, prompt_ids: list[int], started: float, tools: Any = None) -> OllamaJob:
    limit = (body.options or Options()).context_limit(served.max_seq_len)
    job = GenerationInput([prompt_ids], body.sampling_fields(), None if tools else body.grammar_spec(), tools, limit, "prompt")
    generation = await admit(served, job, new_id("ollama"), OLLAMA_FIELD_NAMES)
    return OllamaJob(body.model, prompt_ids, generation, started)


# ------------------------------------------------------------------ events -> answer objects


def to_ns(seconds: float) -> int:
    return int(seconds * 1e9)


def timings(job: OllamaJob, usage: Usage | None) -> dict[str, int]:
    """The final object's statistics, in nanoseconds."""
    usage = usage or Usage(len(job.prompt_ids), 0, 0, 0.0, 0.0, 0.0)
    return {
        "total_duration": to_ns(time.perf_counter() - job.started + request_load_seconds()),
        "load_duration": to_ns(request_load_seconds()),  # waiting for the model to load (server/registry.py)
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": to_ns(usage.prefill_time),
        "eval_count": usage.completion_tokens,
        "eval_duration": to_ns(usage.decode_time),
    }


def ollama_logprobs(logprobs: tuple[Logprob, ...] | list[Logprob] | None) -> list[OllamaLogprob] | None:
    if not logprobs:
        return None
    return [OllamaLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                          top_logprobs=[AlternativeLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top])
            for e in logprobs]


@dataclass
class MessageParts:
    """Text and tool-call parts -> (content, complete calls), as Ollama's objects carry them."""

    calls_started: int = 0

    def render(self, parts: tuple[Part, ...] | list[Part], leftover: str = "") -> tuple[str, list[dict[str, Any]] | None]:
        self.calls_started += sum(isinstance(part, CallStart) for part in parts)
        content = "".join(part.text for part in parts if isinstance(part, TextEvent)) + leftover
        calls = [{"function": {"name": p.name, "arguments": json.loads(p.arguments)}} for p in parts if isinstance(p, CallEnd)]
        return (content.strip() if self.calls_started else content), calls or None


def step_piece(step: ChoiceStep, message: MessageParts, parts: list[Part]) -> Piece:
    content, calls = message.render(parts, step.finish.leftover if step.finish else "")
    return Piece(content, calls, ollama_logprobs(step.logprobs))


async def streamed_objects(job: OllamaJob, make_object: MakeObject) -> AsyncIterator[Any]:
    message, held = MessageParts(), []  # held: parts of steps not sent yet (no text, no logprobs)
    generated: list[int] = []
    finish_reason, usage, leftover = None, None, ""
    async for event in serve(job.generation):
        if isinstance(event, UsageEvent):
            usage = event.usage
            continue
        generated += event.token_ids
        finish_reason = event.finish.reason if event.finish else finish_reason
        held += event.parts
        if event.text or event.logprobs:
            yield make_object(step_piece(event, message, held), None)
            held = []
        elif event.finish:
            leftover = event.finish.leftover  # a cut-off call's text, in the final object
    content, calls = message.render(held, leftover)
    yield make_object(Piece(content, calls), final_fields(job, generated, finish_reason, usage))


async def collected_object(job: OllamaJob, make_object: MakeObject) -> Any:
    results, usage = await collect(serve(job.generation))
    result = results[0]
    content = result.content.strip() if result.finish and result.finish.tool_calls else result.content
    calls = [{"function": {"name": c["name"], "arguments": json.loads(c["arguments"])}} for c in result.calls]
    piece = Piece(content, calls or None, ollama_logprobs(result.logprobs))
    return make_object(piece, final_fields(job, result.token_ids, result.finish_reason, usage))


def final_fields(job: OllamaJob, generated: list[int], finish_reason: str | None, usage: Usage | None) -> FinalFields:
    return FinalFields(finish_reason or "stop", timings(job, usage), generated)


def ndjson_line(item: Any) -> str:
    return item.model_dump_json(exclude_none=True) + "\n"


async def ndjson_stream(objects: AsyncIterator[Any]) -> AsyncIterator[str]:
    try:
        async for item in objects:
            yield ndjson_line(item)
    except Exception as exc:  # mid-stream: report in-band, as Ollama does
        yield json.dumps(to_api_error(exc).ollama_body()) + "\n"


def json_response(item: Any) -> Response:
    return Response(item.model_dump_json(exclude_none=True), media_type="application/json")


async def answer(request: Request, job: OllamaJob, stream: bool, make_object: MakeObject) -> Response:
    """Stream NDJSON objects, or answer one (aborted if the client leaves first)."""
    streams = job.generation.streams
    if stream:
        return CancellingStreamingResponse(ndjson_stream(streamed_objects(job, make_object)), streams=streams, media_type=NDJSON)
    return json_response(await collect_unless_disconnected(request, collected_object(job, make_object), streams))


def load_only(item: Any, stream: bool) -> Response:
    """A request without input: the model is (already) loaded."""
    if stream:
        return Response(ndjson_line(item), media_type=NDJSON)
    return json_response(item)


# -------------------------------------------------------------------- chat


async def chat(request: Request) -> Response:
    started = time.perf_counter()
    body = await parse_body(request, ChatRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    if not body.messages:
        return load_only(ChatResponse(model=body.model, created_at=now_rfc3339(), message=ResponseMessage(), done=True, done_reason="load"), body.stream is not False)
    tools = body.tool_config()
    prompt_ids = encode_chat(served.tokenizer, body.template_messages(), tools=tools and tools.template_tools()).ids
    job = await admit_job(body, served, prompt_ids, started, tools)

    def make_object(piece: Piece, final: FinalFields | None) -> ChatResponse:
        return ChatResponse(
            model=job.model_name,
            created_at=now_rfc3339(),
            message=ResponseMessage(content=piece.content, tool_calls=piece.tool_calls),
            done=final is not None,
            done_reason=final.done_reason if final else None,
            logprobs=piece.logprobs,
            **(final.stats if final else {}),
        )

    return await answer(request, job, body.stream is not False, make_object)


# ---------------------------------------------------------------- generate


def generate_prompt_ids(body: GenerateRequest, served: ServedModel) -> list[int]:
    tokenizer = served.tokenizer
    context = list(body.context or [])
    bad = [t for t in context if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise InvalidRequestError("context", f"context has token id {bad[0]} outside [0, {tokenizer.vocab_size})")
    if body.raw:
        return context + tokenizer.encode(body.prompt, add_bos=not context)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [{"role": "user", "content": body.prompt}]
    ids = encode_chat(tokenizer, messages).ids
    if context and tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id]:
        ids = ids[1:]  # the earlier context already starts with BOS
    return context + ids


async def generate(request: Request) -> Response:
    started = time.perf_counter()
    body = await parse_body(request, GenerateRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    if not body.prompt and not body.context:
        return load_only(GenerateResponse(model=body.model, created_at=now_rfc3339(), response="", done=True, done_reason="load"), body.stream is not False)
    job = await admit_job(body, served, generate_prompt_ids(body, served), started)

    def make_object(piece: Piece, final: FinalFields | None) -> GenerateResponse:
        return GenerateResponse(
            model=job.model_name,
            created_at=now_rfc3339(),
            response=piece.content,
            done=final is not None,
            done_reason=final.done_reason if final else None,
            context=job.prompt_ids + final.generated_ids if final and not body.raw else None,
            logprobs=piece.logprobs,
            **(final.stats if final else {}),
        )

    return await answer(request, job, body.stream is not False, make_object)
