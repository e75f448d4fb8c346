"""Ollama-style model management: /api/create, /api/copy, /api/delete, /api/pull, loading on demand.

    install_model_management(app, settings)   # server/app.py, before the outer middleware

Design choices:
- `--models-dir DIR` adds every checkpoint folder and .gguf file under DIR
  to the catalog (id: its path inside DIR, a .gguf file without the
  suffix), plus the models made by /api/create and /api/copy, which live in
  DIR's SQLite registry (server/ollama/model_store.py) and so survive a restart.
  Nothing is loaded until a request names it (server/registry.py).
- One pure ASGI middleware (`ModelResidencyMiddleware`, the innermost, so
  the API key and body limit are checked first) serves every POST that
  names a model, whatever its API: it reads the body, loads the model if
  needed (the request waits for the load, and Ollama's answers report the
  wait as `load_duration`), holds it loaded while the route runs (so it can
  never unload under a running request), fills in a derived model's
  defaults, and on the way out starts the keep-alive clock with the
  request's `keep_alive` (Ollama's routes) or the server's `--keep-alive`.
  Routes need no change: they find the model loaded.
- A derived model shares its base's engine. Its defaults act where the
  request leaves a gap: `system` becomes the system message (/api/chat,
  /v1/chat/completions) or `system` (/api/generate) or `instructions`
  (/v1/responses) when the request has none; `parameters` are Ollama
  options under the request's own (and their OpenAI names on /v1/...);
  `template` is a Jinja chat template (the format Hugging Face models and
  /api/show use; Ollama's Go templates are refused at create time) that
  replaces the base's when a chat is turned into tokens.
- `from` is a model id, or a checkpoint folder / .gguf file inside the
  weights folder (relative to it or absolute; anything resolving outside
  it, symlinks included, is a 400). `adapters` (Hearth LoRA adapter folders
  inside the weights folder) are merged into a new checkpoint under
  `.hearth-merged/`, owned by the model and deleted with its last user.
- Only models made here can be deleted; one running requests is a 409
  (the client retries when they finish). /api/pull and /api/push are 501:
  no network, models come from files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.checkpoint import CONFIG_FILE, read_metadata
from model.errors import CheckpointError, HearthError
from server.engine.types import InvalidRequestError
from server.core.http import parse_body
from server.http_errors import APIError, BodyTooLargeError, is_ollama_path, to_api_error
from server.keep_alive import parse_keep_alive
from server.ollama.model_store import MERGED_DIR, ModelStore, StoredModel
from server.registry import REQUEST_LOAD_SECONDS, ModelOverrides, ModelRegistry, ModelSource
from server.settings import ServerSettings

logger = logging.getLogger("hearth.server")

router = APIRouter(prefix="/api", tags=["ollama"])

MANAGEMENT_PATHS = {"/api/create", "/api/copy", "/api/delete", "/api/pull", "/api/push"}
OPTIONAL_MODEL_PATHS = {"/tokenize", "/detokenize"}  # `model` may be left out: the first served model
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,199}")
MAX_DISCOVERY_DEPTH = 4


# ----------------------------------------------------------------------------- install


def install_model_management(app: FastAPI, settings: ServerSettings) -> None:
    """Keep-alive and the loaded-model limit, the --models-dir catalog, the routes and the middleware."""
    registry: ModelRegistry = app.state.registry
    registry.keep_alive = parse_keep_alive(settings.keep_alive, "keep_alive")
    registry.max_loaded = settings.loaded_models_limit
    registry.engine_settings = settings.model_dump(exclude={"api_key"})
    manager = None
    if settings.models_dir is not None:
        manager = ModelManager(registry, Path(settings.models_dir).expanduser())
        manager.fill_catalog()
    app.state.model_manager = manager
    app.include_router(router)
    app.add_middleware(ModelResidencyMiddleware)


def discover(folder: Path, prefix: str = "", depth: int = 0) -> list[tuple[str, Path]]:
    """(id, path) of every checkpoint folder and GGUF file under `folder`; dot-names are skipped."""
    found: list[tuple[str, Path]] = []
    for entry in sorted(folder.iterdir()):
        name = prefix + entry.name
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / CONFIG_FILE).is_file():
            found += checkpoint_entry(name, entry)
        elif entry.is_dir() and depth < MAX_DISCOVERY_DEPTH:
            found += discover(entry, name + "/", depth + 1)
        elif entry.is_file() and is_gguf(entry):
            found.append((prefix + entry.stem, entry))
    return found


def checkpoint_entry(name: str, folder: Path) -> list[tuple[str, Path]]:
    try:
        read_metadata(folder)
    except CheckpointError as exc:  # e.g. an adapter folder or a foreign config.json: not a model
        logger.info("--models-dir: not serving %s (%s)", folder, exc)
        return []
    return [(name, folder)]


def is_gguf(path: Path) -> bool:
    from model.gguf_import import is_gguf_file

    return is_gguf_file(path)


# ----------------------------------------------------------------------------- the catalog and the store


class ModelManager:
    """The weights folder: its checkpoints, its registry of made models, and the rules for changing them."""

    def __init__(self, registry: ModelRegistry, weights_dir: Path):
        if not weights_dir.is_dir():
            raise HearthError(f"models_dir: {weights_dir} is not a folder")
        self.registry, self.weights_dir = registry, weights_dir
        self.store = ModelStore(weights_dir)

    def fill_catalog(self) -> None:
        startup_keys = {source.key: name for name, source in self.registry.catalog.items()}
        for name, path in discover(self.weights_dir):
            source = ModelSource(name, path, "folder")
            if source.key in startup_keys:
                continue  # also named with --model: served under that id
            if name in self.registry.catalog:
                logger.warning("--models-dir: %s is not served: the id %r is taken by a --model entry", path, name)
                continue
            self.registry.catalog[name] = source
        for stored in self.store.all():
            self.add_stored(stored)

    def add_stored(self, stored: StoredModel) -> None:
        path = self.store.absolute(stored.base)
        if not path.exists():
            logger.warning("model %s: its checkpoint %s is gone; not serving it", stored.name, path)
            return
        overrides = ModelOverrides(stored.system, stored.template, stored.parameters)
        self.registry.add_source(ModelSource(stored.name, path, stored.origin, overrides))

    # ------------------------------------------------------------------ names

    def new_name(self, raw: str | None, field: str) -> str:
        """The id a create or copy may write: valid, not a checkpoint's, not running requests."""
        if not raw:
            raise InvalidRequestError(field, f"{field} is required")
        name = raw.removesuffix(":latest")
        if not NAME_PATTERN.fullmatch(name) or ".." in name:
            raise InvalidRequestError(field, f"{field}: {raw!r} is not a valid model name "
                                      "(letters, digits, . _ - / :, starting with a letter or digit)")
        existing = self.registry.catalog.get(name)
        if existing is not None and not existing.deletable:
            raise InvalidRequestError(field, f"{field}: {name!r} is a checkpoint served from disk; choose another name")
        self.check_idle(name)
        return name

    def check_idle(self, name: str) -> None:
        running = self.registry.running_requests(name)
        if running:
            raise APIError(409, f"model {name!r} is running {running} request(s); retry when they finish",
                           param="model", code="model_busy")

    # ------------------------------------------------------------------ paths

    def inside(self, raw: str, field: str) -> Path:
        """A path given by a client, which must resolve inside the weights folder (400 otherwise)."""
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else self.weights_dir / path
        root = self.weights_dir.resolve()
        if not path.resolve().is_relative_to(root):
            raise InvalidRequestError(field, f"{field}: {raw} is outside the weights folder ({self.weights_dir})")
        return path

    def resolve_from(self, raw: str) -> tuple[Path, ModelOverrides]:
        """`from`: a model id (its checkpoint and defaults) or a checkpoint folder / GGUF file inside the weights folder."""
        if self.registry.resolve(raw) in self.registry.catalog:
            source = self.registry.catalog[self.registry.resolve(raw)]
            if source.path is None:
                raise InvalidRequestError("from", f"from: {raw} has no checkpoint on disk to derive from")
            return source.path, source.overrides
        path = self.inside(raw, "from")
        if not path.exists():
            raise APIError(404, f"from: no model or checkpoint named {raw!r} (served models: "
                           f"{', '.join(self.registry.model_ids) or 'none'})", param="from", code="model_not_found")
        if path.is_dir():
            read_metadata(path)  # CheckpointError: 400 naming config.json
        elif not is_gguf(path):
            raise InvalidRequestError("from", f"from: {raw} is neither a checkpoint folder nor a GGUF file")
        return path, ModelOverrides()

    # ------------------------------------------------------------------ changes

    async def save(self, stored: StoredModel) -> None:
        """Write a made model to the store and the catalog; a model it replaces gives up its merged checkpoint."""
        previous = self.store.get(stored.name)
        await asyncio.to_thread(self.store.put, stored)
        self.add_stored(stored)
        if previous is not None and previous.base != stored.base:
            await self.release_base(previous)

    async def delete(self, name: str) -> None:
        stored = self.store.get(name)
        await asyncio.to_thread(self.store.delete, name)
        self.registry.remove_source(name)
        if stored is not None:
            await self.release_base(stored)

    async def release_base(self, stored: StoredModel) -> None:
        """Delete a merged checkpoint once no model uses it (unloading it first)."""
        if not stored.owns_base or self.store.users_of(stored.base):
            return
        folder = self.store.absolute(stored.base)
        if not await self.registry.unload(str(folder.resolve())):
            logger.warning("merged checkpoint %s is still running requests; left on disk", folder)
            return
        await asyncio.to_thread(shutil.rmtree, folder, True)


def manager_of(request: Request) -> ModelManager:
    manager = request.app.state.model_manager
    if manager is None:
        raise InvalidRequestError(None, "model management needs a weights folder: start the server with --models-dir")
    return manager


# ----------------------------------------------------------------------------- request and answer bodies


class ManagementRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class ModelParameters(BaseModel):
    """A derived model's default options: the Ollama options this server honours."""

    model_config = ConfigDict(extra="forbid", strict=True)
    num_ctx: int | None = Field(None, ge=1)
    seed: int | None = None
    num_predict: int | None = None
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | str | None = None


class CreateRequest(ManagementRequest):
    """POST /api/create: a model derived from `from` (a model id, or a checkpoint / GGUF path in the weights folder)."""

    model: str | None = None
    name: str | None = None  # older spelling of model
    from_: str | None = Field(None, alias="from")
    adapters: dict[str, str] | list[str] | None = None  # LoRA adapter folders inside the weights folder
    system: str | None = None
    template: str | None = None  # a Jinja chat template
    parameters: dict[str, Any] | None = None  # Ollama options: defaults under each request's own
    license: str | list[str] | None = None  # accepted, not kept
    files: dict[str, Any] | None = None
    quantize: str | None = None
    modelfile: str | None = None
    messages: list[Any] | None = None
    stream: bool | None = True


class CopyRequest(ManagementRequest):
    source: str
    destination: str


class DeleteRequest(ManagementRequest):
    model: str | None = None
    name: str | None = None  # older spelling of model


class StatusAnswer(BaseModel):
    status: str


# ----------------------------------------------------------------------------- routes


@router.post("/create")
async def create(request: Request) -> Response:
    body = await parse_body(request, CreateRequest)
    manager = manager_of(request)
    refuse_unsupported(body)
    name = manager.new_name(body.model or body.name, "model")
    if not body.from_:
        raise InvalidRequestError("from", "from is required: a served model, or a checkpoint folder or .gguf file "
                                  "inside the weights folder")
    base, inherited = manager.resolve_from(body.from_)
    overrides = inherited.updated(ModelOverrides(body.system, body.template, checked_parameters(body.parameters)))
    if body.template is not None:
        check_template(body.template)
    owns_base = bool(body.adapters)
    if body.adapters:
        base = await merge_adapters(manager, name, base, adapter_paths(manager, body.adapters))
    stored = StoredModel(name, manager.store.relative(base), "created", overrides.system, overrides.template,
                         overrides.parameters, owns_base)
    await manager.save(stored)
    logger.info("created model %s from %s", name, body.from_)
    return status_answer(["using existing checkpoint", "writing manifest", "success"], body.stream is not False)


@router.post("/copy")
async def copy(request: Request) -> Response:
    body = await parse_body(request, CopyRequest)
    manager = manager_of(request)
    source = manager.registry.source(body.source)
    name = manager.new_name(body.destination, "destination")
    if source.path is None:
        raise InvalidRequestError("source", f"source: {body.source} has no checkpoint on disk to copy")
    original = manager.store.get(source.model_id)
    overrides = source.overrides
    stored = StoredModel(name, manager.store.relative(source.path), "copied", overrides.system, overrides.template,
                         overrides.parameters, original.owns_base if original else False)
    await manager.save(stored)
    return Response(status_code=200)


@router.delete("/delete")
async def delete(request: Request) -> Response:
    body = await parse_body(request, DeleteRequest)
    manager = manager_of(request)
    if not (body.model or body.name):
        raise InvalidRequestError("model", "model is required")
    source = manager.registry.source(body.model or body.name)
    if not source.deletable:
        raise InvalidRequestError("model", f"model: {source.model_id!r} is a checkpoint served from disk, not a model "
                                  "made with /api/create or /api/copy; remove it from the weights folder instead")
    manager.check_idle(source.model_id)
    await manager.delete(source.model_id)
    return Response(status_code=200)


@router.post("/pull")
async def pull() -> Response:
    raise APIError(501, "pull is not supported: this server has no network; models are imported from files "
                   "(put a checkpoint folder or .gguf file in the weights folder, or POST /api/create with from)",
                   code="not_supported")


@router.post("/push")
async def push() -> Response:
    raise APIError(501, "push is not supported: this server has no network", code="not_supported")


def refuse_unsupported(body: CreateRequest) -> None:
    unsupported = {
        "files": "files: uploaded blobs are not supported; give from a checkpoint folder or .gguf file "
                 "inside the weights folder",
        "modelfile": "modelfile: the Modelfile text is not supported; use from, system, template and parameters",
        "quantize": "quantize: not supported here; quantize with `hearth quantize`, then create from that checkpoint",
        "messages": "messages: preset conversations are not supported",
    }
    for field, message in unsupported.items():
        if getattr(body, field):
            raise InvalidRequestError(field, message)


def checked_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    try:
        checked = ModelParameters.model_validate(parameters or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"] if not str(part)[:1].isupper())
        raise InvalidRequestError(f"parameters.{where}", f"parameters.{where}: {first['msg']} (supported: "
                                  f"{', '.join(ModelParameters.model_fields)})") from None
    return checked.model_dump(exclude_none=True)


def check_template(template: str) -> None:
    """A Jinja chat template that compiles and renders a one-message chat."""
    from model.chat import ChatFormatError, _jinja_template

    try:
        _jinja_template(template).render(messages=[{"role": "user", "content": "hi"}], tools=None,
                                          add_generation_prompt=True, bos_token="", eos_token="")
    except ChatFormatError as exc:
        raise InvalidRequestError("template", f"template: {exc} (a Jinja chat template is expected; "
                                  "Ollama's Go templates are not supported)") from None
    except Exception as exc:  # jinja2 errors raised while rendering
        raise InvalidRequestError("template", f"template: does not render a chat ({exc})") from None


def adapter_paths(manager: ModelManager, adapters: dict[str, str] | list[str]) -> list[Path]:
    """Adapter folders inside the weights folder ({name: path} as Ollama's clients send, or a list)."""
    raw = list(adapters.values()) if isinstance(adapters, dict) else list(adapters)
    if len(raw) != 1:
        raise InvalidRequestError("adapters", f"adapters: give exactly one adapter folder (got {len(raw)})")
    paths = [manager.inside(path, "adapters") for path in raw]
    missing = [str(path) for path in paths if not path.is_dir()]
    if missing:
        raise APIError(404, f"adapters: {missing[0]} is not an adapter folder", param="adapters", code="adapter_not_found")
    return paths


async def merge_adapters(manager: ModelManager, name: str, base: Path, adapters: list[Path]) -> Path:
    """A checkpoint with the adapters merged in, under the weights folder's .hearth-merged/ (in a worker thread)."""
    from trainer.sft import merge_adapter_folder

    from server.registry import checkpoint_folder

    out = manager.weights_dir / MERGED_DIR / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{uuid.uuid4().hex[:8]}"

    def merge() -> Path:
        return merge_adapter_folder(checkpoint_folder(base), adapters[0], out)

    try:
        return await asyncio.to_thread(merge)
    except HearthError as exc:
        await asyncio.to_thread(shutil.rmtree, out, True)
        raise InvalidRequestError("adapters", f"adapters: {exc}") from None


def status_answer(steps: list[str], stream: bool) -> Response:
    if stream:
        lines = "".join(json.dumps({"status": step}) + "\n" for step in steps)
        return Response(lines, media_type="application/x-ndjson")
    return JSONResponse({"status": steps[-1]})


# ----------------------------------------------------------------------------- the residency middleware


class ModelResidencyMiddleware:
    """Load the model a request names (waiting for it), hold it while the route runs, apply its defaults."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] in MANAGEMENT_PATHS:
            return await self.app(scope, receive, send)
        try:
            body = await read_body(receive)
        except BodyTooLargeError as exc:  # counted by the body limit middleware, outside this one
            return await error_answer(scope, to_api_error(exc), receive, send)
        data = json_object(body)
        registry: ModelRegistry = scope["app"].state.registry
        name = requested_model(scope["path"], data, registry)
        if name is None:  # no model, an unknown one, or bad JSON: the route answers
            return await self.app(scope, replay(body, receive), send)
        try:
            keep_alive = request_keep_alive(scope["path"], data)
            if is_unload_request(scope["path"], data, keep_alive):
                registry.expire_now(name)
                return await unload_answer(scope, data, receive, send)
            lease = await registry.acquire(name)
        except Exception as exc:
            return await error_answer(scope, to_api_error(exc), receive, send)
        try:
            body = with_defaults(scope["path"], data, registry.catalog[lease.model_id].overrides, body)
            token = REQUEST_LOAD_SECONDS.set(lease.load_seconds)
            try:
                await self.app(with_length(scope, len(body)), replay(body, receive), send)
            finally:
                REQUEST_LOAD_SECONDS.reset(token)
        finally:
            registry.release(lease, keep_alive)


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the real channel (so the route still sees http.disconnect)."""
    sent = False

    async def replaying() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying


def with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    return {**scope, "headers": headers + [(b"content-length", str(length).encode())]}


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body) if body.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def requested_model(path: str, data: dict[str, Any] | None, registry: ModelRegistry) -> str | None:
    """The catalog id the request names, if it is one not loading at start-up."""
    if data is None:
        return None
    name = data.get("model") or (data.get("name") if path == "/api/show" else None)
    if name is None and path in OPTIONAL_MODEL_PATHS:
        name = registry.default_id()
    if not isinstance(name, str) or registry.resolve(name) not in registry.catalog:
        return None
    name = registry.resolve(name)
    return None if name in registry.pending else name


def request_keep_alive(path: str, data: dict[str, Any]) -> float | None | str:
    """The request's keep_alive (Ollama's routes), or "default" when it gives none."""
    if not is_ollama_path(path) or data.get("keep_alive") is None:
        return "default"
    return parse_keep_alive(data["keep_alive"], "keep_alive")


def is_unload_request(path: str, data: dict[str, Any], keep_alive: float | None | str) -> bool:
    """Ollama's way to unload a model: keep_alive 0 and nothing to generate."""
    if keep_alive != 0 or path not in ("/api/generate", "/api/chat"):
        return False
    return not (data.get("prompt") or data.get("context") or data.get("messages"))


async def unload_answer(scope: Scope, data: dict[str, Any], receive: Receive, send: Send) -> None:
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")  # RFC 3339, as Ollama writes it
    answer: dict[str, Any] = {"model": data.get("model"), "created_at": now, "done": True, "done_reason": "unload"}
    if scope["path"] == "/api/chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    media_type = "application/x-ndjson" if data.get("stream") is not False else "application/json"
    await Response(json.dumps(answer) + "\n", media_type=media_type)(scope, receive, send)


async def error_answer(scope: Scope, error: APIError, receive: Receive, send: Send) -> None:
    body = error.ollama_body() if is_ollama_path(scope["path"]) else error.openai_body()
    await JSONResponse(body, status_code=error.status, headers=error.headers)(scope, receive, send)


# ----------------------------------------------------------------------------- a derived model's defaults


OPENAI_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                     "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}
SYSTEM_ROLES = ("system", "developer")


def with_defaults(path: str, data: dict[str, Any], overrides: ModelOverrides, body: bytes) -> bytes:
    """The request body with the model's defaults where the request leaves them out."""
    if overrides.system is None and not overrides.parameters:
        return body  # a template acts through the tokenizer (ServedModel.tokenizer)
    filled = dict(data)
    if path in ("/api/chat", "/api/generate"):
        ollama_defaults(path, filled, overrides)
    elif path in ("/v1/chat/completions", "/v1/completions"):
        openai_defaults(path, filled, overrides)
    elif path == "/v1/responses":
        responses_defaults(filled, overrides)
    else:
        return body
    return json.dumps(filled).encode()


def ollama_defaults(path: str, data: dict[str, Any], overrides: ModelOverrides) -> None:
    if overrides.parameters:
        given = data.get("options")
        data["options"] = {**overrides.parameters, **(given if isinstance(given, dict) else {})}
    if overrides.system is None:
        return
    if path == "/api/generate" and not data.get("system"):
        data["system"] = overrides.system
    if path == "/api/chat":
        data["messages"] = with_system_message(data.get("messages"), overrides.system)


def with_system_message(messages: Any, system: str) -> Any:
    if not isinstance(messages, list) or not messages:
        return messages
    if any(isinstance(m, dict) and m.get("role") in SYSTEM_ROLES for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def openai_defaults(path: str, data: dict[str, Any], overrides: ModelOverrides) -> None:
    for ollama_name, openai_name in OPENAI_PARAMETERS.items():
        if ollama_name in overrides.parameters and data.get(openai_name) is None:
            data[openai_name] = overrides.parameters[ollama_name]
    num_predict = overrides.parameters.get("num_predict")
    if isinstance(num_predict, int) and num_predict > 0 and data.get("max_tokens") is None \
            and data.get("max_completion_tokens") is None:
        data["max_tokens"] = num_predict
    if overrides.system is not None and path == "/v1/chat/completions":
        data["messages"] = with_system_message(data.get("messages"), overrides.system)


def responses_defaults(data: dict[str, Any], overrides: ModelOverrides) -> None:
    for name in ("temperature", "top_p"):
        if name in overrides.parameters and data.get(name) is None:
            data[name] = overrides.parameters[name]
    num_predict = overrides.parameters.get("num_predict")
    if isinstance(num_predict, int) and num_predict > 0 and data.get("max_output_tokens") is None:
        data["max_output_tokens"] = num_predict
    items = data.get("input")
    has_system = isinstance(items, list) and any(isinstance(m, dict) and m.get("role") in SYSTEM_ROLES for m in items)
    if overrides.system is not None and not data.get("instructions") and not has_system:
        data["instructions"] = overrides.system
