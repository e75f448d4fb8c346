"""The served models: which exist, which are loaded, and the facts the APIs report.

Design choices:
- Model ids are known before any weights are read (the checkpoint folder's
  name), so a request for a model still loading gets 503 "loading" and a
  request for an unknown one 404, from the first second the port is open.
- Loading runs in a worker thread (`asyncio.to_thread`) from the app's
  lifespan, so uvicorn answers `/health` (503) while weights stream in; each
  engine is started on the event loop's thread once its weights are in.
- Facts for /v1/models, /api/tags, /api/show come from config.json and the
  engine (never from the folder name beyond the id): parameter count,
  context length, quantization, a cheap digest of the checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_metadata
from model.errors import HearthError
from server.core.pieces import TokenPieces
from server.http_errors import RETRY_AFTER_SECONDS, APIError, model_not_found

logger = logging.getLogger("hearth.server")


@dataclass
class ServedModel:
    """One loaded checkpoint and what the APIs say about it."""

    model_id: str  # folder name; "model" in every request
    path: Path | None  # checkpoint folder (None for an engine handed in directly)
    engine: Any  # server.engine.engine.Engine
    metadata: dict[str, Any]  # config.json
    created: int  # unix time the model was loaded (OpenAI's "created")
    load_seconds: float  # how long loading took (logged)
    size_bytes: int  # weights file size
    digest: str  # sha256 of config.json + weights size and mtime: changes when the checkpoint does
    modified_at: float  # weights file mtime

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @cached_property
    def token_pieces(self) -> TokenPieces:
        """Per-token text and bytes for logprobs, cached per model."""
        return TokenPieces(self.engine.tokenizer)

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def num_params(self) -> int:
        return self.engine.model_config.num_params()

    @property
    def quantization_level(self) -> str:
        """Ollama's quantization_level: INT8 / INT4 (weight-only, config.json quantization.modules) or BF16 / F32."""
        modules = (self.metadata.get("quantization") or {}).get("modules") or {}
        methods = sorted({str(entry.get("method", "")).upper() for entry in modules.values() if isinstance(entry, dict)})
        if methods:
            return "+".join(methods)
        return str(self.metadata.get("dtype", "float32")).upper().replace("BFLOAT", "BF").replace("FLOAT", "F")

    @property
    def system_fingerprint(self) -> str:
        return f"fp_{self.digest[:10]}"


def describe_checkpoint(model_id: str, path: Path | None, engine: Any, load_seconds: float) -> ServedModel:
    metadata = read_metadata(path) if path is not None else {}
    weights = path / WEIGHTS_FILE if path is not None else None
    stat = weights.stat() if weights is not None and weights.is_file() else None
    hasher = hashlib.sha256()
    if path is not None:
        hasher.update((path / CONFIG_FILE).read_bytes())
    hasher.update(f"{model_id}:{stat.st_size if stat else 0}:{stat.st_mtime_ns if stat else 0}".encode())
    return ServedModel(
        model_id=model_id,
        path=path,
        engine=engine,
        metadata=metadata,
        created=int(time.time()),
        load_seconds=load_seconds,
        size_bytes=stat.st_size if stat else 0,
        digest=hasher.hexdigest(),
        modified_at=stat.st_mtime if stat else time.time(),
    )


def load_engine(path: Path, settings: dict[str, Any]) -> Any:
    """Build an engine from a checkpoint folder (runs in a worker thread).

    `settings` is the server's settings as a dict; the ones EngineConfig
    takes (device, dtype, max_num_seqs, ...) are passed on by name.
    """
    from server.engine.engine import Engine, EngineConfig  # heavy: torch

    accepted = inspect.signature(EngineConfig).parameters
    options = {name: value for name, value in settings.items() if name in accepted}
    return Engine.from_checkpoint(str(path), EngineConfig(**options))


@dataclass
class ModelRegistry:
    """Models by id, plus the loading state /health reports."""

    pending: dict[str, Path] = field(default_factory=dict)  # ids still loading -> their folders
    models: dict[str, ServedModel] = field(default_factory=dict)  # ready to serve
    load_error: str | None = None  # set when a checkpoint failed to load
    owned: set[str] = field(default_factory=set)  # ids whose engines we built, and so shut down
    on_ready: list[Callable[[ServedModel], None]] = field(default_factory=list)  # hooks run as each model is ready
    adapters: Any = None  # server/adapters.AdapterTable: LoRA adapters served as models (server/lora_api.py)

    @classmethod
    def from_entries(cls, entries: list[tuple[str, Path]]) -> "ModelRegistry":
        """From (model id, checkpoint folder) pairs, as `ServerSettings.model_entries()` gives them."""
        pending: dict[str, Path] = {}
        for model_id, path in entries:
            if model_id in pending:
                raise HearthError(f"models: two checkpoints are named '{model_id}' (the id is the folder name)")
            pending[model_id] = Path(path)
        return cls(pending=pending)

    @classmethod
    def from_engines(cls, engines: dict[str, Any], paths: dict[str, Path] | None = None) -> "ModelRegistry":
        registry = cls()
        for model_id, engine in engines.items():
            path = (paths or {}).get(model_id)
            registry.models[model_id] = describe_checkpoint(model_id, path, engine, 0.0)
        return registry

    @property
    def ready(self) -> bool:
        return not self.pending and self.load_error is None

    @property
    def model_ids(self) -> list[str]:
        return [*self.models, *self.pending]

    def get(self, model_id: str | None) -> ServedModel:
        """The model a request names; 404 if unknown, 503 while it loads. "NAME:latest" is NAME (Ollama's tags)."""
        if model_id and model_id.endswith(":latest") and model_id not in self.model_ids:
            model_id = model_id.removesuffix(":latest")
        if model_id in self.models:
            return self.models[model_id]
        if self.adapters is not None and model_id in self.adapters:
            return self.adapters.get(model_id)
        if model_id in self.pending:
            status = self.load_error or "model is still loading; retry shortly"
            raise APIError(503, f"{model_id}: {status}", code="model_loading", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        raise model_not_found(str(model_id), self.model_ids)

    def default(self) -> ServedModel:
        """The first served model (for routes where `model` is optional)."""
        return self.get(self.model_ids[0] if self.model_ids else "")

    async def load_all(self, engine_settings: dict[str, Any], on_failure: Callable[[Exception], None] | None = None) -> None:
        """Load every pending checkpoint, one after another, off the event loop."""
        for model_id, path in list(self.pending.items()):
            started = time.perf_counter()
            try:
                engine = await asyncio.to_thread(load_engine, path, engine_settings)
                engine.start()
                served = await asyncio.to_thread(describe_checkpoint, model_id, path, engine, time.perf_counter() - started)
            except Exception as exc:  # reported by /health and the CLI, not raised into the event loop
                self.load_error = f"failed to load {path}: {exc}"
                logger.error(self.load_error, exc_info=not isinstance(exc, HearthError))
                if on_failure is not None:
                    on_failure(exc)
                return
            for hook in self.on_ready:  # e.g. wrap the engine for metrics
                hook(served)
            self.models[model_id] = served
            self.owned.add(model_id)
            del self.pending[model_id]
            logger.info("loaded %s from %s in %.1f s", model_id, path, served.load_seconds)

    def shutdown(self) -> None:
        for served in self.models.values():
            if served.model_id not in self.owned:
                continue  # engines handed in by the caller are the caller's to stop
            try:
                served.engine.shutdown()
            except Exception:  # shutting down anyway; one engine's failure must not block the others
                logger.exception("engine %s failed to shut down", served.model_id)
