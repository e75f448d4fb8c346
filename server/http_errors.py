"""HTTP errors: one exception type, two wire shapes, no 500 for user input.

Design choices:
- Every failure a route can meet becomes an `APIError` (status, message,
  param, code) in one place, `to_api_error`: engine admission errors,
  chat-template errors, pydantic validation errors, malformed JSON, an
  oversized body. Routes just raise; the handlers pick the wire shape.
- The shape follows the route: Ollama's routes (`/api/...`) answer
  `{"error": "message"}`, everything else OpenAI's
  `{"error": {"message", "type", "param", "code"}}`.
- Only a genuine server fault (a bug, an engine failure) is a 500, and its
  traceback goes to the log, never to the client.
- The body limit is a pure ASGI middleware (no BaseHTTPMiddleware, which
  would break client-disconnect detection): a declared Content-Length over
  the limit is refused before the body is read, a chunked body is counted
  as it arrives.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.chat import ChatFormatError
from model.errors import HearthError
from server.engine.types import ContextOverflowError, InvalidRequestError, QueueFullError, RequestFailedError

logger = logging.getLogger("hearth.server")

# OpenAI's error.type for each status we answer with.
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
RETRY_AFTER_SECONDS = 1  # queue full or model loading: the client may retry soon


class APIError(Exception):
    """An HTTP error answer: status, one-line message, and the offending parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        error_type = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


class BodyTooLargeError(Exception):
    """Raised while reading a request body that passes the configured limit."""

    def __init__(self, limit: int):
        super().__init__(f"request body is larger than the server's limit of {limit} bytes")
        self.limit = limit


class ClientDisconnectedError(Exception):
    """The client went away before its (non-streaming) answer was ready."""


def model_not_found(model_id: str, available: list[str]) -> APIError:
    listed = ", ".join(available) or "none"
    return APIError(
        404, f"the model '{model_id}' does not exist (served models: {listed})", param="model", code="model_not_found"
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: str) -> bool:
    """Pydantic puts the union member tried in the location ("str", "list[int]", "TextContentPart")."""
    return part in _TYPE_TAGS or "[" in part or part[:1].isupper() or part.startswith("function-")


def validation_error_param(error: dict[str, Any]) -> str | None:
    """Pydantic's error location as a JSON path: ("messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in error.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_tag(part):
            path += f".{part}" if path else part
    return path or None


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception a route can raise to the HTTP error it stands for."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFullError):
        message = str(exc) or "the server is busy (request queue full); retry shortly"
        return APIError(429, message, code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"generation failed: {exc}", code="generation_failed")
    if isinstance(exc, ChatFormatError):
        return APIError(400, str(exc), param=exc.field or "messages")
    if isinstance(exc, HearthError):
        return APIError(400, str(exc))
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        param = validation_error_param(first)
        return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)
    if isinstance(exc, BodyTooLargeError):
        return APIError(413, str(exc), code="request_too_large")
    if isinstance(exc, ClientDisconnectedError):  # nobody will read it; 499 as nginx logs it
        return APIError(499, "client closed the request", code="client_closed_request")
    logger.error("internal error", exc_info=exc)
    return APIError(500, "internal server error (see the server log)", code="internal_error")


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_response(request: Request, error: APIError) -> JSONResponse:
    body = error.ollama_body() if is_ollama_path(request.url.path) else error.openai_body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every exception -> the right status and the route's error shape."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, to_api_error(exc))

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        # 405 keeps Starlette's Allow header (the methods the path does answer).
        error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=code, headers=exc.headers)
        return error_response(request, error)

    for exc_type in (APIError, HearthError, ValidationError, BodyTooLargeError, ClientDisconnectedError, Exception):
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)


class BodySizeLimitMiddleware:
    """Refuse request bodies over `max_body_bytes` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            error = to_api_error(BodyTooLargeError(self.max_body_bytes))
            body = error.ollama_body() if is_ollama_path(scope["path"]) else error.openai_body()
            return await JSONResponse(body, status_code=413)(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        await self.app(scope, counting_receive, send)
