"""The FastAPI application: settings, model loading, core routes, error handling.

    app = create_app(settings=load_settings(models=["weights/default"]))  # loads in the background
    app = create_app(engines={"default": engine})                          # engines built by the caller

Design choices:
- `create_app` only assembles: state (the `ModelRegistry`), the routers
  (OpenAI, Ollama, core), the error handlers and middleware. Features are
  routers and middleware added here in one place (`add_middleware` below is
  where API keys, metrics or CORS go), so none of them knows about another.
- Given checkpoint paths, the app starts answering at once and loads the
  models in a lifespan task: /health is 503 {"status": "loading"} until every
  model is ready, then 200; model routes answer 503 with Retry-After meanwhile.
- Core routes beyond the two APIs: /health, and vLLM-style /tokenize and
  /detokenize (the `model` field may be left out when one model is served),
  which also take llama.cpp's names (`content`, `add_special`, `with_pieces`;
  /detokenize answers `content` as well as `prompt`).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager, suppress
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from model.chat import encode_chat
from server.embeddings.router import router as embeddings_router
from server.engine.types import InvalidRequestError
from server.core.http import parse_body
from server.http_errors import BodySizeLimitMiddleware, install_error_handlers
from server.memory import start_trimming, stop_trimming, tune_malloc
from server.openapi import install_openapi
from server.ops import install_ops
from server.registry import ModelRegistry
from server.settings import ServerSettings, load_settings
from server.shutdown import ShutdownMiddleware

logger = logging.getLogger("hearth.server")

HEARTH_VERSION = "0.1.0"


def create_app(
    engines: dict[str, Any] | None = None,
    settings: ServerSettings | None = None,
    on_load_failure: Callable[[Exception], None] | None = None,
) -> FastAPI:
    """The app serving `engines` (ready now) or the checkpoints of `settings.models` (loaded in the background)."""
    from server.adapters import api as lora_api
    from server.ollama.router import router as ollama_router
    from server.openai.router import router as openai_router
    from server.responses.serving import router as responses_router
    from server.ollama.management import install_model_management

    settings = settings or load_settings()
    if engines is not None:
        registry = ModelRegistry.from_engines(engines)
    else:
        registry = ModelRegistry.from_entries(settings.model_entries())
    engine_settings = settings.model_dump(exclude={"api_key"})

    tune_malloc()  # before the engine threads exist: flat RSS under load (server/memory.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(registry.load_all(engine_settings, on_load_failure))
        trimmer = start_trimming()
        try:
            yield
        finally:
            loader.cancel()
            with suppress(asyncio.CancelledError):
                await loader
            await stop_trimming(trimmer)
            registry.shutdown()

    app = FastAPI(title="Hearth", version=HEARTH_VERSION, lifespan=lifespan)
    app.state.registry = registry
    app.state.settings = settings
    app.include_router(core_router)
    app.include_router(openai_router)  # server/openai/
    app.include_router(ollama_router)  # server/ollama/
    app.include_router(responses_router)  # /v1/responses (server/responses/)
    app.include_router(embeddings_router)  # /v1/embeddings, /api/embed, /api/embeddings (server/embeddings/router.py)
    lora_api.install(app)  # LoRA adapters as models, /v1/load_lora_adapter (server/adapters/api.py)
    install_error_handlers(app)
    install_openapi(app)  # request bodies, error shapes, stream media types (server/openapi.py)
    install_model_management(app, settings)  # /api/create etc., load on demand, keep-alive (innermost middleware)
    # Middleware: the last added runs first. Auth, CORS and metrics belong here.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ShutdownMiddleware)  # answers cut by --shutdown-timeout end in-protocol (server/shutdown.py)
    install_ops(app, settings)  # web page, /metrics, access log, API key, CORS (server/ops.py)
    return app


core_router = APIRouter(tags=["server"])


@core_router.get("/health")
async def health(request: Request) -> JSONResponse:
    registry: ModelRegistry = request.app.state.registry
    if registry.load_error:
        return JSONResponse({"status": "error", "error": registry.load_error}, status_code=503)
    if not registry.ready:
        return JSONResponse({"status": "loading", "loading": list(registry.pending)}, status_code=503)
    return JSONResponse({"status": "ok", "models": list(registry.models)})


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages rendered with the model's template."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True  # prompt: prepend BOS
    add_generation_prompt: bool = True  # messages: end with the assistant header
    content: str | None = None  # llama.cpp's name for prompt (BOS only with add_special, as there)
    add_special: bool = False  # llama.cpp's add_special_tokens, for content
    with_pieces: bool = False  # llama.cpp: tokens as {"id", "piece"}


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    tokens: list[int]


def requested_model(request: Request, model_id: str | None):
    registry: ModelRegistry = request.app.state.registry
    return registry.get(model_id) if model_id else registry.default()


@core_router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    body = await parse_body(request, TokenizeRequest)
    served = requested_model(request, body.model)
    if [body.prompt, body.messages, body.content].count(None) != 2:
        raise InvalidRequestError("prompt", "give exactly one of prompt, content or messages")
    if body.content is not None:
        tokens = served.tokenizer.encode(body.content, add_bos=body.add_special)
    elif body.messages is not None:
        tokens = encode_chat(served.tokenizer, body.messages, body.add_generation_prompt).ids
    else:
        tokens = served.tokenizer.encode(body.prompt or "", add_bos=body.add_special_tokens)
    if body.with_pieces:
        tokens = [{"id": t, "piece": served.tokenizer.decode([t], skip_special=False)} for t in tokens]
    return {"count": len(tokens), "max_model_len": served.max_seq_len, "tokens": tokens}


@core_router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    body = await parse_body(request, DetokenizeRequest)
    served = requested_model(request, body.model)
    vocab_size = served.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError("tokens", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    text = served.tokenizer.decode(body.tokens)
    return {"prompt": text, "content": text}  # vLLM's and llama.cpp's names
