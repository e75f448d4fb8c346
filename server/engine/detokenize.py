"""Incremental detokenization with stop strings, one token at a time.

    detok = IncrementalDetokenizer(tokenizer, stop=["\\n\\n"], prompt_ids=prompt_ids)
    for token in tokens:
        text, hit_stop = detok.add(token)   # stream `text`; stop when hit_stop
    text = detok.flush()                    # at max_tokens / a stop token: the held-back tail

Design choices:
- Window decoding (the prefix/read offset technique of vLLM and TGI): each step decodes only
  the tokens from `prefix_offset` on, and emits what the decode adds beyond the text of
  tokens[prefix_offset:read_offset]. Decoding a few tokens of context, never the whole output,
  keeps a step O(new tokens), and works for any `tokenizers` decoder: byte-level BPE, and
  SentencePiece-style ones whose leading space depends on the previous token.
- A multi-byte character split across tokens decodes to a trailing U+FFFD until its last
  byte arrives, so text ending in U+FFFD is held back (for at most MAX_HELD_TOKENS tokens:
  a character has at most 4 bytes, so past that the bytes really are invalid).
- Stop strings are matched on text: a tail that could be the start of a stop string is held
  back, a full match ends the stream with only the text before it (never the stop string).
  Text, not tokens, because the same string has many tokenizations.
- Special tokens (chat markers, EOS) are skipped in text, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from model.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded as context before the first generated token
MAX_HELD_TOKENS = 8  # emit text ending in U+FFFD anyway after this many held tokens
TRIM_AFTER = 1024  # drop already-decoded tokens from the window's list beyond this many
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's token stream into safe-to-emit text; stops on stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stop_reason: str | None = None  # the stop string that ended the stream
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._ids: list[int] = []  # tokens from the window's context on (older ones trimmed)
        self._prefix_offset = 0  # _ids[prefix_offset:read_offset]: context already emitted
        self._read_offset = 0  # _ids[read_offset:]: tokens whose text is not emitted yet
        self._prefix_text = ""  # decode(_ids[prefix_offset:read_offset])
        self._held = ""  # decoded text held back: it might begin a stop string
        self._parts: list[str] = []  # everything emitted so far, in pieces
        self._finished = False  # a stop string matched, or flush() ran
        if prompt_ids:
            self._seed_context(prompt_ids[-PROMPT_CONTEXT_TOKENS:])

    def _seed_context(self, context: list[int]) -> None:
        text = self.tokenizer.decode(context)
        if text.endswith(REPLACEMENT):
            return  # the prompt ends inside a character: decoding with it would misalign
        self._ids = list(context)
        self._read_offset = len(context)
        self._prefix_text = text

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def finished(self) -> bool:
        return self._finished

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token -> (text safe to emit now, whether a stop string matched)."""
        if self._finished:
            return "", self.stop_reason is not None
        self._ids.append(token_id)
        return self._emit(self._decode_new(final=False))

    def flush(self) -> str:
        """The held-back text at the end of generation (length limit or stop token)."""
        if self._finished:
            return ""
        text, _ = self._emit(self._decode_new(final=True), final=True)
        self._finished = True
        return text

    def _decode_new(self, final: bool) -> str:
        """Text completed by the tokens since read_offset ("" while a character is incomplete)."""
        window = self.tokenizer.decode(self._ids[self._prefix_offset:])
        held_tokens = len(self._ids) - self._read_offset
        if not final and window.endswith(REPLACEMENT) and held_tokens < MAX_HELD_TOKENS:
            return ""
        if len(window) <= len(self._prefix_text) and not final:
            return ""  # e.g. a skipped special token: nothing new yet
        new_text = window[len(self._prefix_text):]
        if window.endswith(REPLACEMENT):
            # Emitted as invalid bytes: start a fresh window so later bytes never re-join them.
            self._prefix_offset = self._read_offset = len(self._ids)
            self._prefix_text = ""
        else:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_text = self.tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        self._trim()
        return new_text

    def _trim(self) -> None:
        if self._prefix_offset > TRIM_AFTER:  # amortised O(1): the list stays short
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _emit(self, new_text: str, final: bool = False) -> tuple[str, bool]:
        buffer = self._held + new_text
        match = self._first_stop(buffer)
        if match is not None:
            index, self.stop_reason = match
            self._finished = True
            return self._record(buffer[:index]), True
        keep = 0 if final else self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep:]
        return self._record(buffer[: len(buffer) - keep]), False

    def _record(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text

    def _first_stop(self, buffer: str) -> tuple[int, str] | None:
        """(index, stop string) of the earliest stop string in buffer, if any."""
        found = [(index, stop) for stop in self.stop if (index := buffer.find(stop)) >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest tail of buffer that is a proper prefix of a stop string."""
        for length in range(min(len(buffer), self._longest_stop - 1), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self.stop):
                return length
        return 0
