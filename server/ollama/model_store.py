"""The models /api/create and /api/copy made, kept in SQLite inside the weights folder.

    store = ModelStore(Path("weights"))
    store.put(StoredModel("mybot", "default", "created", system="You are terse."))
    store.all()            # survives a restart: the server adds them to its catalog at start-up

Design choices:
- One table, one row per model: its name, the checkpoint it loads (a folder
  or .gguf file; stored relative to the weights folder when inside it, so
  the folder can move), its defaults (system, Jinja template, Ollama options
  as JSON), and whether it owns that checkpoint (adapters merged at create
  time into a folder under `.hearth-merged/`, deleted with its last user).
- The database is `.hearth-models.sqlite3` in the weights folder: SQLite
  commits are atomic, so a crash never leaves half a registry. Dot-names are
  never served by `--models-dir`, which also skips the temp folders of
  atomic checkpoint writes.
- Every call opens its own short connection: the store is used from the
  event loop and from worker threads, and holds no state between calls.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import HearthError

STORE_FILE = ".hearth-models.sqlite3"
MERGED_DIR = ".hearth-merged"  # checkpoints with adapters merged in, owned by their models

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    base TEXT NOT NULL,
    origin TEXT NOT NULL,
    system TEXT,
    template TEXT,
    parameters TEXT NOT NULL,
    owns_base INTEGER NOT NULL,
    created_at REAL NOT NULL
)
"""


class StoreError(HearthError):
    """The model registry file cannot be read or written."""


@dataclass
class StoredModel:
    name: str
    base: str  # checkpoint folder or .gguf file, relative to the weights folder when inside it
    origin: str  # created | copied
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    owns_base: bool = False  # base is a merged checkpoint made for this model (and its copies)
    created_at: float = field(default_factory=time.time)


class ModelStore:
    def __init__(self, weights_dir: Path):
        self.weights_dir = Path(weights_dir)
        self.file = self.weights_dir / STORE_FILE

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.file, timeout=10)
            connection.execute(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.file}: cannot open the model registry ({exc})") from None
        return connection

    def all(self) -> list[StoredModel]:
        with closing(self._connect()) as connection:
            rows = connection.execute("SELECT name, base, origin, system, template, parameters, owns_base, created_at "
                                      "FROM models ORDER BY created_at").fetchall()
        return [StoredModel(name, base, origin, system, template, json.loads(parameters), bool(owns), created)
                for name, base, origin, system, template, parameters, owns, created in rows]

    def get(self, name: str) -> StoredModel | None:
        return next((model for model in self.all() if model.name == name), None)

    def put(self, model: StoredModel) -> None:
        """Insert or replace (re-creating a model overwrites it, as in Ollama)."""
        row = (model.name, model.base, model.origin, model.system, model.template,
               json.dumps(model.parameters, sort_keys=True), int(model.owns_base), model.created_at)
        with closing(self._connect()) as connection, connection:
            connection.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    def delete(self, name: str) -> None:
        with closing(self._connect()) as connection, connection:
            connection.execute("DELETE FROM models WHERE name = ?", (name,))

    def users_of(self, base: str) -> list[str]:
        """Names of the models that load `base` (a merged folder is deleted with its last user)."""
        return [model.name for model in self.all() if model.base == base]

    def relative(self, path: Path) -> str:
        """How a checkpoint path is stored: relative to the weights folder when inside it."""
        resolved, root = path.resolve(), self.weights_dir.resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)

    def absolute(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.weights_dir / path
