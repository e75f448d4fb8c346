"""The OpenAPI document (/openapi.json): every request body, answer and error as the server sends them.

    install_openapi(app)   # after the routers are included

Design choices:
- Routes parse their own bodies (server/core/http.py: curl without a
  Content-Type works, errors are 400s naming the field), so FastAPI cannot
  see the request models. This module adds them afterwards from one table,
  `ROUTE_DOCS`: the request model each POST route validates with, its answer
  model, its streaming media type, and the errors it can answer.
- The request schemas are the pydantic models' own validation schemas (the
  same objects the route validates with), so the document cannot drift from
  the server; extra fields are allowed, as the models allow them.
- Errors are documented with their real JSON shapes: OpenAI's
  `{"error": {"message", "type", "param", "code"}}` everywhere but the Ollama
  routes (`/api/...`), whose errors are `{"error": "message"}`; a 401 (API
  key) is OpenAI's shape on every route. FastAPI's 422 is dropped: bad input
  is a 400 here.
- Streams are a second media type of the 200 answer: `text/event-stream`
  (OpenAI, with `stream: true`) and `application/x-ndjson` (Ollama, the
  default there); each line or event is one object of the answer's schema.
- The API key is documented as an optional bearer scheme: the server may or
  may not be started with one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"

ERROR_DESCRIPTIONS = {
    400: "invalid request: the message names the field (param)",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model",
    409: "the model is running requests (delete, or create over it); retry when they finish",
    413: "request body over the server's limit (--max-body-bytes)",
    429: "the waiting queue is full (--max-waiting); retry after Retry-After seconds",
    501: "not supported: the server has no network (models are imported from files)",
    503: "models still loading, every loaded model busy (--max-loaded-models), or the server is shutting down; "
         "retry after Retry-After seconds",
}
MANAGEMENT_ERRORS = (400, 401, 404, 409, 413)
GENERATION_ERRORS = (400, 401, 404, 413, 429, 503)
LOOKUP_ERRORS = (400, 401, 404, 413, 503)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """OpenAI's error body (every route but /api/..., and every 401)."""

    error: OpenAIErrorDetail


class OllamaError(BaseModel):
    """Ollama's error body (/api/... routes)."""

    error: str


class HealthAnswer(BaseModel):
    status: str  # ok | loading | error
    models: list[str] | None = None
    loading: list[str] | None = None
    error: str | None = None


class TokenPiece(BaseModel):
    id: int
    piece: str


class TokenizeAnswer(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int] | list[TokenPiece]  # with_pieces: {"id", "piece"} (llama.cpp)


class DetokenizeAnswer(BaseModel):
    prompt: str


@dataclass
class RouteDoc:
    """What one operation takes and answers."""

    request: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    stream: str | None = None  # the streamed media type of the 200 answer
    errors: tuple[int, ...] = (401,)
    extra_models: list[type[BaseModel]] = field(default_factory=list)


def route_docs() -> dict[tuple[str, str], RouteDoc]:
    """(path, method) -> its documentation; imported late, as the protocol modules import the app's pieces."""
    from server.app import DetokenizeRequest, TokenizeRequest
    from server.embeddings.router import (EmbeddingList, EmbeddingsRequest, OllamaEmbeddingsRequest, OllamaEmbeddingsResponse,
                                       OllamaEmbedRequest, OllamaEmbedResponse)
    from server.ollama.protocol import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse, ShowRequest, ShowResponse
    from server.openai.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionRequest
    from server.ollama.management import CopyRequest, CreateRequest, DeleteRequest, StatusAnswer

    return {
        ("/v1/chat/completions", "post"): RouteDoc(ChatCompletionRequest, ChatCompletion, SSE, GENERATION_ERRORS,
                                                   [ChatCompletionChunk]),
        ("/v1/completions", "post"): RouteDoc(CompletionRequest, Completion, SSE, GENERATION_ERRORS),
        ("/api/chat", "post"): RouteDoc(ChatRequest, ChatResponse, NDJSON, GENERATION_ERRORS),
        ("/api/generate", "post"): RouteDoc(GenerateRequest, GenerateResponse, NDJSON, GENERATION_ERRORS),
        ("/api/show", "post"): RouteDoc(ShowRequest, ShowResponse, None, LOOKUP_ERRORS),
        ("/v1/embeddings", "post"): RouteDoc(EmbeddingsRequest, EmbeddingList, None, GENERATION_ERRORS),
        ("/api/embed", "post"): RouteDoc(OllamaEmbedRequest, OllamaEmbedResponse, None, GENERATION_ERRORS),
        ("/api/embeddings", "post"): RouteDoc(OllamaEmbeddingsRequest, OllamaEmbeddingsResponse, None, GENERATION_ERRORS),
        ("/api/create", "post"): RouteDoc(CreateRequest, StatusAnswer, NDJSON, MANAGEMENT_ERRORS),
        ("/api/copy", "post"): RouteDoc(CopyRequest, None, None, MANAGEMENT_ERRORS),
        ("/api/delete", "delete"): RouteDoc(DeleteRequest, None, None, MANAGEMENT_ERRORS),
        ("/api/pull", "post"): RouteDoc(errors=(401, 501)),
        ("/api/push", "post"): RouteDoc(errors=(401, 501)),
        ("/tokenize", "post"): RouteDoc(TokenizeRequest, TokenizeAnswer, None, LOOKUP_ERRORS),
        ("/detokenize", "post"): RouteDoc(DetokenizeRequest, DetokenizeAnswer, None, LOOKUP_ERRORS),
        ("/v1/models/{model_id}", "get"): RouteDoc(errors=(401, 404, 503)),
        ("/health", "get"): RouteDoc(answer=HealthAnswer, errors=()),
    }


def install_openapi(app: FastAPI) -> None:
    """Replace FastAPI's generator with one that adds ROUTE_DOCS to its document (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = complete_document(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete_document(document: dict[str, Any]) -> dict[str, Any]:
    docs = route_docs()
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    add_model_schemas(schemas, docs)
    document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            document_operation(path, operation, docs.get((path, method), RouteDoc()))
    return document


def add_model_schemas(schemas: dict[str, Any], docs: dict[tuple[str, str], RouteDoc]) -> None:
    requests = {doc.request for doc in docs.values() if doc.request}
    answers = {model for doc in docs.values() for model in [doc.answer, *doc.extra_models] if model}
    answers |= {OpenAIError, OllamaError}
    keys = [(model, "validation") for model in requests] + [(model, "serialization") for model in answers - requests]
    _, definitions = models_json_schema(keys, ref_template=REF)
    schemas.update(definitions.get("$defs", {}))


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def document_operation(path: str, operation: dict[str, Any], doc: RouteDoc) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # bad input is a 400 here, never FastAPI's 422
    if doc.request is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(doc.request)}}}
    ok = responses.setdefault("200", {"description": "OK"})
    if doc.answer is not None:
        ok["content"] = {"application/json": {"schema": ref(doc.answer)}}
    if doc.stream is not None:
        ok.setdefault("content", {})[doc.stream] = {"schema": {"type": "string"}}
        ok["description"] = f"the answer, or with streaming one {doc.stream} {'event' if doc.stream == SSE else 'line'} per chunk"
    errors = doc.errors
    if path != "/health":
        operation["security"] = [{"bearer": []}, {}]  # the key is optional: the server may have none
        errors = tuple(sorted(set(errors) | {401}))
    for status in errors:
        responses[str(status)] = error_response(path, status)
    if path == "/health":
        responses["503"] = {"description": "loading, or a model failed to load",
                            "content": {"application/json": {"schema": ref(HealthAnswer)}}}


def error_response(path: str, status: int) -> dict[str, Any]:
    shape = OllamaError if path.startswith("/api/") and status != 401 else OpenAIError
    response: dict[str, Any] = {"description": ERROR_DESCRIPTIONS[status], "content": {"application/json": {"schema": ref(shape)}}}
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return response
