"""Glue between HTTP requests and the engine, shared by the OpenAI and Ollama routes.

Design choices:
- `start_generation` awaits the engine's first output before returning, so
  admission errors (queue full, context overflow, bad parameter) become a
  proper HTTP status instead of an error in the middle of a 200 stream.
- Cancellation is explicit: whoever answers a request closes its engine
  streams when done (closing the engine's generator aborts a request still
  running). A streaming client that disconnects stops the response at once
  (`CancellingStreamingResponse` listens for `http.disconnect` while it
  streams); a non-streaming one is watched by `collect_unless_disconnected`.
- Request bodies are parsed here rather than by FastAPI, so a body sent
  without `Content-Type: application/json` (curl -d, as in Ollama's docs)
  works, and malformed JSON is a 400 naming the position. Text that is not
  Unicode (a lone surrogate) is a 400 naming the field (server/text_rules.py).
- Unknown request fields are ignored and logged once per route and name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cache
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from tokenizers import decoders, pre_tokenizers

from server.engine.types import (
    CompletionDelta,
    ContextOverflowError,
    GenerationRequest,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from server.http_errors import APIError, ClientDisconnectedError
from server.text_rules import surrogate_message, unencodable_text_path

logger = logging.getLogger("hearth.server")
ModelT = TypeVar("ModelT", bound=BaseModel)
ResultT = TypeVar("ResultT")
_logged_unknown_fields: set[tuple[str, str]] = set()  # (route, field) pairs already logged


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """JSON body -> pydantic model; malformed JSON and bad fields are 400s naming the problem."""
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_reject_constant) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    bad_text = unencodable_text_path(data)
    if bad_text:
        raise APIError(400, surrogate_message(bad_text), param=bad_text, code="invalid_text")
    parsed = model.model_validate(data)  # ValidationError -> 400 via the error handlers
    log_unknown_fields(request.url.path, parsed)
    return parsed


def _reject_constant(name: str) -> None:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def log_unknown_fields(route: str, parsed: BaseModel, prefix: str = "") -> None:
    """Log (once per route and field path) the fields a request sent that we do not know."""
    for name in parsed.model_extra or {}:
        path = prefix + name
        key = (route, re.sub(r"\[\d+\]", "[]", path))  # messages[3].x is messages[0].x again
        if key not in _logged_unknown_fields:
            _logged_unknown_fields.add(key)
            logger.warning("%s: ignoring unknown field '%s'", route, path)
    for name, value in parsed:
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if isinstance(item, BaseModel):
                position = f"[{index}]" if isinstance(value, list) else ""
                log_unknown_fields(route, item, f"{prefix}{name}{position}.")


FLOAT32_MAX = 3.4028234e38
_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def check_params(params: SamplingParams, vocab_size: int, api_names: dict[str, str] | None = None) -> None:
    """The engine's own range checks, plus float32 range, reported under the API's field names."""
    try:
        for name in _FLOAT_PARAMS:  # the sampler computes in float32: 1e308 would become inf
            if not abs(getattr(params, name)) <= FLOAT32_MAX:
                raise InvalidRequestError(name, f"{name} is out of range")
        params.validate(vocab_size)
    except InvalidRequestError as exc:
        api_name = (api_names or {}).get(exc.param or "", exc.param)
        message = str(exc)
        if exc.param and api_name != exc.param and message.startswith(exc.param):
            message = api_name + message[len(exc.param):]
        raise InvalidRequestError(api_name, message) from None


def remaining_context(prompt_tokens: int, context_limit: int) -> int:
    """Default max_tokens: whatever context is left (at least 1, so a full prompt is an overflow, not a bad max_tokens)."""
    return max(1, context_limit - prompt_tokens)


def check_context(prompt_tokens: int, params: SamplingParams, limit: int, param: str) -> None:
    """Refuse prompt + max_tokens beyond the context, naming the limit and the count."""
    if prompt_tokens + params.max_tokens > limit:
        error = ContextOverflowError(limit, prompt_tokens + params.max_tokens, prompt_tokens)
        error.param = param
        raise error


class AdmittedStream:
    """An engine stream whose first output has arrived. Closing it, iterated or not, aborts the request."""

    def __init__(self, first: RequestOutput | None, stream: Any):
        self._first, self._stream = first, stream

    def __aiter__(self) -> "AdmittedStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        self._first = None
        await self._stream.aclose()  # a no-op once the engine's stream has finished


async def start_generation(engine: Any, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AdmittedStream:
    """Submit a request and wait for its first output: admission errors raise here."""
    stream = engine.generate(GenerationRequest(request_id, prompt_ids, params))
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()
        raise
    return AdmittedStream(first, stream)


async def start_all(engine: Any, jobs: list[tuple[str, list[int], SamplingParams]]) -> list[AdmittedStream]:
    """Submit several requests together (they prefill in the same steps); if one is refused, cancel the rest."""
    results = await asyncio.gather(*(start_generation(engine, *job) for job in jobs), return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is None:
        return list(results)
    await close_all([r for r in results if not isinstance(r, BaseException)])
    raise failure


async def close_all(streams: list[AdmittedStream]) -> None:
    """Close streams (aborting whatever still runs), even if the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        for stream in streams:
            with suppress(Exception):
                await stream.aclose()


async def merge_streams(streams: list[AdmittedStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as their outputs arrive: (stream index, output)."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(index: int, stream: AdmittedStream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((index, exc))
        finally:
            await queue.put((index, done_marker))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done_marker:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await close_all(streams)


@dataclass
class ChoiceState:
    """One choice accumulated from its deltas (non-streaming answers)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: CompletionDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason = delta.finish_reason or self.finish_reason


def add_usage(total: Usage | None, usage: Usage | None) -> Usage | None:
    """Sum the usage of several engine requests (a list of prompts)."""
    if usage is None or total is None:
        return total or usage
    return Usage(
        prompt_tokens=total.prompt_tokens + usage.prompt_tokens,
        cached_tokens=total.cached_tokens + usage.cached_tokens,
        completion_tokens=total.completion_tokens + usage.completion_tokens,
        queue_time=max(total.queue_time, usage.queue_time),
        prefill_time=max(total.prefill_time, usage.prefill_time),
        decode_time=max(total.decode_time, usage.decode_time),
    )


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_unless_disconnected(request: Request, work: Awaitable[ResultT], streams: list[AdmittedStream]) -> ResultT:
    """Run `work` (which consumes `streams`); if the client goes away first, cancel it and abort the streams."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnectedError()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await close_all(streams)


class CancellingStreamingResponse(StreamingResponse):
    """A StreamingResponse that stops its body and aborts its engine streams when the client disconnects.

    Starlette only notices a gone client when a write fails, which for a slow
    generation can be many seconds later; listening for `http.disconnect`
    alongside the stream frees the engine's slot at once. The engine streams
    are closed at the end whatever happened (even if the body never started).
    """

    def __init__(self, content: Any, *, streams: list[AdmittedStream], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    with suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            await close_all(self.streams)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: unicode stand-in character -> raw byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Recreate GPT-2's byte <-> unicode table: printable bytes map to themselves.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + shifted)] = byte
            shifted += 1
    assert set(table) == set(alphabet), "unexpected byte-level alphabet"
    return table


class TokenPieces:
    """Per-token text and raw bytes, for logprobs (a token can be part of a UTF-8 character)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self.byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        backend = self.tokenizer.backend
        token = backend.id_to_token(token_id) or ""
        if self.byte_level and token_id not in backend.get_added_tokens_decoder():
            table = _byte_decoder()
            raw = bytes(table[ch] for ch in token if ch in table)
        else:
            raw = self.tokenizer.decode([token_id], skip_special=False).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)
