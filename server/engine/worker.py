"""Model worker: runs one scheduler step as one forward pass, then samples.

Design choices:
- The step's sequences are flattened into one [1, N] batch: single-token
  decodes first (their attention is one batched call), then prefill chunks,
  then padding rows. Positions are explicit, so rows of different sequences sit
  at their own positions; the paged cache's metadata (slot of each row, block
  tables, key masks) is built once per step, not per layer.
- Logits are computed only for rows that sample (the last row of a chunk that
  reaches the end of its sequence): the hidden states (`model.hidden_states`,
  or cpu_fast.NativeDecoder's one native call), pick those rows, then
  `model.lm_head`. A forking prompt (n > 1) repeats its row n times, one
  per choice's sampler.
- Batch invariance: with kernels whose per-row results depend on the row count
  (MKL float32 under 4 rows), the batch and the LM head rows are padded to a
  multiple of `row_multiple` (probed at start-up, 1 for bfloat16 here), so a
  request's tokens do not depend on what else runs in the step. Where every
  matmul is a native kernel (the one-call decoder and a native LM head), rows
  are independent by construction and nothing is padded.
- On CPU in bfloat16 the model's matmuls are swapped for pre-packed, fused
  ones (server/engine/cpu_fast.py), and where every layer is native the
  layers of a step run in one native call (cpu_fast.NativeDecoder).
- Embedding requests (prefill-only sequences, server/engine/pooling.py) take
  their rows of the same hidden states; they have no sample.
- LoRA adapters (server/engine/lora.py): once one is loaded, the targeted linears carry a hook
  that adds each adapter's delta to its own rows; the one-call native decoder adds the same
  deltas itself (csrc/lora_delta.c), so a step with adapter rows stays one native call where the
  kernels run (else it takes the per-layer path and the hooks' PyTorch deltas).
- Sampling failures stay per sequence: `sample_batch` returns an exception in
  that row's slot. An exception in the forward itself propagates: the engine
  fails the step's requests and carries on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model import native
from model.decoder import Transformer
from server.engine.cpu_fast import NativeDecoder, can_pack, native_linear_weights, pack_model
from server.engine.kv_cache import PagedKVCache, SequenceChunk, find_row_multiple
from server.engine.pooling import pool_rows
from server.engine.lora import LoRAStep, install_hooks
from server.engine.sampling import SampleResult, sample_batch
from server.engine.scheduler import ScheduledSequence, SchedulerOutput

SampleResults = dict[int, list[SampleResult | Exception]]  # scheduled seq id -> one result per sample


class ModelWorker:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model = model
        weight = model.embed.weight
        self.device = weight.device
        self.dtype = weight.dtype if weight.is_floating_point() else torch.bfloat16
        self.row_multiple = find_row_multiple(self.dtype, self.device)
        self.num_packed_matmuls = pack_model(model) if can_pack(self.dtype, self.device) else 0
        self.cache = PagedKVCache(model.config, num_blocks, block_size, self.dtype, self.device, self.row_multiple)
        # every layer of a step in one native call, where all of them run native kernels (else None)
        self.native_decoder = NativeDecoder.build(model, self.cache) if self.num_packed_matmuls else None
        if self.native_decoder is not None and native_linear_weights(model.lm_head) is not None:
            # every matmul of a step is a native kernel, whose rows do not depend on the row count:
            # no padding (MKL's probe would pad a decode row to 4 in fp32)
            self.row_multiple = self.cache.row_multiple = 1
        self.lora_step: LoRAStep | None = None  # set by enable_lora (the first adapter load)

    def enable_lora(self) -> None:
        """Wrap the targeted linears in LoRA hooks (once). Safe between or during steps: a hook
        with no adapter rows computes exactly what it wraps."""
        if self.lora_step is None:
            step = LoRAStep(find_row_multiple(torch.float32, self.device), self.model.config.n_layers,
                            native=self.device.type == "cpu" and native.lora_add_kernel() is not None)
            install_hooks(self.model, step)
            self.lora_step = step

    def padded(self, num_rows: int) -> int:
        return -(-num_rows // self.row_multiple) * self.row_multiple

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> SampleResults:
        self.cache.zero_blocks(output.blocks_to_zero)
        self.cache.copy_blocks(output.blocks_to_copy)
        if not output.scheduled:
            return {}
        ordered = order_rows(output.scheduled)
        tokens, positions = self._inputs(ordered)
        chunks = [SequenceChunk(item.start_position, item.num_tokens, item.block_ids) for item in ordered]
        self.cache.metadata = self.cache.build_metadata(chunks, tokens.shape[1])
        lora_groups = self._lora_groups(ordered)
        try:
            hidden = self._hidden_states(tokens, positions, lora_groups)  # [rows, dim]
        finally:
            self.cache.metadata = None
            if lora_groups:
                self.lora_step.clear()
        pool_rows(ordered, hidden)  # embedding requests' rows (server/engine/pooling.py)
        return self._sample(ordered, hidden)

    def _lora_groups(self, ordered: list[ScheduledSequence]) -> list:
        """The step's rows grouped by LoRA adapter, handed to the hooks (empty: base rows only)."""
        if self.lora_step is None or not any(item.seq.lora is not None for item in ordered):
            return []
        row_adapters = [item.seq.lora for item in ordered for _ in range(item.num_tokens)]
        return self.lora_step.plan(row_adapters, self.device)

    def _hidden_states(self, tokens: Tensor, positions: Tensor, lora_groups: list | tuple = ()) -> Tensor:
        """tokens, positions: [1, rows] -> final-normed hidden states [rows, dim]."""
        lora_native = self.lora_step.native_groups if lora_groups else None
        if self.native_decoder is not None and (not lora_groups or lora_native is not None):
            return self.native_decoder.hidden_states(tokens[0], positions[0], lora_native)
        return self.model.hidden_states(tokens, positions, self.cache)[0]

    def _inputs(self, ordered: list[ScheduledSequence]) -> tuple[Tensor, Tensor]:
        """-> tokens, positions: [1, padded rows] (padding rows: token 0 at position 0)."""
        token_ids: list[int] = []
        positions: list[int] = []
        for item in ordered:
            end = item.start_position + item.num_tokens
            token_ids += item.seq.token_ids[item.start_position:end]
            positions += range(item.start_position, end)
        padding = self.padded(len(token_ids)) - len(token_ids)
        token_ids += [0] * padding
        positions += [0] * padding
        return (torch.tensor([token_ids], device=self.device), torch.tensor([positions], device=self.device))

    def _sample(self, ordered: list[ScheduledSequence], hidden: Tensor) -> SampleResults:
        rows, samplers, owners = [], [], []
        last_row = -1
        for item in ordered:
            last_row += item.num_tokens
            if item.num_samples:
                choice_samplers = [item.seq.sampler, *item.seq.fork_samplers][:item.num_samples]
                rows += [last_row] * len(choice_samplers)
                samplers += choice_samplers
                owners += [item.seq.seq_id] * len(choice_samplers)
        if not rows:
            return {}
        num_rows = len(rows)
        rows += [rows[-1]] * (self.padded(num_rows) - num_rows)
        picked = hidden.index_select(0, torch.tensor(rows, device=self.device))  # [padded samples, dim]
        logits = self.model.lm_head(picked)[:num_rows]  # [samples, vocab]
        results: SampleResults = {}
        for owner, sampler, result in zip(owners, samplers, sample_batch(logits, samplers)):
            if not isinstance(result, Exception):
                sampler.append(result.token_id)
            results.setdefault(owner, []).append(result)
        return results


def order_rows(scheduled: list[ScheduledSequence]) -> list[ScheduledSequence]:
    """Single-token chunks first (batched attention), then the longer chunks, each in order."""
    return [s for s in scheduled if s.num_tokens == 1] + [s for s in scheduled if s.num_tokens > 1]

