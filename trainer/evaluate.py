"""`hearth eval`: perplexity on text, loss on the assistant tokens of chats.

Design choices:
- Inputs are read by the trainer's data pipeline (`trainer/data.py`: files,
  folders, globs, datasets; the pretraining cleaning, but no de-duplication
  and no length filter: score what was given). Whether the data is chats or
  text comes from the records: `{"messages": [...]}` is a chat, a text file or
  a `{"text": ...}` record is text; mixing the two is refused.
- Text: documents are framed as pretraining frames them (<|bos|> text
  <|eos|>), concatenated, and cut into windows of seq_len + 1 tokens that
  overlap by one token, so every token after the first is predicted exactly
  once (context restarts at each window). loss = mean next-token
  cross-entropy, perplexity = exp(loss).
- Chats: each chat is scored alone, exactly as it is served (no packing),
  right-padded in batches; right padding cannot change earlier positions
  under causal attention. Only assistant tokens count (the SFT mask).
- Sums are accumulated in float64 from fp32 log-probabilities, whatever the
  compute dtype (bf16 autocast is an option: ~4x faster on CPU).
- Any checkpoint `load_checkpoint` reads works, quantized ones included; an
  adapter folder is evaluated on its base with the adapter attached.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import HearthError
from trainer.chat_data import ChatSet, chat_reader, encode_chats
from trainer.data import Document

DEFAULT_BATCH_TOKENS = 8192  # tokens per forward pass


@dataclass
class LossSum:
    """Running total of next-token losses."""

    loss: float = 0.0  # sum of per-token cross-entropies (nats)
    tokens: int = 0  # tokens scored

    @property
    def mean(self) -> float:
        return self.loss / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean) if self.tokens else float("nan")


def autocast_context(device: torch.device | str, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def token_losses(model, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Per-position cross-entropy [B, T] in fp32; 0 where targets == -100."""
    with torch.no_grad(), autocast_context(inputs.device, bf16):
        logits = model(inputs)
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return flat.view(targets.shape)


# --- text ---------------------------------------------------------------------------------


def text_windows(tokens: np.ndarray, seq_len: int) -> Iterator[np.ndarray]:
    """Windows of up to seq_len + 1 tokens, each starting at the last token of the previous one."""
    for start in range(0, max(len(tokens) - 1, 0), seq_len):
        yield tokens[start : start + seq_len + 1]


def evaluate_tokens(model, tokens: np.ndarray, seq_len: int, device: str = "cpu", bf16: bool = False,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS) -> LossSum:
    """Mean next-token loss over a token stream (every token but the first predicted once)."""
    total = LossSum()
    windows = list(text_windows(tokens, seq_len))
    full = [w for w in windows if len(w) == seq_len + 1]
    batches = [full[i : i + max(1, batch_tokens // seq_len)] for i in range(0, len(full), max(1, batch_tokens // seq_len))]
    batches += [[w] for w in windows if len(w) != seq_len + 1]  # the short last window
    for batch in batches:
        rows = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
        losses = token_losses(model, rows[:, :-1], rows[:, 1:], bf16)
        total.loss += float(losses.double().sum())
        total.tokens += losses.numel()
    return total


def text_tokens(documents: Iterable[Document], tokenizer, limit: int | None,
                max_tokens: int | None) -> tuple[np.ndarray, int]:
    """(token stream, documents used): text framed as pretraining frames it, <|bos|> text <|eos|>."""
    bos = [tokenizer.bos_id] if tokenizer.adds_bos else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    runs, count = [], 0
    for index, document in enumerate(documents):
        if limit is not None and index >= limit or max_tokens is not None and count > max_tokens:
            break
        if document.chunks is None:
            raise HearthError(f"{document.origin}: a chat among text data; evaluate chats and text separately")
        ids = bos + [token for piece in tokenizer.encode_batch(list(document.chunks)) for token in piece] + eos
        runs.append(np.asarray(ids, dtype=np.int64))
        count += len(ids)
    if not runs:
        raise HearthError("--data: no text to evaluate")
    tokens = np.concatenate(runs)
    # max_tokens counts predicted tokens: keep one more for the first context token.
    return (tokens[: max_tokens + 1] if max_tokens is not None else tokens), len(runs)


# --- chats --------------------------------------------------------------------------------


def length_sorted_batches(lengths: np.ndarray, batch_tokens: int) -> Iterator[list[int]]:
    """Chat indices shortest first, grouped so that rows x longest <= batch_tokens (padding stays small)."""
    batch: list[int] = []
    for chat in np.argsort(lengths, kind="stable").tolist():
        if batch and (len(batch) + 1) * int(lengths[chat]) > batch_tokens:
            yield batch
            batch = []
        batch.append(chat)
    if batch:
        yield batch


def evaluate_chat_set(model, chats: ChatSet, pad_id: int, device: str = "cpu", bf16: bool = False,
                      batch_tokens: int = DEFAULT_BATCH_TOKENS) -> tuple[LossSum, int]:
    """Assistant-token loss with each chat scored alone; returns (loss sum, all tokens)."""
    total = LossSum()
    lengths = chats.lengths()
    for batch in length_sorted_batches(lengths, batch_tokens):
        longest = int(lengths[batch].max())
        tokens = np.full((len(batch), longest), pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=bool)
        for row, chat in enumerate(batch):
            ids, chat_mask = chats.chat(chat)
            tokens[row, : len(ids)], mask[row, : len(ids)] = ids, chat_mask
        targets = np.where(mask[:, 1:], tokens[:, 1:], -100)
        inputs = torch.from_numpy(tokens[:, :-1]).to(device)
        losses = token_losses(model, inputs, torch.from_numpy(targets).to(device), bf16)
        total.loss += float(losses.double().sum())
        total.tokens += int(mask[:, 1:].sum())
    return total, chats.num_tokens


# --- entry point --------------------------------------------------------------------------


def evaluate(checkpoint, data: Sequence[str | Path], device: str = "cpu", bf16: bool = False,
             seq_len: int | None = None, limit: int | None = None, max_tokens: int | None = None,
             strict: bool = False, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[str, Any]:
    """The `hearth eval` result for one checkpoint (see module docstring)."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    if seq_len is not None and seq_len > checkpoint.config.max_seq_len:
        raise HearthError(f"--seq-len {seq_len} is longer than the model's context ({checkpoint.config.max_seq_len})")
    seq_len = seq_len or checkpoint.config.max_seq_len
    reader = chat_reader(data, strict, dedupe=False)
    documents = reader.documents()
    first = next(documents, None)
    if first is None:
        raise HearthError(f"--data: no documents to evaluate in {', '.join(map(str, data))}")
    documents = itertools.chain([first], documents)
    result: dict[str, Any] = {"checkpoint": str(checkpoint.path), "data": [str(p) for p in data]}
    if first.messages is not None:
        chats, report = encode_chats(documents, tokenizer, checkpoint.config.max_seq_len, "truncate", strict, limit)
        if not len(chats):
            raise HearthError(f"--data: no usable chats (first problem: {(report.problems or ['?'])[0]})")
        chats = chats.head(max_tokens) if max_tokens is not None else chats
        total, all_tokens = evaluate_chat_set(model, chats, tokenizer.pad_id or 0, device, bf16, batch_tokens)
        result.update(chats=len(chats), skipped=report.skipped + reader.stats.bad_lines, truncated=report.truncated,
                      tokens=all_tokens, assistant_tokens=total.tokens, assistant_loss=total.mean,
                      assistant_perplexity=total.perplexity)
    else:
        tokens, num_documents = text_tokens(documents, tokenizer, limit, max_tokens)
        total = evaluate_tokens(model, tokens, seq_len, device, bf16, batch_tokens)
        result.update(documents=num_documents, tokens=total.tokens, loss=total.mean,
                      perplexity=total.perplexity)
    return result
