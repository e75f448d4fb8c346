"""LoRA adapters as models of the server: their names, their base, and the model a request gets.

    table = AdapterTable()                       # registry.adapters; ModelRegistry.get consults it
    await table.load(registry, "pirate", Path("weights/pirate"), base_id=None, max_rank=64)
    registry.get("pirate")                       # -> AdapterModel: parent = the base's id
    table.unload("pirate")                       # 404 unknown, 409 while requests use it

Design choices:
- An adapter is served under its own model name. `ModelRegistry.get` consults this table, and a
  request naming an adapter gets an `AdapterModel`: the base's `ServedModel` facts with the
  adapter's name, a `parent` (the base's id) and an `AdapterEngine`, which stamps
  `GenerationRequest.lora` on every request and passes everything else to the base's engine. So
  the OpenAI and Ollama routes serve adapters without knowing about them.
- `AdapterEngine` reads the base's `engine` at each call, not once, so wrappers installed on the
  base later (metrics) still see adapter requests.
- Names are unique across base models and adapters. The base is named by the caller, else a
  Hearth adapter's recorded base folder if it is served, else the first served model.
- Reading and checking an adapter (server/engine/lora.py) runs off the event loop on a thread that
  exits when done (engine.run_in_fresh_thread: no OpenMP team left behind).
- Unload takes the name out of the table first (new requests get 404 at once), then out of the
  engine; if requests still use it, the name goes back and the caller gets 409.
- A loaded adapter holds its base loaded: `load` takes a registry lease on the base (as a running
  request does) and `unload` gives it back, so neither keep_alive expiry nor --max-loaded-models
  eviction can take a --models-dir base from under its adapters (whose engine it is).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator

from model.checkpoint import read_metadata
from server.http_errors import APIError
from server.registry import Lease, ModelRegistry, ServedModel


@dataclass
class AdapterModel(ServedModel):
    """A LoRA adapter as a model: the base's facts under the adapter's name."""

    parent: str | None = None  # the base model's id (OpenAI/vLLM model card "parent")
    adapter_path: Path | None = None  # the adapter's folder


class AdapterEngine:
    """The base's engine with `GenerationRequest.lora` set to one adapter on every request."""

    def __init__(self, base: ServedModel, lora_name: str):
        self.base, self.lora_name = base, lora_name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base.engine, name)

    def generate(self, request: Any) -> Any:
        return self.base.engine.generate(replace(request, lora=self.lora_name))

    async def embed(self, request: Any) -> Any:
        """Refused: embeddings are the base's hidden states, and an adapter's would need its deltas too."""
        raise APIError(400, f"model: '{self.lora_name}' is a LoRA adapter; embeddings come from base models "
                            f"(use '{self.base.model_id}')", param="model")


def adapter_model(base: ServedModel, name: str, path: Path) -> AdapterModel:
    facts = {f.name: getattr(base, f.name) for f in fields(ServedModel)}
    facts.update(model_id=name, engine=AdapterEngine(base, name), created=int(time.time()))
    return AdapterModel(**facts, parent=base.model_id, adapter_path=path)


def recorded_base(folder: Path) -> Path | None:
    """The base folder a Hearth adapter records (adapter_config.json "base"), if any."""
    try:
        metadata = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = metadata.get("base") if isinstance(metadata, dict) else None
    return Path(base).resolve() if isinstance(base, str) else None


def choose_base(folder: Path, bases: list[tuple[str, Path | None]]) -> str | None:
    """The model id an adapter goes on when none is named: its recorded base if served, else the first."""
    recorded = recorded_base(folder)
    for model_id, path in bases:
        if recorded is not None and path is not None and path.resolve() == recorded:
            return model_id
    return bases[0][0] if bases else None


class AdapterTable:
    """Adapters served as models, by name (the event loop's: loads and unloads run there)."""

    def __init__(self) -> None:
        self._models: dict[str, AdapterModel] = {}
        self._loading: set[str] = set()
        self._holds: dict[str, tuple[ModelRegistry, Lease]] = {}  # adapter -> the lease holding its base loaded

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._models))

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def get(self, name: str | None) -> AdapterModel | None:
        return self._models.get(name) if name else None

    def check_name(self, registry: ModelRegistry, name: str) -> None:
        if not name or not name.strip():
            raise APIError(400, "lora_name must be a non-empty string", param="lora_name")
        if name in registry.model_ids:
            raise APIError(400, f"lora_name: '{name}' is the name of a base model", param="lora_name")
        if name in self._models or name in self._loading:
            raise APIError(400, f"lora_name: a LoRA adapter named '{name}' is already loaded", param="lora_name")

    def base_id(self, registry: ModelRegistry, folder: Path, base_id: str | None) -> str | None:
        base_id = base_id or choose_base(folder, [(m, registry.models[m].path) for m in registry.models])
        if base_id in self._models:
            raise APIError(400, f"base_model: '{base_id}' is a LoRA adapter, not a base model", param="base_model")
        return base_id

    async def load(self, registry: ModelRegistry, name: str, folder: Path, base_id: str | None,
                   max_rank: int) -> AdapterModel:
        """Read, check and serve an adapter; APIError 400/404 naming what is wrong (503 while the base
        starts up). A --models-dir base that is not loaded yet is loaded first."""
        self.check_name(registry, name)
        base_id = self.base_id(registry, folder, base_id)
        self._loading.add(name)
        try:
            lease = await registry.acquire(base_id)  # 404 unknown, 503 still starting up
            try:
                base = registry.get(lease.model_id)
                await asyncio.to_thread(load_into_engine, base, name, folder, max_rank)
            except BaseException:
                registry.release(lease)
                raise
        finally:
            self._loading.discard(name)
        self._holds[name] = (registry, lease)
        return self.add(base, name, folder)

    def add(self, base: ServedModel, name: str, folder: Path) -> AdapterModel:
        """Record an adapter already loaded into the base's engine."""
        model = self._models[name] = adapter_model(base, name, folder)
        return model

    def unload(self, name: str) -> AdapterModel:
        from server.engine.types import AdapterBusyError, UnknownAdapterError

        model = self._models.pop(name, None)
        if model is None:
            raise APIError(404, f"no LoRA adapter named '{name}' is loaded", param="lora_name", code="model_not_found")
        try:
            model.engine.remove_lora(name)
        except AdapterBusyError as exc:
            self._models[name] = model
            raise APIError(409, str(exc), param="lora_name", code="adapter_in_use") from None
        except UnknownAdapterError:
            pass  # the engine was replaced meanwhile: nothing left to free
        if name in self._holds:
            registry, lease = self._holds.pop(name)
            registry.release(lease)
        return model


def load_into_engine(base: ServedModel, name: str, folder: Path, max_rank: int) -> None:
    """Read the adapter, check it against `base`, add it to the base's engine (AdapterError: 400)."""
    from server.engine.engine import run_in_fresh_thread
    from server.engine.lora import read_serving_adapter

    def work() -> None:
        metadata = read_metadata(base.path) if base.path is not None else {}
        engine = base.engine
        adapter = read_serving_adapter(name, folder, engine.model_config, base.path, metadata, max_rank)
        engine.add_lora(adapter)

    run_in_fresh_thread(work)


def parse_lora_entry(entry: str) -> tuple[str, Path]:
    """--lora NAME=ADAPTER_DIR -> (name, folder); a one-line error otherwise."""
    from model.errors import HearthError

    name, sep, path = entry.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise HearthError(f"--lora {entry!r}: expected NAME=ADAPTER_DIR")
    return name.strip(), Path(path.strip())


def check_lora_entries(entries: list[str], model_ids: list[str]) -> list[tuple[str, Path]]:
    """Check every --lora before the port opens: NAME=DIR, unique names, a readable adapter folder."""
    from model.errors import HearthError
    from server.engine.lora import check_adapter_config

    parsed = [parse_lora_entry(entry) for entry in entries]
    seen = set(model_ids)
    for name, folder in parsed:
        if name in seen:
            raise HearthError(f"--lora {name}={folder}: the name '{name}' is already a model or another adapter")
        seen.add(name)
        try:
            check_adapter_config(folder)
        except HearthError as exc:
            raise HearthError(f"--lora {name}: {exc}") from None
    return parsed
