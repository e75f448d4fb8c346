"""LoRA adapter routes (vLLM's names) and the adapters given with `hearth serve --lora NAME=DIR`.

    POST /v1/load_lora_adapter   {"lora_name": "pirate", "lora_path": "pirate"}   (+ Hearth's "base_model")
    POST /v1/unload_lora_adapter {"lora_name": "pirate"}

Design choices:
- `install(app)` is the one line server/app.py needs: it puts an `AdapterTable` on the registry
  (`registry.adapters`, which `ModelRegistry.get` consults), adds the routes, and loads each
  `--lora` adapter as soon as its base is ready (a registry `on_ready` hook), so /health says 200
  only once the adapters given at start-up serve too. A start-up adapter that fails to load is a
  load error (/health 503 naming it), like a model that fails.
- The routes sit behind the API key like every other (server/auth.py).
- `lora_path` is relative to the weights folder (`--weights-dir`) or absolute, and must resolve,
  symlinks followed, inside it: 400 otherwise. `--lora` paths on the command line are the
  operator's and are not restricted.
- Errors: unknown adapter or base 404, bad name/path/adapter 400 (naming the adapter and the
  base when they do not match), unloading an adapter with requests running 409.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from model.errors import HearthError
from server.adapters.table import AdapterTable, check_lora_entries, choose_base, load_into_engine
from server.core.http import parse_body
from server.http_errors import APIError
from server.openapi import OpenAIError

logger = logging.getLogger("hearth.server")
router = APIRouter(tags=["lora"])


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    lora_name: str
    lora_path: str
    base_model: str | None = None  # Hearth's extra: the served model to put it on (default: see server/adapters/table.py)


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    lora_name: str


class LoRAAnswer(BaseModel):
    status: str  # "ok"
    lora_name: str
    message: str  # vLLM's text: "Success: LoRA adapter 'NAME' added successfully."
    parent: str | None = None  # load: the base model it serves on
    lora_path: str | None = None  # load: the folder it was read from


def documented(request_model: type[BaseModel], *errors: tuple[int, str]) -> dict[str, Any]:
    """FastAPI route options documenting a body the route parses itself (server/openapi.py) and its errors."""
    body = {"required": True, "content": {"application/json": {"schema": request_model.model_json_schema()}}}
    responses = {status: {"description": text, "model": OpenAIError} for status, text in errors}
    return {"openapi_extra": {"requestBody": body}, "responses": responses, "response_model": LoRAAnswer}


def install(app: Any) -> AdapterTable:
    """Adapter table on the registry, the routes, and the start-up adapters' loading hook."""
    registry, settings = app.state.registry, app.state.settings
    table = registry.adapters = AdapterTable()
    app.include_router(router)
    startup = check_lora_entries(list(getattr(settings, "lora", None) or []), registry.model_ids)
    if startup:
        bases = {name: choose_base(folder, list(registry.pending.items())) for name, folder in startup}
        registry.on_ready.append(lambda served: load_startup_adapters(registry, table, served, startup, bases, settings))
    return table


def load_startup_adapters(registry: Any, table: AdapterTable, served: Any, startup: list[tuple[str, Path]],
                          bases: dict[str, str | None], settings: Any) -> None:
    """The --lora adapters whose base is `served`, loaded now; a failure becomes the registry's load error."""
    for name, folder in startup:
        if bases.get(name) != served.model_id:
            continue
        try:
            load_into_engine(served, name, folder, settings.max_lora_rank)
        except HearthError as exc:
            registry.load_error = f"--lora {name}={folder}: {exc}"
            logger.error(registry.load_error)
            return
        table.add(served, name, folder)
        logger.info("serving LoRA adapter %s (%s) on %s", name, folder, served.model_id)


def resolve_lora_path(lora_path: str, weights_dir: str) -> Path:
    """lora_path (relative to the weights folder, or absolute) -> its real folder, which must lie inside."""
    root = Path(weights_dir).expanduser().resolve()
    path = Path(lora_path).expanduser()
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not resolved.is_relative_to(root):
        raise APIError(400, f"lora_path: {lora_path} is outside the weights folder {root} (--weights-dir)",
                       param="lora_path")
    return resolved


@router.post("/v1/load_lora_adapter", **documented(
    LoadLoRARequest, (400, "bad name or path, or an adapter this base cannot serve (the message says why)"),
    (404, "unknown base_model"), (413, "request body over the server's limit (--max-body-bytes)"),
    (503, "the base model is still loading")))
async def load_lora_adapter(request: Request) -> LoRAAnswer:
    body = await parse_body(request, LoadLoRARequest)
    settings, registry = request.app.state.settings, request.app.state.registry
    folder = resolve_lora_path(body.lora_path, settings.weights_dir)
    try:
        model = await registry.adapters.load(registry, body.lora_name, folder, body.base_model, settings.max_lora_rank)
    except HearthError as exc:  # AdapterError: missing files, bad config, another base, rank or targets
        raise APIError(400, str(exc), param="lora_path") from None
    logger.info("loaded LoRA adapter %s from %s on %s", model.model_id, folder, model.parent)
    return LoRAAnswer(status="ok", lora_name=model.model_id, parent=model.parent, lora_path=str(folder),
                      message=f"Success: LoRA adapter '{model.model_id}' added successfully.")


@router.post("/v1/unload_lora_adapter", **documented(
    UnloadLoRARequest, (400, "bad body"), (404, "no adapter of that name is loaded"), (413, "request body over the limit"),
    (409, "requests still use the adapter; retry when they finish")))
async def unload_lora_adapter(request: Request) -> LoRAAnswer:
    body = await parse_body(request, UnloadLoRARequest)
    model = request.app.state.registry.adapters.unload(body.lora_name)
    logger.info("unloaded LoRA adapter %s from %s", model.model_id, model.parent)
    return LoRAAnswer(status="ok", lora_name=model.model_id,
                      message=f"Success: LoRA adapter '{model.model_id}' removed successfully.")
