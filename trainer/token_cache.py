"""The token cache: a corpus tokenized once into a memory-mapped file, and batches drawn from it.

    CACHE_DIR/tokens-KEY/
      tokens.bin   every document as BOS + tokens + EOS, back to back (uint16 when
                   the vocabulary fits, else uint32)
      meta.json    token count, dtype, train/validation ranges, cleaning report

Design choices:
- KEY hashes everything the tokens depend on: each input file's path, size
  and mtime, the tokenizer (its JSON and special tokens), the cleaning
  settings and the validation fraction. Re-running on the same data reuses the
  cache; touching any input rebuilds it. The folder is written under a temp
  name and renamed, so a killed build leaves nothing half-written behind.
- Tokenization is batched (`encode_batch`, which runs on the tokenizers
  library's thread pool) and streamed to disk: memory holds one batch.
- The validation split is a set of token ranges spread evenly through the
  corpus (the tail of each of up to 64 equal parts), so it samples every
  source and needs no second file; training windows never cross into it.
- `TokenWindows` (the pretraining `BatchSource`) cuts each range into windows
  of seq_len + 1 tokens (stride seq_len: inputs and shifted targets) and visits
  them in a seeded random order per epoch. Its position is (epoch, cursor), so
  resuming replays the exact same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from model.errors import CheckpointError
from model.tokenizer import Tokenizer
from trainer.data import CleaningSettings, CleaningStats, DataError, Document, DocumentReader, InputSource

CACHE_VERSION = 1
TOKENS_FILE, META_FILE = "tokens.bin", "meta.json"
FLUSH_CHARS = 2_000_000  # characters of text per tokenizer batch
MIN_VAL_RANGE = 2048  # tokens: validation ranges are at least this long when the corpus allows
MAX_VAL_RANGES = 64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sources_fingerprint(sources: list[InputSource]) -> list[Any]:
    return [[source.kind, source.location, source.fingerprint()] for source in sources]


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def cache_key(sources: list[InputSource], tokenizer: Tokenizer, cleaning: CleaningSettings, val_fraction: float) -> str:
    return _hash_json({
        "version": CACHE_VERSION,
        "sources": sources_fingerprint(sources),
        "tokenizer": hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest(),
        "tokenizer_info": tokenizer.info.to_dict(),
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "cleaning": cleaning.to_json(),
        "val_fraction": val_fraction,
    })


@dataclass
class TokenCache:
    folder: Path  # CACHE_DIR/tokens-KEY
    meta: dict[str, Any]  # meta.json

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    def tokens(self) -> np.ndarray:
        """The whole corpus as a read-only memory map (pages load as they are touched)."""
        return np.memmap(self.folder / TOKENS_FILE, dtype=np.dtype(self.meta["dtype"]), mode="r",
                         shape=(self.num_tokens,))

    def ranges(self, split: str) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.meta[f"{split}_ranges"]]

    def split_tokens(self, split: str) -> int:
        return sum(end - start for start, end in self.ranges(split))


def load_or_build_cache(sources: list[InputSource], tokenizer: Tokenizer, cleaning: CleaningSettings,
                        val_fraction: float, cache_dir: Path, log: Callable[[str], None] = print) -> TokenCache:
    """The cached tokens for these inputs, building them first when needed."""
    key = cache_key(sources, tokenizer, cleaning, val_fraction)
    folder = Path(cache_dir) / f"tokens-{key}"
    if (folder / META_FILE).is_file():
        cache = TokenCache(folder, json.loads((folder / META_FILE).read_text(encoding="utf-8")))
        log(f"data: reusing token cache {folder} ({cache.num_tokens:,} tokens)")
        return cache
    log(f"data: tokenizing {len(sources)} input(s) into {folder}")
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_tokens(sources, tokenizer, cleaning, val_fraction, tmp)
        meta["key"] = key
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if folder.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in CleaningStats(**meta["cleaning_stats"]).report_lines():
        log(f"data: {line}")
    return TokenCache(folder, meta)


def _write_tokens(sources: list[InputSource], tokenizer: Tokenizer, cleaning: CleaningSettings,
                  val_fraction: float, folder: Path) -> dict[str, Any]:
    reader = DocumentReader(sources, cleaning)
    dtype = token_dtype(tokenizer.vocab_size)
    with open(folder / TOKENS_FILE, "wb") as handle:
        writer = _TokenWriter(handle, tokenizer, dtype)
        for document in reader.documents():
            writer.add_document(document)
        writer.flush()
    stats = reader.stats
    if stats.documents_kept == 0 or writer.num_tokens == 0:
        raise DataError(
            f"--data: the corpus is empty after cleaning ({stats.documents_read:,} documents read, "
            f"{stats.bad_lines:,} bad lines, {stats.duplicates_removed:,} duplicates, "
            f"{stats.too_short_removed:,} shorter than --min-chars {cleaning.min_chars})")
    train_ranges, val_ranges = split_ranges(writer.num_tokens, val_fraction)
    return {
        "version": CACHE_VERSION, "num_tokens": writer.num_tokens, "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size, "train_ranges": train_ranges, "val_ranges": val_ranges,
        "cleaning": cleaning.to_json(), "cleaning_stats": stats.to_json(), "val_fraction": val_fraction,
        "sources": [s.location for s in sources],
    }


class _TokenWriter:
    """Collects documents, tokenizes their text in large batches, appends ids to the file in order."""

    def __init__(self, handle, tokenizer: Tokenizer, dtype: np.dtype):
        self.handle, self.tokenizer, self.dtype = handle, tokenizer, dtype
        self.pending: list[str | list[int]] = []  # text to encode, or ids ready to write
        self.pending_chars = 0
        self.num_tokens = 0
        self.bos = [tokenizer.bos_id] if tokenizer.adds_bos else []
        self.eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    def add_document(self, document: Document) -> None:
        if document.messages is not None:
            from model.chat import encode_chat

            ids = encode_chat(self.tokenizer, document.messages, add_generation_prompt=False).ids
            self.pending.append(ids + self.eos)
            return
        self.pending.append(self.bos)
        for chunk in document.chunks:
            self.pending.append(chunk)
            self.pending_chars += len(chunk)
            if self.pending_chars >= FLUSH_CHARS:
                self.flush()
        self.pending.append(self.eos)

    def flush(self) -> None:
        texts = [item for item in self.pending if isinstance(item, str)]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        parts = [np.asarray(next(encoded) if isinstance(item, str) else item, dtype=self.dtype)
                 for item in self.pending]
        if parts:
            array = np.concatenate(parts)
            array.tofile(self.handle)
            self.num_tokens += len(array)
        self.pending, self.pending_chars = [], 0


def split_ranges(num_tokens: int, val_fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """Train and validation token ranges: the last val_fraction of each of k equal parts is validation."""
    if val_fraction <= 0:
        return [[0, num_tokens]], []
    num_parts = max(1, min(MAX_VAL_RANGES, int(num_tokens * val_fraction) // MIN_VAL_RANGE))
    part_size = num_tokens // num_parts
    train, val = [], []
    for part in range(num_parts):
        start = part * part_size
        end = num_tokens if part == num_parts - 1 else start + part_size
        val_start = end - max(1, int((end - start) * val_fraction))
        train.append([start, val_start])
        val.append([val_start, end])
    return train, val


class TokenWindows:
    """BatchSource over one split of a token cache: shuffled windows of seq_len + 1 tokens."""

    def __init__(self, cache: TokenCache, split: str, seq_len: int, seed: int = 0):
        self.cache, self.split, self.seq_len, self.seed = cache, split, seq_len, seed
        self.tokens = cache.tokens()
        ranges = cache.ranges(split)
        counts = [max(0, (end - start - 1) // seq_len) for start, end in ranges]
        self.range_starts = np.array([start for start, _ in ranges], dtype=np.int64)
        self.first_window = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # per range
        self.num_windows = int(self.first_window[-1])
        if self.num_windows == 0:
            raise DataError(f"--data: the {split} split has {cache.split_tokens(split):,} tokens, "
                            f"too few for one sequence of --seq-len {seq_len}")
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _window_starts(self, window_ids: np.ndarray) -> np.ndarray:
        range_index = np.searchsorted(self.first_window, window_ids, side="right") - 1
        return self.range_starts[range_index] + (window_ids - self.first_window[range_index]) * self.seq_len

    def next_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        taken: list[np.ndarray] = []
        needed = batch_size
        while needed:
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            chunk = self._order[self.cursor:self.cursor + needed]
            taken.append(chunk)
            self.cursor += len(chunk)
            needed -= len(chunk)
        starts = self._window_starts(np.concatenate(taken))
        # [B, T + 1] token ids: inputs are the first T, targets the last T.
        block = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        return block[:, :-1], block[:, 1:]

    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.num_windows

    def state_dict(self) -> dict:
        return {"cache_key": self.cache.key, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state.get("cache_key") != self.cache.key:
            raise CheckpointError("cannot resume: the checkpoint was trained on different data or tokenizer "
                                  "(token cache key differs); start a new run from its weights instead")
        if state.get("seq_len") != self.seq_len or state.get("seed") != self.seed:
            raise CheckpointError(f"cannot resume: the checkpoint used --seq-len {state.get('seq_len')} and "
                                  f"--seed {state.get('seed')}, this run {self.seq_len} and {self.seed}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)


def train_tokenizer_cached(sources: list[InputSource], cleaning: CleaningSettings, vocab_size: int,
                           cache_dir: Path, max_chars: int = 200_000_000,
                           log: Callable[[str], None] = print) -> Tokenizer:
    """A byte-level BPE trained on the cleaned corpus (its first max_chars), cached like the tokens."""
    key = _hash_json({"version": CACHE_VERSION, "sources": sources_fingerprint(sources),
                      "cleaning": cleaning.to_json(), "vocab_size": vocab_size, "max_chars": max_chars})
    file = Path(cache_dir) / f"tokenizer-{key}" / "tokenizer.json"
    if file.is_file():
        log(f"data: reusing tokenizer {file}")
        return Tokenizer.load(file)
    log(f"data: training a {vocab_size}-token BPE tokenizer on the corpus")
    tokenizer = Tokenizer.train(_limited(DocumentReader(sources, cleaning).texts(), max_chars), vocab_size)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    tokenizer.save(tmp)
    os.replace(tmp, file)
    return tokenizer


def _limited(texts: Iterator[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_chars:
            return
