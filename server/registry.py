"""The served models: which exist, which are loaded, for how long, and the facts the APIs report.

Design choices:
- The catalog (`ModelSource` by id) is known before any weights are read:
  the `--model` folders (id: the folder name or NAME=), every checkpoint
  folder and .gguf file under `--models-dir` (id: its path inside the
  folder, without .gguf), and the models /api/create and /api/copy made
  (server/ollama/model_store.py). An unknown id is a 404 from the first second.
- A loaded checkpoint is a `Runner`: one engine per checkpoint, shared by
  every id that loads it (a derived model and its base step on the same
  engine; only their defaults differ). `models` holds the per-id views
  (`ServedModel`) of the loaded runners: the routes read `served.engine`.
- `--model` checkpoints load at start-up in the app's lifespan (requests
  meanwhile: 503 + Retry-After, /health 503) and stay loaded unless a
  request's keep_alive says otherwise. Other models load on their first
  request: `acquire` loads (in a worker thread; one load per checkpoint,
  later requests for it wait on the same load) and counts the request as
  running; `release` starts the keep-alive clock when the last one ends.
- Invariants: a runner with running requests is never unloaded (idle expiry
  and LRU eviction both re-check `active == 0` on the event loop thread,
  with no await between the check and the removal); at most `max_loaded`
  runners are loaded or loading; when a load needs room, the least recently
  used idle runner goes first, and if every runner is busy the request gets
  503 + Retry-After instead of waiting for an unknown time.
- Facts for /v1/models, /api/tags, /api/show come from config.json and the
  engine (never from the folder name beyond the id): parameter count,
  context length, quantization, a cheap digest of the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import inspect
import json
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

# Seconds the current request spent waiting for its model to load (Ollama's load_duration);
# set by the residency middleware (server/ollama/management.py) around each model request.
REQUEST_LOAD_SECONDS: contextvars.ContextVar[float] = contextvars.ContextVar("hearth_request_load_seconds", default=0.0)


BACKGROUND_LOAD_GRACE_SECONDS = 30.0  # a model loaded for a 503'd request waits this long for the retry


def request_load_seconds() -> float:
    return REQUEST_LOAD_SECONDS.get()


@dataclass
class ModelOverrides:
    """A derived model's defaults (/api/create): system prompt, Jinja chat template, Ollama options."""

    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def updated(self, newer: "ModelOverrides") -> "ModelOverrides":
        """These defaults with `newer`'s on top (a model derived from a derived model)."""
        return ModelOverrides(newer.system if newer.system is not None else self.system,
                              newer.template if newer.template is not None else self.template,
                              {**self.parameters, **newer.parameters})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def empty(self) -> bool:
        return self.system is None and self.template is None and not self.parameters


class TemplatedTokenizer:
    """A tokenizer whose chat template is a derived model's Jinja template (everything else: the base's)."""

    def __init__(self, base: Any, template: str):
        self._base = base
        self.info = dataclasses.replace(base.info, chat_template="jinja", jinja_template=template)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def quantization_level(metadata: dict[str, Any]) -> str:
    """Ollama's quantization_level: INT8 / INT4 (weight-only, config.json quantization.modules) or BF16 / F32."""
    modules = (metadata.get("quantization") or {}).get("modules") or {}
    methods = sorted({str(entry.get("method", "")).upper() for entry in modules.values() if isinstance(entry, dict)})
    if methods:
        return "+".join(methods)
    return str(metadata.get("dtype", "float32")).upper().replace("BFLOAT", "BF").replace("FLOAT", "F")


@dataclass
class ServedModel:
    """One loaded model id and what the APIs say about it."""

    model_id: str  # "model" in every request
    path: Path | None  # checkpoint folder (None for an engine handed in directly)
    engine: Any  # server.engine.engine.Engine
    metadata: dict[str, Any]  # config.json
    created: int  # unix time the model was loaded (OpenAI's "created")
    load_seconds: float  # how long loading took (logged)
    size_bytes: int  # weights file size
    digest: str  # sha256 of config.json + weights size and mtime (+ a derived model's defaults)
    modified_at: float  # weights file mtime
    overrides: ModelOverrides = field(default_factory=ModelOverrides)  # a derived model's defaults

    @property
    def tokenizer(self):
        if self.overrides.template is not None:
            return TemplatedTokenizer(self.engine.tokenizer, self.overrides.template)
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
        return quantization_level(self.metadata)

    @property
    def system_fingerprint(self) -> str:
        return f"fp_{self.digest[:10]}"


def checkpoint_digest(model_id: str, path: Path | None, overrides: ModelOverrides | None = None) -> str:
    """sha256 of config.json, the weights' size and mtime, the id and a derived model's defaults."""
    weights = path / WEIGHTS_FILE if path is not None and path.is_dir() else path
    stat = weights.stat() if weights is not None and weights.is_file() else None
    hasher = hashlib.sha256()
    if path is not None and (path / CONFIG_FILE).is_file():
        hasher.update((path / CONFIG_FILE).read_bytes())
    hasher.update(f"{model_id}:{stat.st_size if stat else 0}:{stat.st_mtime_ns if stat else 0}".encode())
    if overrides is not None and not overrides.empty:
        hasher.update(overrides.to_json().encode())
    return hasher.hexdigest()


def describe_checkpoint(model_id: str, path: Path | None, engine: Any, load_seconds: float) -> ServedModel:
    metadata = read_metadata(path) if path is not None else {}
    weights = path / WEIGHTS_FILE if path is not None else None
    stat = weights.stat() if weights is not None and weights.is_file() else None
    return ServedModel(
        model_id=model_id,
        path=path,
        engine=engine,
        metadata=metadata,
        created=int(time.time()),
        load_seconds=load_seconds,
        size_bytes=stat.st_size if stat else 0,
        digest=checkpoint_digest(model_id, path),
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


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder of a source: the folder itself, or a .gguf file's import in the cache."""
    from model.gguf_import import cached_import, is_gguf_file

    return cached_import(path) if is_gguf_file(path) else path


# ----------------------------------------------------------------------------- catalog


ORIGINS = ("startup", "folder", "created", "copied", "engine")


@dataclass
class ModelSource:
    """A model the server can serve: its id, the checkpoint folder or .gguf file it loads, its defaults."""

    model_id: str
    path: Path | None  # None: an engine handed to create_app
    origin: str  # one of ORIGINS
    overrides: ModelOverrides = field(default_factory=ModelOverrides)

    @property
    def key(self) -> str:
        """The runner this model loads: one per checkpoint."""
        return str(self.path.resolve()) if self.path is not None else f"engine:{self.model_id}"

    @property
    def deletable(self) -> bool:
        return self.origin in ("created", "copied")


@dataclass
class ListedFacts:
    """What /api/tags says about a model that is not loaded (same attribute names as ServedModel's)."""

    model_id: str
    size_bytes: int
    digest: str
    modified_at: float
    num_params: int
    quantization_level: str
    max_seq_len: int  # context length (0 if unknown before loading)

    @property
    def created(self) -> int:
        return int(self.modified_at)


def source_facts(source: ModelSource) -> ListedFacts:
    """Facts from config.json (or the GGUF header) without loading any weights."""
    from model.config import ModelConfig

    path = source.path
    digest = checkpoint_digest(source.model_id, path, source.overrides)
    if path is not None and path.is_dir():
        metadata = read_metadata(path)
        weights = path / WEIGHTS_FILE
        stat = weights.stat() if weights.is_file() else None
        config = ModelConfig.from_dict(metadata.get("model", {}))
        return ListedFacts(source.model_id, stat.st_size if stat else 0, digest, stat.st_mtime if stat else 0.0,
                           config.num_params(), quantization_level(metadata), config.max_seq_len)
    stat = path.stat() if path is not None else None
    config = gguf_config(path) if path is not None else None
    return ListedFacts(source.model_id, stat.st_size if stat else 0, digest, stat.st_mtime if stat else 0.0,
                       config.num_params() if config else 0, "GGUF", config.max_seq_len if config else 0)


def gguf_config(file: Path) -> Any:
    """The ModelConfig a GGUF file's header describes (None if it cannot be read)."""
    from model.gguf_import import model_config_from_gguf, open_gguf

    try:
        reader = open_gguf(file)
        return model_config_from_gguf(reader.fields, {t.name: t for t in reader.tensors}, file)
    except Exception:  # listing must not fail on a file that will fail, with its reason, when loaded
        return None


# ----------------------------------------------------------------------------- loaded engines


@dataclass
class Runner:
    """One loaded checkpoint's engine, shared by every model id that loads that checkpoint."""

    key: str
    base: ServedModel  # facts + the engine as loaded (views get copies, which on_ready hooks may wrap)
    owned: bool  # built here (so unloaded and shut down here); engines handed in are the caller's
    pinned: bool  # a --model checkpoint: no idle expiry unless a request sets keep_alive
    active: int = 0  # requests running on it (acquired, not yet released)
    last_used: float = field(default_factory=time.monotonic)
    keep_alive: float | None | str = "default"  # the last request's keep_alive (seconds, None: forever)
    expires_at: float | None = None  # unix time it unloads if still idle; None: never
    timer: asyncio.TimerHandle | None = None
    names: set[str] = field(default_factory=set)  # ids whose views are in ModelRegistry.models

    @property
    def engine(self) -> Any:
        return self.base.engine

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


@dataclass
class Lease:
    """One request's hold on a loaded model: it cannot unload until released."""

    model_id: str
    runner: Runner | None
    load_seconds: float  # how long this request waited for a load (0 if it was loaded)


@dataclass
class ModelRegistry:
    """Models by id, what is loaded, and the loading state /health reports."""

    pending: dict[str, Path] = field(default_factory=dict)  # --model ids still loading at start-up
    models: dict[str, ServedModel] = field(default_factory=dict)  # loaded: ready to serve
    load_error: str | None = None  # set when a --model checkpoint failed to load at start-up
    on_ready: list[Callable[[ServedModel], None]] = field(default_factory=list)  # hooks run on each new view
    catalog: dict[str, ModelSource] = field(default_factory=dict)  # every servable id
    runners: dict[str, Runner] = field(default_factory=dict)  # loaded checkpoints by ModelSource.key
    loading: dict[str, asyncio.Task] = field(default_factory=dict)  # on-demand loads in progress by key
    active_by_id: dict[str, int] = field(default_factory=dict)  # running requests per model id
    keep_alive: float | None = 300.0  # default seconds an on-demand model stays loaded when idle
    max_loaded: int = 3  # runners loaded or loading at once
    engine_settings: dict[str, Any] = field(default_factory=dict)  # for on-demand loads (EngineConfig fields)
    loop: asyncio.AbstractEventLoop | None = None  # the event loop it lives on (set by load_all at start-up)
    adapters: Any = None  # server/adapters.AdapterTable: LoRA adapters served as models (server/adapters/api.py)

    @classmethod
    def from_entries(cls, entries: list[tuple[str, Path]]) -> "ModelRegistry":
        """From (model id, checkpoint folder) pairs, as `ServerSettings.model_entries()` gives them."""
        registry = cls()
        for model_id, path in entries:
            if model_id in registry.catalog:
                raise HearthError(f"models: two checkpoints are named '{model_id}' (the id is the folder name)")
            registry.catalog[model_id] = ModelSource(model_id, Path(path), "startup")
            registry.pending[model_id] = Path(path)
        return registry

    @classmethod
    def from_engines(cls, engines: dict[str, Any], paths: dict[str, Path] | None = None) -> "ModelRegistry":
        registry = cls()
        for model_id, engine in engines.items():
            path = (paths or {}).get(model_id)
            source = ModelSource(model_id, path, "engine")
            registry.catalog[model_id] = source
            runner = Runner(source.key, describe_checkpoint(model_id, path, engine, 0.0), owned=False, pinned=True)
            registry.runners[runner.key] = runner
            registry._add_view(source, runner)
        return registry

    # ------------------------------------------------------------------ lookups

    @property
    def ready(self) -> bool:
        return not self.pending and self.load_error is None

    @property
    def model_ids(self) -> list[str]:
        return list(self.catalog)

    def resolve(self, model_id: str | None) -> str:
        """The catalog id a request names: "NAME:latest" is NAME (Ollama's tags)."""
        model_id = model_id or ""
        if model_id not in self.catalog and model_id.endswith(":latest"):
            return model_id.removesuffix(":latest")
        return model_id

    def source(self, model_id: str | None) -> ModelSource:
        """The catalog entry a request names; 404 if unknown."""
        name = self.resolve(model_id)
        if name not in self.catalog:
            raise model_not_found(str(model_id), self.model_ids)
        return self.catalog[name]

    def get(self, model_id: str | None) -> ServedModel:
        """The loaded model a request names; 404 if unknown, 503 while it loads (a model not loaded starts loading)."""
        if self.adapters is not None and model_id in self.adapters:  # a LoRA adapter (server/adapters/table.py)
            return self.adapters.get(model_id)
        source = self.source(model_id)
        name = source.model_id
        if name in self.models:
            return self.models[name]
        if source.key in self.runners and name not in self.pending:  # its checkpoint is loaded (a derived model's base)
            return self._add_view(source, self.runners[source.key])
        if name in self.pending:
            status = self.load_error or "model is still loading; retry shortly"
            raise APIError(503, f"{name}: {status}", code="model_loading", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self._load_in_background(name)
        raise APIError(503, f"{name}: model is not loaded; it is loading now, retry shortly", code="model_loading",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def default(self) -> ServedModel:
        """The first served model (for routes where `model` is optional)."""
        return self.get(self.default_id())

    def default_id(self) -> str:
        return self.model_ids[0] if self.model_ids else ""

    def describe(self, model_id: str | None) -> Any:
        """The loaded view, else facts read from disk (no load); 404 if unknown, 503 while it loads at start-up."""
        if self.adapters is not None and model_id in self.adapters:
            return self.adapters.get(model_id)
        name = self.source(model_id).model_id
        if name in self.models or name in self.pending:
            return self.get(name)
        try:
            return source_facts(self.catalog[name])
        except (HearthError, OSError) as exc:
            raise APIError(500, f"{name}: cannot read its checkpoint ({exc})", code="model_load_failed") from None

    def listed(self) -> list[Any]:
        """Every servable model for /api/tags and /v1/models: the loaded view, else facts read from disk."""
        listed = []
        for name, source in list(self.catalog.items()):
            if name in self.models:
                listed.append(self.models[name])
                continue
            try:
                listed.append(source_facts(source))
            except (HearthError, OSError) as exc:  # deleted or broken since discovery: left out, logged
                logger.warning("not listing %s: %s", name, exc)
        return listed + [self.adapters.get(name) for name in (self.adapters or ())]  # then LoRA adapters

    def runner_of(self, model_id: str) -> Runner | None:
        source = self.catalog.get(model_id)
        return self.runners.get(source.key) if source is not None else None

    def expires_at(self, model_id: str) -> float | None:
        """Unix time the model unloads if it stays idle; None: never (for /api/ps)."""
        runner = self.runner_of(model_id)
        if runner is None or runner.active == 0:
            return runner.expires_at if runner is not None else None
        seconds = self._idle_seconds(runner)
        return None if seconds is None else time.time() + seconds

    # ------------------------------------------------------------------ catalog changes

    def add_source(self, source: ModelSource) -> None:
        """Add or replace a catalog entry; a replaced id's loaded view is dropped (its next request gets the new one)."""
        self.catalog[source.model_id] = source
        self._drop_view(source.model_id)

    def remove_source(self, model_id: str) -> ModelSource:
        source = self.catalog.pop(model_id)
        self._drop_view(model_id)
        return source

    def _drop_view(self, model_id: str) -> None:
        self.models.pop(model_id, None)
        for runner in self.runners.values():
            runner.names.discard(model_id)

    def _add_view(self, source: ModelSource, runner: Runner) -> ServedModel:
        served = dataclasses.replace(runner.base, model_id=source.model_id, overrides=source.overrides,
                                     digest=checkpoint_digest(source.model_id, runner.base.path, source.overrides))
        for hook in self.on_ready:  # e.g. wrap the engine for metrics
            hook(served)
        self.models[source.model_id] = served
        runner.names.add(source.model_id)
        return served

    # ------------------------------------------------------------------ requests

    def running_requests(self, model_id: str) -> int:
        return self.active_by_id.get(model_id, 0)

    async def acquire(self, model_id: str | None) -> Lease:
        """Hold the named model loaded for one request, loading it first if needed (the caller waits)."""
        source = self.source(model_id)
        name = source.model_id
        if name in self.pending:
            self.get(name)  # raises the start-up 503
        started, waited = time.perf_counter(), 0.0
        runner = self.runners.get(source.key)
        while runner is None:  # re-checked: a load can finish and the runner unload before this resumes
            await self._load_shared(source)
            runner = self.runners.get(source.key)
            waited = time.perf_counter() - started
        runner.cancel_timer()
        runner.active += 1
        runner.expires_at = None
        self.active_by_id[name] = self.active_by_id.get(name, 0) + 1
        if name not in self.models or name not in runner.names:
            self._add_view(source, runner)
        return Lease(name, runner, waited)

    def release(self, lease: Lease, keep_alive: float | None | str = "default") -> None:
        """A request is over; `keep_alive` (seconds, None: forever) is the request's own, if it gave one."""
        self.active_by_id[lease.model_id] = max(0, self.active_by_id.get(lease.model_id, 0) - 1)
        runner = lease.runner
        if runner is None:
            return
        runner.active -= 1
        runner.last_used = time.monotonic()
        if keep_alive != "default":
            runner.keep_alive = keep_alive
        if runner.active == 0:
            self._schedule_expiry(runner)

    def expire_now(self, model_id: str) -> None:
        """Ollama's unload request (keep_alive 0, no prompt): unload once its running requests finish."""
        runner = self.runner_of(self.source(model_id).model_id)
        if runner is not None:
            runner.keep_alive = 0.0
            if runner.active == 0:
                self._schedule_expiry(runner)

    def _idle_seconds(self, runner: Runner) -> float | None:
        if runner.keep_alive != "default":
            return runner.keep_alive  # type: ignore[return-value]
        return None if runner.pinned or not runner.owned else self.keep_alive

    def _schedule_expiry(self, runner: Runner, minimum: float = 0.0) -> None:
        runner.cancel_timer()
        seconds = self._idle_seconds(runner)
        if seconds is None or not runner.owned:
            runner.expires_at = None
            return
        seconds = max(seconds, minimum)
        runner.expires_at = time.time() + seconds
        loop = asyncio.get_running_loop()
        runner.timer = loop.call_later(seconds, self._expire, runner)

    def _expire(self, runner: Runner) -> None:
        runner.timer = None
        if runner.active or self.runners.get(runner.key) is not runner:
            return
        if engine_busy(runner.engine):  # a request that came in some other way: look again shortly
            runner.timer = asyncio.get_running_loop().call_later(RETRY_AFTER_SECONDS, self._expire, runner)
            return
        logger.info("unloading %s (idle past its keep-alive)", ", ".join(sorted(runner.names)) or runner.key)
        asyncio.get_running_loop().create_task(shut_down(self._detach(runner)))

    def _detach(self, runner: Runner) -> Runner:
        """Forget a runner (the caller checked it is idle); its engine is shut down by the caller."""
        runner.cancel_timer()
        del self.runners[runner.key]
        for name in runner.names:
            self.models.pop(name, None)
        runner.names.clear()
        runner.expires_at = None
        return runner

    async def unload(self, key: str) -> bool:
        """Unload a checkpoint (by ModelSource.key) now if it is idle; False if it has running requests."""
        runner = self.runners.get(key)
        if runner is None:
            return True
        if runner.active or not runner.owned:
            return False
        await shut_down(self._detach(runner))
        return True

    # ------------------------------------------------------------------ loading

    def _load_in_background(self, model_id: str) -> None:
        """Start loading a model a route asked for synchronously (it answered 503 meanwhile)."""
        source = self.catalog[model_id]
        if source.key in self.runners or source.key in self.loading:
            return
        try:
            task = self._start_load(source)
        except APIError:
            return  # no room now; the client's retry will try again
        task.add_done_callback(self._loaded_in_background)

    def _loaded_in_background(self, task: asyncio.Task) -> None:
        """Nobody holds a model loaded for a retry that may never come: start its keep-alive clock."""
        if task.cancelled() or task.exception() is not None:  # a failure was logged by the load
            return
        runner = task.result()
        if runner.active == 0 and self.runners.get(runner.key) is runner:
            self._schedule_expiry(runner, minimum=BACKGROUND_LOAD_GRACE_SECONDS)

    async def _load_shared(self, source: ModelSource) -> Runner:
        task = self.loading.get(source.key) or self._start_load(source)
        return await asyncio.shield(task)

    def _start_load(self, source: ModelSource) -> asyncio.Task:
        """Make room (evicting idle runners, least recently used first), then load in the background."""
        evicted = self._make_room()
        task = asyncio.get_running_loop().create_task(self._load_runner(source, evicted))
        self.loading[source.key] = task
        return task

    def _make_room(self) -> list[Runner]:
        evicted = []
        while len(self.runners) + len(self.loading) + len(self.pending) >= self.max_loaded:
            idle = [r for r in self.runners.values() if r.owned and r.active == 0 and not engine_busy(r.engine)]
            if not idle:
                raise APIError(503, f"cannot load another model now: all {len(self.runners)} loaded models "
                               f"(--max-loaded-models {self.max_loaded}) are running requests or serving "
                               "LoRA adapters; retry shortly",
                               code="models_busy", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            victim = min(idle, key=lambda runner: runner.last_used)
            logger.info("unloading %s to make room (--max-loaded-models %d)", ", ".join(sorted(victim.names)) or victim.key,
                        self.max_loaded)
            evicted.append(self._detach(victim))
        return evicted

    async def _load_runner(self, source: ModelSource, evicted: list[Runner]) -> Runner:
        try:
            for runner in evicted:  # their memory is free before the new weights come in
                await shut_down(runner)
            runner = await self._build_runner(source)
        except Exception as exc:
            message = f"failed to load {source.model_id} from {source.path}: {exc}"
            logger.error(message, exc_info=not isinstance(exc, HearthError))
            raise APIError(500, message, param="model", code="model_load_failed") from None
        finally:
            self.loading.pop(source.key, None)
        self.runners[runner.key] = runner
        logger.info("loaded %s from %s in %.1f s", source.model_id, source.path, runner.base.load_seconds)
        return runner

    async def _build_runner(self, source: ModelSource) -> Runner:
        started = time.perf_counter()
        assert source.path is not None  # engines handed in are never unloaded, so never reloaded
        folder = await asyncio.to_thread(checkpoint_folder, source.path)
        engine = await asyncio.to_thread(load_engine, folder, self.engine_settings)
        engine.start()
        try:
            base = await asyncio.to_thread(describe_checkpoint, source.model_id, folder, engine,
                                           time.perf_counter() - started)
        except BaseException:
            await asyncio.to_thread(engine.shutdown)
            raise
        pinned = any(s.origin == "startup" and s.key == source.key for s in self.catalog.values())
        return Runner(source.key, base, owned=True, pinned=pinned)

    async def load_all(self, engine_settings: dict[str, Any], on_failure: Callable[[Exception], None] | None = None) -> None:
        """Load every --model checkpoint at start-up, one after another, off the event loop."""
        self.engine_settings = self.engine_settings or engine_settings
        self.loop = asyncio.get_running_loop()
        for model_id, path in list(self.pending.items()):
            source = self.catalog[model_id]
            try:
                runner = self.runners.get(source.key) or await self._build_runner(source)
            except Exception as exc:  # reported by /health and the CLI, not raised into the event loop
                self.load_error = f"failed to load {path}: {exc}"
                logger.error(self.load_error, exc_info=not isinstance(exc, HearthError))
                if on_failure is not None:
                    on_failure(exc)
                return
            self.runners[runner.key] = runner
            self._add_view(source, runner)
            del self.pending[model_id]
            logger.info("loaded %s from %s in %.1f s", model_id, path, runner.base.load_seconds)

    def shutdown(self) -> None:
        for task in self.loading.values():
            task.cancel()
        for runner in list(self.runners.values()):
            runner.cancel_timer()
            if not runner.owned:
                continue  # engines handed in by the caller are the caller's to stop
            try:
                runner.engine.shutdown()
            except Exception:  # shutting down anyway; one engine's failure must not block the others
                logger.exception("engine %s failed to shut down", runner.key)
        self.runners.clear()


def engine_busy(engine: Any) -> bool:
    """Whether the engine still has requests in flight (a second guard beside the registry's counts)."""
    stats = getattr(engine, "stats", None)
    if stats is None:
        return False
    current = stats()
    return bool(current.num_running or current.num_waiting)


async def shut_down(runner: Runner) -> None:
    if not runner.owned:
        return
    try:
        await asyncio.to_thread(runner.engine.shutdown)
    except Exception:  # the runner is already forgotten; a failed shutdown only leaks memory
        logger.exception("engine %s failed to shut down", runner.key)
