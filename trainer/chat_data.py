"""Chat data for SFT and eval: reading, the assistant-only loss mask, packing.

Design choices:
- Files are found and read by the trainer's data pipeline (`trainer/data.py`):
  .jsonl(.gz) files, folders, globs and Hugging Face datasets, the same Unicode
  cleaning as pretraining, exact duplicate chats dropped. A record is
  `{"messages": [...], ...}` (other keys, like the corpus' "kind" and "word",
  are ignored).
- Chats are formatted by the model's own chat template (`model.chat.encode_chat`),
  the same code the server uses to build prompts, so training and serving
  can never disagree on a marker. The loss is on assistant tokens only:
  each reply and the `<|end|>` that closes it (the model must learn to stop).
  Jinja templates (models imported from Hugging Face) give no mask, so it is
  recovered by rendering the conversation up to each reply and diffing.
- Text documents (`.txt` paragraphs, `{"text": ...}` records) can join the rows on purpose
  (`read_texts`, `hearth sft --text-data`: continued pretraining mixed into the fine-tune): each
  is its text and a blank line, with the loss on every token. Among chats (`read_chats`) a text
  record is a mistake.
- Bad records (not JSON, unknown role, no assistant turn, a text record among chats) are
  reported as `file:line`; they are skipped and counted, or stop the run with
  `strict=True`. Too-long chats are truncated (dropped if no reply token is
  left) or dropped, and counted.
- Packing, not padding: the corpus chats are 40-80 tokens, so padding each
  to the sequence length would spend most of the compute on pad tokens.
  Rows are filled best-fit from a few open rows, every chat whole (never
  split across rows, so each reply keeps its question); ~95% of the row
  tokens are real at 256-token rows, more at 512.
  Attention stays plainly causal over the packed row, as in most trainers:
  every chat starts with `<|bos|>` and the model learns that what precedes it
  is unrelated, and the decoder keeps its fast `is_causal` attention instead of
  a per-row block-diagonal mask (the slow masked kernel on CPU).
  Evaluation (`trainer/evaluate.py`) scores each chat alone, as it is served.
- The batch source's whole state is (seed, epoch, row cursor): an epoch's
  order and packing are recomputed from `seed + epoch`, so resume is exact.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from model.chat import ChatFormatError, encode_chat
from model.errors import HearthError
from model.tokenizer import Tokenizer
from trainer.data import CleaningSettings, Document, DocumentReader, resolve_inputs

IGNORE_INDEX = -100  # target value that carries no loss (torch cross_entropy's default)
MAX_REPORTED_PROBLEMS = 5  # bad records printed one by one before only counting


class ChatDataError(HearthError):
    """Chat data that cannot be used: no usable chats, a bad record under --strict."""


# --- reading ----------------------------------------------------------------------------


@dataclass
class ChatReadReport:
    """What happened to the records of the chat files."""

    chats: int = 0  # usable conversations
    skipped: int = 0  # records that were not valid chats
    duplicates: int = 0  # exact duplicate chats dropped
    truncated: int = 0  # chats cut at the sequence length
    dropped_long: int = 0  # chats dropped for length (or with no reply left after truncation)
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of the first skipped records

    def note(self, location: str, reason: str, strict: bool) -> None:
        if strict:
            raise ChatDataError(f"{location}: {reason} (drop --strict to skip bad records)")
        self.skipped += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(f"{location}: {reason}")

    def summary(self) -> str:
        parts = [f"{self.chats} chats"]
        for count, label in ((self.skipped, "bad records skipped"), (self.duplicates, "duplicates dropped"),
                             (self.truncated, "truncated"), (self.dropped_long, "dropped as too long")):
            if count:
                parts.append(f"{count} {label}")
        return ", ".join(parts)


def chat_reader(specs: Sequence[str | Path], strict: bool, dedupe: bool) -> DocumentReader:
    """The data pipeline's reader over files, folders, globs or datasets, with no length filter."""
    return DocumentReader(resolve_inputs([str(s) for s in specs]),
                          CleaningSettings(min_chars=1, dedupe=dedupe, strict=strict))


def read_chats(specs: Sequence[str | Path], tokenizer: Tokenizer, max_len: int | None = None,
               long_chats: str = "truncate", strict: bool = False, limit: int | None = None,
               dedupe: bool = True, texts: bool = False) -> tuple["ChatSet", ChatReadReport]:
    """Read, validate and encode the chats of the given inputs (with `texts`, their text documents instead).

    max_len: longest chat in tokens; longer ones are truncated or dropped (`long_chats`).
    limit: stop after this many usable chats.
    """
    reader = chat_reader(specs, strict, dedupe)
    chats, report = encode_chats(reader.documents(), tokenizer, max_len, long_chats, strict, limit, texts)
    report.duplicates = reader.stats.duplicates_removed
    report.skipped += reader.stats.bad_lines
    report.problems = [f"{where}: not a valid chat record" for where in reader.stats.first_bad_lines] + report.problems
    if not len(chats):
        hint = f" (first problem: {report.problems[0]})" if report.problems else ""
        raise ChatDataError(f"{', '.join(map(str, specs))}: no usable {'texts' if texts else 'chats'}{hint}")
    return chats, report


def encode_chats(documents: Iterable[Document], tokenizer: Tokenizer, max_len: int | None, long_chats: str,
                 strict: bool, limit: int | None, texts: bool = False) -> tuple["ChatSet", ChatReadReport]:
    """Encode chat documents into a ChatSet; text documents and chats without a reply are bad records
    (with `texts`: text documents, and chats are the bad records)."""
    if long_chats not in ("truncate", "drop"):
        raise ChatDataError(f"--long-chats must be 'truncate' or 'drop', got {long_chats!r}")
    report = ChatReadReport()
    token_runs, mask_runs = [], []
    for document in documents:
        if limit is not None and report.chats >= limit:
            break
        try:
            ids, mask = encode_text(tokenizer, document) if texts else encode_document(tokenizer, document)
        except ChatFormatError as exc:
            report.note(document.origin, str(exc), strict)
            continue
        if max_len is not None and len(ids) > max_len:
            if long_chats == "drop" or not any(mask[:max_len]):
                report.dropped_long += 1
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            report.truncated += 1
        token_runs.append(np.asarray(ids, dtype=np.int32))
        mask_runs.append(np.asarray(mask, dtype=np.uint8))
        report.chats += 1
    return ChatSet.from_runs(token_runs, mask_runs), report


def encode_document(tokenizer: Tokenizer, document: Document) -> tuple[list[int], list[int]]:
    if document.messages is None:
        raise ChatFormatError('a text record, not a chat (expected {"messages": [...]})')
    if not any(m["role"] == "assistant" for m in document.messages):
        raise ChatFormatError("chat has no assistant turn (nothing to learn from)")
    return encode_for_training(tokenizer, document.messages)


def encode_text(tokenizer: Tokenizer, document: Document) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a text document: its text and a blank line, the loss on every token."""
    if document.messages is not None:
        raise ChatFormatError('a chat record among texts (expected {"text": ...}; chats go to --data)')
    text = "".join(document.chunks or ()).strip()
    if not text:
        raise ChatFormatError("an empty text record")
    ids = tokenizer.encode(text + "\n\n", add_bos=True)
    return ids, [1] * len(ids)


def print_read_report(report: ChatReadReport, label: str, stream=sys.stderr) -> None:
    for problem in report.problems:
        print(f"warning: skipped {problem}", file=stream)
    if report.skipped > len(report.problems):
        print(f"warning: ... and {report.skipped - len(report.problems)} more bad records", file=stream)
    print(f"{label}: {report.summary()}", file=stream)


def encode_for_training(tokenizer: Tokenizer, messages: Sequence[Any]) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a whole conversation, mask = 1 on assistant replies and their end marker."""
    if tokenizer.info.chat_template != "jinja":
        encoded = encode_chat(tokenizer, messages, add_generation_prompt=False)
        return encoded.ids, encoded.loss_mask
    # Jinja: render up to each reply; the tokens a reply adds are the ones to learn.
    ids = encode_chat(tokenizer, messages, add_generation_prompt=False).ids
    mask = [0] * len(ids)
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = encode_chat(tokenizer, messages[:index], add_generation_prompt=True).ids if index else []
        through_reply = encode_chat(tokenizer, messages[: index + 1], add_generation_prompt=False).ids
        if ids[: len(through_reply)] != through_reply or through_reply[: len(prompt)] != prompt:
            raise ChatFormatError("the model's chat template does not render conversations prefix by prefix")
        mask[len(prompt) : len(through_reply)] = [1] * (len(through_reply) - len(prompt))
    return ids, mask


@dataclass
class ChatSet:
    """Encoded chats stored flat: chat i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32 [total tokens]
    loss_mask: np.ndarray  # uint8 [total tokens], 1 on assistant tokens
    offsets: np.ndarray  # int64 [num chats + 1]

    @classmethod
    def from_runs(cls, token_runs: list[np.ndarray], mask_runs: list[np.ndarray]) -> "ChatSet":
        offsets = np.zeros(len(token_runs) + 1, dtype=np.int64)
        np.cumsum([len(run) for run in token_runs], out=offsets[1:])
        if not token_runs:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.uint8), offsets)
        return cls(np.concatenate(token_runs), np.concatenate(mask_runs), offsets)

    @classmethod
    def concatenate(cls, parts: Sequence["ChatSet"]) -> "ChatSet":
        """The chats of `parts`, in order (a part may appear several times: upsampling)."""
        starts = np.cumsum([0] + [len(part.tokens) for part in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [part.offsets[1:] + start for part, start in zip(parts, starts)]
        return cls(np.concatenate([part.tokens for part in parts]), np.concatenate([part.loss_mask for part in parts]),
                   np.concatenate(offsets))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def chat(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end], self.loss_mask[start:end]

    def head(self, max_tokens: int) -> "ChatSet":
        """The first chats, as many as fit in max_tokens (at least one)."""
        count = max(1, int(np.searchsorted(self.offsets, max_tokens, side="right")) - 1)
        end = int(self.offsets[count])
        return ChatSet(self.tokens[:end], self.loss_mask[:end], self.offsets[: count + 1])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_assistant_tokens(self) -> int:
        return int(self.loss_mask.sum())


# --- packing ----------------------------------------------------------------------------


def pack_rows(lengths: np.ndarray, order: np.ndarray, row_len: int, open_rows: int = 16) -> list[list[int]]:
    """Group chats into rows of at most `row_len` tokens, best fit among a few open rows.

    Chats are taken in `order`; each goes to the open row it fills most tightly.
    When none has room, the fullest open row is closed (when `open_rows` are open)
    and a new row opened. Returns the chat indices of each row.
    """
    rows: list[list[int]] = []
    open_chats: list[list[int]] = []
    open_free: list[int] = []
    for chat in order.tolist():
        length = int(lengths[chat])
        best = -1
        for slot, free in enumerate(open_free):
            if length <= free and (best < 0 or free < open_free[best]):
                best = slot
        if best < 0:
            if len(open_free) >= open_rows:
                fullest = min(range(len(open_free)), key=open_free.__getitem__)
                rows.append(open_chats.pop(fullest))
                open_free.pop(fullest)
            open_chats.append([])
            open_free.append(row_len)
            best = len(open_free) - 1
        open_chats[best].append(chat)
        open_free[best] -= length
    return rows + open_chats


class PackedChatBatches:
    """The SFT `BatchSource`: shuffled chats packed into rows of seq_len + 1 tokens.

    inputs = row[:-1], targets = row[1:] with IGNORE_INDEX wherever the target
    token is not an assistant token (prompts, headers, padding).
    """

    def __init__(self, chats: ChatSet, seq_len: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        self.chats, self.seq_len, self.pad_id = chats, seq_len, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.row_cursor = 0, 0
        self._rows: list[list[int]] | None = None
        if int(chats.lengths().max()) > seq_len + 1:
            raise ChatDataError(f"a chat has {int(chats.lengths().max())} tokens, more than --seq-len + 1 = {seq_len + 1}")

    def epoch_rows(self) -> list[list[int]]:
        """This epoch's rows (chat indices), recomputed from seed + epoch."""
        if self._rows is None:
            generator = np.random.default_rng(self.seed + self.epoch)
            order = generator.permutation(len(self.chats)) if self.shuffle else np.arange(len(self.chats))
            rows = pack_rows(self.chats.lengths(), order, self.seq_len + 1)
            if self.shuffle:  # the fullest rows are closed first; spread them out
                rows = [rows[i] for i in generator.permutation(len(rows))]
            self._rows = rows
        return self._rows

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets: int64 [batch_size, seq_len]."""
        row_tokens = np.full((batch_size, self.seq_len + 1), self.pad_id, dtype=np.int64)
        row_mask = np.zeros((batch_size, self.seq_len + 1), dtype=bool)
        for row in range(batch_size):
            rows = self.epoch_rows()
            position = 0
            for chat in rows[self.row_cursor]:
                tokens, mask = self.chats.chat(chat)
                row_tokens[row, position : position + len(tokens)] = tokens
                row_mask[row, position : position + len(tokens)] = mask
                position += len(tokens)
            self._advance(len(rows))
        inputs = torch.from_numpy(row_tokens[:, :-1].copy())
        targets = torch.from_numpy(np.where(row_mask[:, 1:], row_tokens[:, 1:], IGNORE_INDEX))
        return inputs, targets

    def _advance(self, rows_in_epoch: int) -> None:
        self.row_cursor += 1
        if self.row_cursor >= rows_in_epoch:
            self.epoch, self.row_cursor, self._rows = self.epoch + 1, 0, None

    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows())

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "row_cursor": self.row_cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.row_cursor = int(state["seed"]), int(state["epoch"]), int(state["row_cursor"])
        self._rows = None
