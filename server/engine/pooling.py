"""Embedding requests: prefill-only sequences whose final-normed hidden states are pooled into one vector.

How such a sequence flows (the same engine, scheduler, KV cache and forward as generation):
- `Engine.embed()` admits it like any request (same checks of queue bound and
  slots); the scheduler queues a `Sequence` whose `pooler` is an `EmbeddingPooler`.
- It is prefilled in chunks under the step's token budget, beside decodes and
  other prefills, in the same flattened batch. It never looks up or registers
  prefix-cache blocks: every prompt row must be computed (mean pooling reads all
  of them), and its blocks, freed unregistered, go to the front of the free queue.
- After each forward the worker hands the pooler the sequence's rows of the
  final-normed hidden states (`pool_rows`). The step that computes its last
  prompt row pools them; it has no sample (`num_samples` 0), so nothing is drawn.
- The engine then finishes the sequence (its blocks are freed) and delivers the
  vector. An abort (client gone) frees it like any request.

Batch invariance: a row's hidden state does not depend on the batch or on where
the prompt was cut into chunks (the engine's promise for generation), and the
pooler keeps every row in its slot of one [num_tokens, dim] buffer and reduces it
once, at the end, in float32. So the vector is bit for bit the same alone, with
other inputs, or beside generation. A running sum over chunks would not be (the
order of float additions would follow the chunking). The buffer costs
num_tokens x dim activations per running embedding request ("last" keeps one row).
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch.nn.functional as F
from torch import Tensor

from server.engine.types import POOLING_METHODS


class EmbeddingPooler:
    """Collects one sequence's hidden-state rows as chunks come in; `vector` is set when the last arrives."""

    def __init__(self, num_tokens: int, method: str, normalize: bool):
        if method not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_METHODS)}, got {method!r}")
        self.num_tokens, self.method, self.normalize = num_tokens, method, normalize
        self.rows: Tensor | None = None  # mean: [num_tokens, dim]; last: [1, dim]
        self.vector: Tensor | None = None  # float32 [dim] on the CPU, once every row is in

    def add(self, start: int, hidden: Tensor) -> None:
        """hidden: [rows, dim], the final-normed states of prompt positions start, start + 1, ..."""
        end = start + hidden.shape[0]
        if self.method == "mean":
            if self.rows is None:
                self.rows = hidden.new_empty(self.num_tokens, hidden.shape[1])
            self.rows[start:end] = hidden
        elif end == self.num_tokens:
            self.rows = hidden[-1:].clone()
        if end == self.num_tokens:
            self.vector = pool(self.rows, self.method, self.normalize).cpu()
            self.rows = None


def pool(rows: Tensor, method: str, normalize: bool) -> Tensor:
    """[rows, dim] -> float32 [dim]: the mean of the rows or the last one, L2-normalized if asked."""
    rows = rows.float()
    vector = rows.mean(dim=0) if method == "mean" else rows[-1]
    return F.normalize(vector, dim=0) if normalize else vector


def pool_rows(scheduled: Seq, hidden: Tensor) -> None:
    """Hand each embedding sequence of the step its rows of `hidden` (rows laid out in `scheduled` order)."""
    first_row = 0
    for item in scheduled:
        pooler = item.seq.pooler
        if pooler is not None:
            pooler.add(item.start_position, hidden[first_row:first_row + item.num_tokens])
        first_row += item.num_tokens

