"""Stored /v1/responses: SQLite in the server's data folder, bounded by count and age.

    store = ResponseStore(Path("~/.hearth").expanduser() / "responses.sqlite3", max_count=1000, max_age_days=30)
    store.put(response_id, created_at, response_json, conversation_json)
    store.get(response_id) -> (response dict, conversation list) | None
    store.delete(response_id) -> bool

Design choices:
- One table; each row keeps the response object as returned and the
  conversation that produced it (chat messages, the previous responses'
  included), so `previous_response_id` continues a conversation from a single
  row without walking a chain.
- The database is opened on first use (a server that never stores writes
  nothing), with WAL and a busy timeout; each call uses its own short
  connection, so any thread may call it (the routes call it via a thread).
- Bounds are applied on every insert: rows older than max_age_days, then the
  oldest beyond max_count, are deleted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at);
"""


class ResponseStore:
    def __init__(self, path: Path, max_count: int = 1000, max_age_days: float = 30.0):
        self.path = path
        self.max_count = max_count
        self.max_age_seconds = max_age_days * 86400
        self._ready = False
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        with self._lock:
            if not self._ready:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with sqlite3.connect(self.path, timeout=10) as connection:
                    connection.execute("PRAGMA journal_mode=WAL")
                    connection.executescript(SCHEMA)
                self._ready = True
        return sqlite3.connect(self.path, timeout=10)

    def put(self, response_id: str, created_at: float, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        connection = self._connect()
        try:
            with connection:
                connection.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                                   (response_id, created_at, json.dumps(response), json.dumps(conversation)))
                connection.execute("DELETE FROM responses WHERE created_at < ?", (time.time() - self.max_age_seconds,))
                connection.execute("DELETE FROM responses WHERE id NOT IN "
                                   "(SELECT id FROM responses ORDER BY created_at DESC LIMIT ?)", (self.max_count,))
        finally:
            connection.close()

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        connection = self._connect()
        try:
            row = connection.execute("SELECT response, conversation, created_at FROM responses WHERE id = ?", (response_id,)).fetchone()
        finally:
            connection.close()
        if row is None or row[2] < time.time() - self.max_age_seconds:
            return None
        return json.loads(row[0]), json.loads(row[1])

    def delete(self, response_id: str) -> bool:
        connection = self._connect()
        try:
            with connection:
                return connection.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
        finally:
            connection.close()
