"""Optional API key: `Authorization: Bearer KEY` on every route but /health and the web page.

Design choices:
- A plain ASGI middleware (not Starlette's BaseHTTPMiddleware), so streamed
  responses pass through untouched and a client disconnect still cancels them.
- Keys are compared with `hmac.compare_digest` on UTF-8 bytes: the time taken
  does not depend on how many leading characters match, so the key cannot be
  guessed one character at a time by timing.
- The refusal has OpenAI's 401 shape (`error.code = "invalid_api_key"`), so the
  OpenAI SDKs raise their own `AuthenticationError`; it carries
  `WWW-Authenticate: Bearer` as RFC 6750 asks.
- CORS preflights (OPTIONS with Access-Control-Request-Method) carry no
  credentials by design; they pass, and the CORS middleware answers them.
- Public: `/health` (probes), `/` and `/static/*` (the page must load before
  the user can type a key into it). Everything else, `/metrics` included, is
  guarded: Prometheus sends the key with `authorization: {credentials: KEY}`.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; "" for another scheme; None without the header."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def keys_match(given: str | None, expected: str) -> bool:
    # compare_digest runs over the whole input whatever the mismatch position.
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def unauthorized_body(provided: bool) -> bytes:
    message = (
        "Incorrect API key provided. Pass it as `Authorization: Bearer KEY`."
        if provided
        else "You didn't provide an API key. Pass it as `Authorization: Bearer KEY`."
    )
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    return json.dumps({"error": error}).encode()


class ApiKeyMiddleware:
    """Refuses guarded HTTP requests whose bearer token is not `api_key`."""

    def __init__(self, app: ASGIApp, api_key: str):
        if not api_key:
            raise ValueError("ApiKeyMiddleware needs a non-empty key")
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]) or _is_preflight(scope):
            return await self.app(scope, receive, send)
        token = bearer_token(scope["headers"])
        if keys_match(token, self.api_key):
            return await self.app(scope, receive, send)
        body = unauthorized_body(provided=token is not None)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _is_preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and any(
        name.lower() == b"access-control-request-method" for name, _ in scope["headers"]
    )
