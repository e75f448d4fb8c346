"""Ending answers properly when the server cancels them at shutdown.

On SIGTERM uvicorn stops accepting, gives running requests `--shutdown-timeout`
seconds, then cancels the tasks still running. Without help a stream is then
cut mid-body (the client sees a broken chunked transfer) and the log gets one
traceback per request. `ShutdownMiddleware` turns that cancellation into a
proper ending:

- a streaming answer already started gets the protocol's own last words:
  Server-Sent Events an `error` event (OpenAI's error object, code
  `server_shutting_down`) then `data: [DONE]`; NDJSON (Ollama) a final
  `{"error": "server shutting down", "done": true}` line; the body is then
  closed, so the HTTP framing is complete;
- an answer not started yet is a 503 in the route's error shape;
- the log gets one warning line per cancelled request, no traceback.

Design choices:
- One plain ASGI middleware (no BaseHTTPMiddleware, which would buffer
  streams), placed inside the metrics middleware so the access log still
  sees the request. It only watches what is sent (status, content type,
  whether the body ended), so no route knows about shutdown.
- The cancellation is absorbed, not re-raised: the request task then ends
  normally, which is what uvicorn waits for; engine streams are closed by
  the response's own `finally` before this handler runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http_errors import APIError, is_ollama_path
from server.metrics import current_request_id

logger = logging.getLogger("hearth.server")

SHUTDOWN_MESSAGE = "server shutting down"


@dataclass
class ResponseProgress:
    """What has been sent of one response."""

    started: bool = False
    finished: bool = False
    content_type: str = ""

    def observe(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = dict(message.get("headers", []))
            self.content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True


def shutdown_error() -> APIError:
    return APIError(503, SHUTDOWN_MESSAGE, code="server_shutting_down", headers={"Retry-After": "1"})


def stream_tail(content_type: str) -> bytes:
    """The last bytes of a cut stream, in its protocol's words."""
    if content_type == "text/event-stream":
        return f"data: {json.dumps(shutdown_error().openai_body())}\n\ndata: [DONE]\n\n".encode()
    if content_type == "application/x-ndjson":
        return (json.dumps({"error": SHUTDOWN_MESSAGE, "done": True}) + "\n").encode()
    return b""


def error_start(path: str) -> tuple[Message, Message]:
    """A whole 503 answer, for a request cancelled before its answer started."""
    error = shutdown_error()
    body = json.dumps(error.ollama_body() if is_ollama_path(path) else error.openai_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"retry-after", b"1")]
    return {"type": "http.response.start", "status": 503, "headers": headers}, {"type": "http.response.body", "body": body}


class ShutdownMiddleware:
    """Finish, in-protocol, every answer the server cancels while shutting down."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        progress = ResponseProgress()

        async def tracking_send(message: Message) -> None:
            progress.observe(message)
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if progress.finished:
                return
            await self.end_cancelled(scope, progress, send)

    async def end_cancelled(self, scope: Scope, progress: ResponseProgress, send: Send) -> None:
        what = f"streaming ({progress.content_type})" if progress.started else "not started"
        logger.warning("request %s %s %s cancelled at shutdown (--shutdown-timeout passed, answer %s): "
                       "told the client '%s'", current_request_id() or "-", scope["method"], scope["path"], what,
                       SHUTDOWN_MESSAGE)
        try:
            if progress.started:
                await send({"type": "http.response.body", "body": stream_tail(progress.content_type), "more_body": False})
            else:
                for message in error_start(scope["path"]):
                    await send(message)
        except (OSError, RuntimeError, asyncio.CancelledError):  # the connection is already gone
            pass
