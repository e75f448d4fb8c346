"""Ask a checkpoint questions through `hearth serve`, many at once, greedily.

The recipe's self-answers and its word-answer evaluation both go through the
real server (the same prompt building, engine and detokenizer users get).
Requests run concurrently; the engine is batch-invariant, so each reply is
the one it would be alone and a rerun gives the same replies.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from clients.spawn import start_server, stop_server  # noqa: E402


def ask(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    """One greedy chat completion: {"content", "finish_reason"}."""
    body = {"model": "served", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = client.post("/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"]}


def ask_all(checkpoint: Path, conversations: list[list[dict]], max_tokens: int, concurrency: int = 16) -> list[dict]:
    """Replies to every conversation, in order, from a server started on `checkpoint` for the purpose."""
    process, url = start_server(f"served={checkpoint}", "--log-level", "warning", stdout=sys.stderr)
    try:
        with httpx.Client(base_url=url) as client, ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda messages: ask(client, messages, max_tokens), conversations))
    finally:
        stop_server(process)
