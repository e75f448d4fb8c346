"""HTTP plumbing shared by every API: request bodies, client disconnects, streaming answers.

Design choices:
- Request bodies are parsed here rather than by FastAPI, so a body sent
  without `Content-Type: application/json` (curl -d, as in Ollama's docs)
  works, and malformed JSON is a 400 naming the position. Text that is not
  Unicode (a lone surrogate) is a 400 naming the field (server/text_rules.py).
- Unknown request fields are ignored and logged once per route and name.
- A streaming client that disconnects stops the response at once
  (`CancellingStreamingResponse` listens for `http.disconnect` while it
  streams); a non-streaming one is watched by `collect_unless_disconnected`.
  Either way the engine streams are closed (aborted) at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from contextlib import suppress
from typing import Any, Awaitable, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.core.streams import AdmittedStream, close_all
from server.http_errors import APIError, ClientDisconnectedError
from server.text_rules import surrogate_message, unencodable_text_path

logger = logging.getLogger("hearth.server")
ModelT = TypeVar("ModelT", bound=BaseModel)
ResultT = TypeVar("ResultT")
_logged_unknown_fields: set[tuple[str, str]] = set()  # (route, field) pairs already logged
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
