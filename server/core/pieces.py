"""Token text and raw bytes, and the one logprob converter (engine ids -> token text and bytes).

Design choices:
- A byte-level BPE token can be part of a UTF-8 character, so a token's
  bytes come from the byte alphabet, not from decoding it alone; its text is
  those bytes decoded with replacement.
- Pieces are cached per token id (one `TokenPieces` per served model).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from tokenizers import decoders, pre_tokenizers

from server.core.events import Logprob, TopLogprob
from server.engine.types import TokenLogprob


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: unicode stand-in character -> raw byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Recreate GPT-2's byte <-> unicode table: printable bytes map to themselves.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + shifted)] = byte
            shifted += 1
    assert set(table) == set(alphabet), "unexpected byte-level alphabet"
    return table


class TokenPieces:
    """Per-token text and raw bytes, for logprobs (a token can be part of a UTF-8 character)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self.byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        backend = self.tokenizer.backend
        token = backend.id_to_token(token_id) or ""
        if self.byte_level and token_id not in backend.get_added_tokens_decoder():
            table = _byte_decoder()
            raw = bytes(table[ch] for ch in token if ch in table)
        else:
            raw = self.tokenizer.decode([token_id], skip_special=False).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)


def convert_logprobs(pieces: TokenPieces, entries: list[TokenLogprob]) -> tuple[Logprob, ...]:
    """Engine logprobs (token ids) -> API-neutral ones (token text and bytes)."""
    return tuple(Logprob(*pieces.piece(e.token_id), e.logprob, tuple(top_logprob(pieces, t, lp) for t, lp in e.top)) for e in entries)


def top_logprob(pieces: TokenPieces, token_id: int, logprob: float) -> TopLogprob:
    return TopLogprob(*pieces.piece(token_id), logprob)
