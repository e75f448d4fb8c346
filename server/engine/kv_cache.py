"""Paged KV cache: a pool of fixed-size blocks shared by all sequences, and attention over it.

Three layers, each testable on its own:

- `BlockPool` owns block bookkeeping only (no tensors): reference counts, a free
  queue, and the prefix cache. A block that is full and computed is registered
  under a hash of its tokens chained with its parent block's hash (as vLLM v1),
  so equal hashes mean equal whole prefixes. When its last user frees it, a
  registered block stays in the prefix cache while it waits in the free queue;
  it is only evicted (its hash dropped) when it is handed out again. The free
  queue is an LRU: blocks freed long ago go first, unregistered blocks (worth
  nothing to a later request) go before any cached one, and a sequence's blocks
  are freed tail first so its shared head outlives its private tail.
- `KVCacheManager` maps sequences to block lists: prefix lookup, growing a
  sequence's blocks as it grows, registering full blocks, forking (n > 1: the
  prompt's full blocks are shared by reference count, the last partial block is
  copied, because both choices write their next token into it).
- `PagedKVCache` holds the tensors, [kv_heads, num_blocks * block_size, head_dim]
  per layer and for K and V, and implements the model's `KVCache.attend` for one
  step's flattened batch. Block 0 is the null block: never handed out, it takes
  the writes of padding rows and pads block tables.

Attention is batch-invariant by construction: a row's output depends on its own
query and keys only, never on what else is in the step. SDPA's CPU kernel is
not (its blocking depends on the query and key counts, so padding keys or
chunking a prompt changes the low bits), so attention here is two matmuls and
a float32 softmax whose per-row results were checked to be independent of the
batch shape: keys are padded with masked blocks (a masked key adds an exact 0),
and on kernels whose small-M path differs (MKL float32 below 4 rows), query rows
are padded up to `row_multiple` (see `find_row_multiple`). All single-token
decodes of a step go through one batched call; each prefill chunk is one call.

For bf16 on CPUs that run it, attention is instead model/native.py's paged kernel:
one call per layer for every row of the step, reading the blocks in place through
each row's block table (no gather copy, no masks). Its rows are independent by
construction too, and a row computes the same in a decode step as in a prefill.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model import native
from model.config import ModelConfig

NULL_BLOCK_ID = 0  # reserved: padding rows write here, padded block tables point here
# Attention reads at least this many (masked) keys: PyTorch runs batched matmuls smaller
# than 400 multiply-adds per matrix through a separate naive kernel, whose rounding differs.
MIN_ATTENTION_KEYS = 16
MAX_QUERY_ROWS = 256  # a prefill chunk's attention runs in slices of this many rows
MAX_GROUP_ROWS = 1024  # padded query rows of one batched prefill call (bounds its score memory)


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Prefix-cache key of one full block: its tokens chained with the parent block's hash."""
    data = (parent_hash or b"") + array("q", token_ids).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def extend_block_hashes(block_hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        salt: bytes | None = None) -> None:
    """Append the hashes of the full blocks of token_ids not hashed yet; `salt` (a LoRA adapter's
    cache key) seeds the chain, so prefixes computed by different weights never match."""
    for index in range(len(block_hashes), len(token_ids) // block_size):
        parent = block_hashes[index - 1] if index else salt
        block_hashes.append(hash_block_tokens(parent, token_ids[index * block_size:(index + 1) * block_size]))


@dataclass(eq=False)
class KVBlock:
    block_id: int  # index of the block in the cache tensors
    ref_count: int = 0  # sequences whose block table holds it; 0: in the free queue
    block_hash: bytes | None = None  # prefix-cache key once full and computed; None: not cached


class BlockPool:
    """Reference-counted blocks, an LRU free queue and the prefix cache (hash -> block)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (one is the null block), got {num_blocks}")
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_count = 1  # never freed, never handed out
        # Free blocks, next to be handed out first. Cached blocks are still in `cached_blocks`.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self.cached_blocks: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[KVBlock]:
        """Hand out `count` free blocks (evicting their cached prefixes); caller checks room first."""
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} KV blocks but only {len(self.free_queue)} are free")
        allocated = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            allocated.append(block)
        return allocated

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference to blocks found in the prefix cache (reviving them if free)."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference from each block; tail first, so a sequence's head is evicted last."""
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:  # worthless to anyone: reuse it before cached blocks
                    self.free_queue.move_to_end(block.block_id, last=False)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached_blocks.get(block_hash) if self.enable_prefix_caching else None

    def register(self, block: KVBlock, block_hash: bytes) -> None:
        """Make a full, computed block findable. A duplicate of a cached prefix stays unregistered."""
        if not self.enable_prefix_caching or block.block_hash is not None or block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None


class KVCacheManager:
    """Which blocks each sequence holds, and how they grow, fork and return to the pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.seq_blocks: dict[int, list[KVBlock]] = {}  # seq id -> its block table, in order
        self.num_registered: dict[int, int] = {}  # seq id -> leading blocks already registered
        self.fresh_block_ids: list[int] = []  # handed out since the last take_fresh_blocks(): to zero

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_blocks - 1  # all but the null block

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.pool.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int], block_hashes: Sequence[bytes]) -> list[KVBlock]:
        """Longest run of leading full blocks in the prefix cache.

        At least the last token is always left to compute (its logits are needed),
        so only blocks entirely before it count, as in vLLM.
        """
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits = []
        for block_hash in block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, seq_id: int, num_tokens: int, cached_prefix: Sequence[KVBlock] = ()) -> bool:
        """Give seq room for its first `num_tokens` tokens; False (nothing changed) if the pool is short.

        `cached_prefix` (a new sequence only) becomes the head of its block table.
        """
        blocks = self.seq_blocks.get(seq_id, [])
        num_new = self.blocks_for(num_tokens) - len(blocks) - len(cached_prefix)
        revived = sum(1 for block in cached_prefix if block.ref_count == 0)  # free now, so they count too
        if max(num_new, 0) + revived > self.pool.num_free_blocks:
            return False
        if seq_id not in self.seq_blocks:
            self.seq_blocks[seq_id] = blocks
            self.num_registered[seq_id] = len(cached_prefix)
        self.pool.touch(cached_prefix)
        blocks.extend(cached_prefix)
        if num_new > 0:
            fresh = self.pool.allocate(num_new)
            self.fresh_block_ids += [block.block_id for block in fresh]
            blocks.extend(fresh)
        return True

    def register_full_blocks(self, seq_id: int, block_hashes: Sequence[bytes], num_computed_tokens: int) -> None:
        """Enter the seq's blocks that are now full and computed into the prefix cache."""
        blocks = self.seq_blocks[seq_id]
        num_full = min(num_computed_tokens // self.block_size, len(block_hashes), len(blocks))
        for index in range(self.num_registered[seq_id], num_full):
            self.pool.register(blocks[index], block_hashes[index])
        self.num_registered[seq_id] = max(self.num_registered[seq_id], num_full)

    def fork(self, parent_id: int, child_id: int, num_tokens: int) -> tuple[int, int] | None:
        """Give child the parent's first `num_tokens` tokens of KV.

        Full blocks are shared; a partial last block is copied into a fresh block.
        Returns the (src, dst) copy to make before the next forward, or None.
        Raises MemoryError when no block is free for the copy.
        """
        parent_blocks = self.seq_blocks[parent_id]
        num_full = num_tokens // self.block_size
        has_partial = num_tokens % self.block_size != 0
        if has_partial and self.pool.num_free_blocks == 0:
            raise MemoryError("no free KV block to fork into")
        shared = parent_blocks[:num_full]
        self.pool.touch(shared)
        child_blocks = list(shared)
        copy = None
        if has_partial:
            (fresh,) = self.pool.allocate(1)
            child_blocks.append(fresh)
            copy = (parent_blocks[num_full].block_id, fresh.block_id)
        self.seq_blocks[child_id] = child_blocks
        self.num_registered[child_id] = min(self.num_registered[parent_id], num_full)
        return copy

    def take_fresh_blocks(self) -> list[int]:
        """Blocks handed out (not revived from the prefix cache) since the last call."""
        fresh, self.fresh_block_ids = self.fresh_block_ids, []
        return fresh

    def free(self, seq_id: int) -> None:
        blocks = self.seq_blocks.pop(seq_id, None)
        self.num_registered.pop(seq_id, None)
        if blocks:
            self.pool.free(blocks)

    def block_ids(self, seq_id: int) -> list[int]:
        return [block.block_id for block in self.seq_blocks.get(seq_id, ())]


# ----------------------------------------------------------------------------- attention


@dataclass
class AttentionSegment:
    """Sequences whose query rows attend in one batched call, each over its own keys.

    Rows of a segment are laid out [num_seqs, rows_per_seq]. Single-token decodes and a
    lone prefill chunk are consecutive rows of the batch (sliced, `query_index` None);
    grouped prefill chunks of different lengths are gathered and padded to the longest.
    """

    num_seqs: int  # sequences in the call
    rows_per_seq: int  # query rows per sequence, padding included (1 for decodes)
    first_row: int  # consecutive segments: first row in the flattened batch
    query_index: Tensor | None  # [num_seqs * rows_per_seq] long: batch row of each query (padding repeats a row)
    output_index: Tensor | None  # [num_seqs * rows_per_seq] long: where each output row goes (padding -> scratch row)
    block_table: Tensor  # [num_seqs * max_blocks] long, padded with the null block
    hidden_keys: Tensor  # [num_seqs, 1 (decodes) or padded query rows, max_blocks * block_size] bool: True = masked


@dataclass
class NativeAttentionRows:
    """The native kernel's view of a step: each row's position and block table."""

    positions: Tensor  # [num_rows] int32: the row sees keys at positions 0..this (padding: 0)
    table_offsets: Tensor  # [num_rows] int64: where the row's block table starts in block_ids
    block_ids: Tensor  # int32: each chunk's block table, end to end (then [null block] for padding)


@dataclass
class AttentionMetadata:
    """Everything `attend` needs for one step, built once per step (not per layer)."""

    slot_mapping: Tensor  # [num_rows] long: cache slot each row's new k/v goes to (padding -> null block)
    segments: list[AttentionSegment]  # together they cover every real row once (empty with `native`)
    num_rows: int  # rows of the flattened batch, padding included
    num_real_rows: int  # rows that belong to a sequence (the rest is padding at the end)
    native: NativeAttentionRows | None = None  # set when the native kernel attends


@dataclass
class SequenceChunk:
    """One sequence's share of a step, as the worker lays it out."""

    start_position: int  # position of its first row (tokens before it are in the cache)
    num_rows: int  # tokens fed this step
    block_ids: list[int] = field(default_factory=list)  # its block table (covers start_position + num_rows)


class PagedKVCache:
    """The KV tensors of every layer, in blocks, and attention over block tables."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", row_multiple: int = 1):
        self.num_blocks, self.block_size, self.row_multiple = num_blocks, block_size, row_multiple
        self.n_kv_heads, self.head_dim = config.n_kv_heads, config.head_dim
        self.group_size = config.n_heads // config.n_kv_heads  # query heads per KV head
        self.scale = 1.0 / math.sqrt(config.head_dim)
        shape = (config.n_layers, config.n_kv_heads, num_blocks * block_size, config.head_dim)
        # Not zeroed up front (no page is touched until used): blocks are zeroed when handed out.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.zero_blocks([NULL_BLOCK_ID])
        self.metadata: AttentionMetadata | None = None  # set by the worker before each forward
        self.uses_native_kernel = (dtype == native.activation_dtype() and torch.device(device).type == "cpu"
                                   and config.head_dim % 16 == 0 and config.head_dim <= 256
                                   and native.paged_attention_kernel() is not None
                                   and native.rope_write_kv_kernel() is not None)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element_size = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * block_size * config.head_dim * element_size

    def zero_blocks(self, block_ids: Sequence[int]) -> None:
        """Zero whole blocks (all layers). A masked key still multiplies its value by 0, so
        whatever a block held before (a failed request's NaN) must not leak into the next user."""
        if not block_ids:
            return
        index = torch.tensor(block_ids, device=self.keys.device)
        for cache in (self.keys, self.values):
            cache.view(*cache.shape[:2], self.num_blocks, -1).index_fill_(2, index, 0)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers, K and V): src -> dst."""
        if not pairs:
            return
        src = self._slots_of([s for s, _ in pairs])
        dst = self._slots_of([d for _, d in pairs])
        for cache in (self.keys, self.values):
            cache.index_copy_(2, dst, cache.index_select(2, src))

    def _slots_of(self, block_ids: list[int]) -> Tensor:
        offsets = torch.arange(self.block_size, device=self.keys.device)
        return (torch.tensor(block_ids, device=self.keys.device)[:, None] * self.block_size + offsets).flatten()

    def build_metadata(self, chunks: Sequence[SequenceChunk], num_rows: int) -> AttentionMetadata:
        """Row layout: chunks in order, single-row chunks first (they are batched), padding last."""
        slots = [NULL_BLOCK_ID * self.block_size] * num_rows
        first_rows, row = [], 0
        for chunk in chunks:
            for offset in range(chunk.num_rows):
                position = chunk.start_position + offset
                slots[row + offset] = chunk.block_ids[position // self.block_size] * self.block_size + position % self.block_size
            first_rows.append(row)
            row += chunk.num_rows
        slot_mapping = torch.tensor(slots, device=self.keys.device)
        if self.uses_native_kernel:
            return AttentionMetadata(slot_mapping, [], num_rows, row, self._native_rows(chunks, num_rows))
        num_decodes = 0
        while num_decodes < len(chunks) and chunks[num_decodes].num_rows == 1:
            num_decodes += 1
        if any(chunk.num_rows == 1 for chunk in chunks[num_decodes:]):
            raise ValueError("single-row chunks must come first in the batch")
        scratch_row = num_rows  # attend() keeps one extra output row for padding queries to land in
        segments = [self._segment(chunks[:num_decodes], first_rows[:num_decodes], scratch_row)] if num_decodes else []
        # Long chunks attend in slices of query rows (bounded score memory; each slice reads
        # only the keys up to its own last row), then similar lengths are grouped.
        pieces = [(SequenceChunk(c.start_position + offset, min(MAX_QUERY_ROWS, c.num_rows - offset), c.block_ids), first + offset)
                  for c, first in zip(chunks[num_decodes:], first_rows[num_decodes:])
                  for offset in range(0, c.num_rows, MAX_QUERY_ROWS)]
        for group in group_by_length(pieces):
            segments.append(self._segment([c for c, _ in group], [first for _, first in group], scratch_row))
        return AttentionMetadata(slot_mapping, segments, num_rows, row)

    def _native_rows(self, chunks: Sequence[SequenceChunk], num_rows: int) -> NativeAttentionRows:
        positions, offsets, block_ids = [], [], []
        for chunk in chunks:
            used = -(-(chunk.start_position + chunk.num_rows) // self.block_size)
            positions += range(chunk.start_position, chunk.start_position + chunk.num_rows)
            offsets += [len(block_ids)] * chunk.num_rows
            block_ids += chunk.block_ids[:used]
        padding = num_rows - len(positions)
        offsets += [len(block_ids)] * padding
        positions += [0] * padding
        block_ids.append(NULL_BLOCK_ID)
        return NativeAttentionRows(torch.tensor(positions, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64),
                                   torch.tensor(block_ids, dtype=torch.int32))

    def _segment(self, chunks: Sequence[SequenceChunk], first_rows: Sequence[int], scratch_row: int) -> AttentionSegment:
        device = self.keys.device
        rows = max(c.num_rows for c in chunks)
        consecutive = all(c.num_rows == rows and first == first_rows[0] + i * rows
                          for i, (c, first) in enumerate(zip(chunks, first_rows)))
        query_index = output_index = None
        if not consecutive:
            queries, outputs = [], []
            for chunk, first in zip(chunks, first_rows):
                real = list(range(first, first + chunk.num_rows))
                queries += real + [first] * (rows - chunk.num_rows)
                outputs += real + [scratch_row] * (rows - chunk.num_rows)
            query_index, output_index = torch.tensor(queries, device=device), torch.tensor(outputs, device=device)
        context_blocks = [-(-(c.start_position + c.num_rows) // self.block_size) for c in chunks]
        max_blocks = max(*context_blocks, -(-MIN_ATTENTION_KEYS // self.block_size))
        table = []
        for chunk, used in zip(chunks, context_blocks):
            table += chunk.block_ids[:used] + [NULL_BLOCK_ID] * (max_blocks - used)
        key_positions = torch.arange(max_blocks * self.block_size, device=device)
        # query_positions[s, r]: position of row r of seq s (padding rows repeat its last row);
        # key j is visible when j <= it (causal).
        offsets = torch.arange(rows, device=device)
        query_positions = torch.stack([c.start_position + offsets.clamp(max=c.num_rows - 1) for c in chunks])
        mask = key_positions[None, None, :] <= query_positions[:, :, None]  # [seqs, rows, keys]
        if rows > 1:
            # A KV head's query rows are (query head in its group, row): one mask row each,
            # then padding rows (any visible key will do; their output is dropped).
            mask = mask.repeat(1, self.group_size, 1)
            mask = torch.cat([mask, mask[:, :1].expand(-1, self.padded_query_rows(rows) - mask.shape[1], -1)], dim=1)
        return AttentionSegment(len(chunks), rows, first_rows[0], query_index, output_index,
                                torch.tensor(table, device=device), ~mask)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q: [1, H, N, hd]; k, v: [1, KV, N, hd] -> [1, H, N, hd]. Rows follow `self.metadata`.

        The result is a transposed view of a [N, H, hd] tensor, so the model's
        [1, H, N, hd] -> [1, N, H*hd] reshape before the output projection is free.
        """
        meta = self.metadata
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(1, meta.slot_mapping, k[0] if k.dtype == keys.dtype else k[0].to(keys.dtype))
        values.index_copy_(1, meta.slot_mapping, v[0] if v.dtype == values.dtype else v[0].to(values.dtype))
        if meta.native is not None:  # [1, H, N, hd] -> [N, H, hd] (a view) -> the same layout back
            rows = meta.native
            out = native.paged_attention(q[0].transpose(0, 1), keys, values, rows.block_ids, rows.table_offsets,
                                         rows.positions, self.block_size, self.scale)
            return out[None].transpose(1, 2)
        segments = meta.segments
        if len(segments) == 1 and segments[0].query_index is None and meta.num_real_rows == meta.num_rows:
            return self._attend_segment(layer, q[0], segments[0])[None].transpose(1, 2)  # all decodes, no padding
        out = q.new_zeros(meta.num_rows + 1, q.shape[1], q.shape[3])  # [N + scratch row, H, hd]
        for segment in segments:
            segment_out = self._attend_segment(layer, q[0], segment)  # [seqs * rows, H, hd]
            if segment.output_index is None:
                out[segment.first_row:segment.first_row + segment_out.shape[0]] = segment_out
            else:
                out.index_copy_(0, segment.output_index, segment_out)
        return out[:meta.num_rows][None].transpose(1, 2)

    def attend_qkv(self, layer: int, qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> Tensor:
        """The native path from the fused qkv projection: rotary, cache write and attention in two calls.

        qkv: [N, (H + 2 KV) * hd] bf16; cos, sin: [N, hd] bf16 -> [N, H * hd] (a view of [N, H, hd]).
        Only when `uses_native_kernel` (then `metadata.native` is set); the same bits as `attend`
        after model.decoder.apply_rope.
        """
        meta = self.metadata
        keys, values = self.keys[layer], self.values[layer]
        native.rope_write_kv(qkv, cos, sin, num_heads, self.n_kv_heads, keys, values, meta.slot_mapping)
        rows = meta.native
        # [N, (H + 2 KV) * hd] -> [N, H + 2 KV, hd] -> the q heads [N, H, hd] (a view)
        q = qkv.view(qkv.shape[0], -1, self.head_dim)[:, :num_heads]
        out = native.paged_attention(q, keys, values, rows.block_ids, rows.table_offsets, rows.positions,
                                     self.block_size, self.scale)
        return out.view(qkv.shape[0], -1)

    def _attend_segment(self, layer: int, q: Tensor, segment: AttentionSegment) -> Tensor:
        """q: [H, N, hd] (all rows) -> [seqs * rows of the segment, H, hd]."""
        kv_heads, group, head_dim = self.n_kv_heads, self.group_size, self.head_dim
        seqs, rows = segment.num_seqs, segment.rows_per_seq
        if segment.query_index is None:
            q = q[:, segment.first_row:segment.first_row + seqs * rows]
        else:
            q = q.index_select(1, segment.query_index)
        # [H, seqs*rows, hd] -> [KV, seqs, group*rows, hd]: a KV head's query heads share its keys
        q = q.reshape(kv_heads, group, seqs, rows, head_dim).transpose(1, 2).reshape(kv_heads, seqs, group * rows, head_dim)
        num_query_rows = group * rows
        padded_rows = self.padded_query_rows(rows)
        if padded_rows > num_query_rows:  # see find_row_multiple: few-row kernels differ
            q = torch.cat([q, q.new_zeros(kv_heads, seqs, padded_rows - num_query_rows, head_dim)], dim=2)
        keys = self._gather(self.keys[layer], segment.block_table, seqs)  # [KV, seqs, L, hd]
        values = self._gather(self.values[layer], segment.block_table, seqs)
        scores = torch.matmul(q, keys.transpose(2, 3)).float() * self.scale  # [KV, seqs, M, L]
        scores = scores.masked_fill(segment.hidden_keys, float("-inf"))  # [seqs, 1 or M, L] broadcasts
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)[:, :, :num_query_rows]  # [KV, seqs, group*rows, hd]
        # [KV, seqs, group*rows, hd] -> [seqs, rows, KV, group, hd] -> [seqs*rows, H, hd]
        out = out.view(kv_heads, seqs, group, rows, head_dim).permute(1, 3, 0, 2, 4)
        return out.reshape(seqs * rows, kv_heads * group, head_dim)

    def padded_query_rows(self, rows_per_seq: int) -> int:
        """Query rows per (KV head, sequence) in the attention matmuls, padding included."""
        return -(-self.group_size * rows_per_seq // self.row_multiple) * self.row_multiple

    def _gather(self, cache: Tensor, block_table: Tensor, seqs: int) -> Tensor:
        """cache: [KV, slots, hd] -> the table's blocks as [KV, seqs, blocks_per_seq * block_size, hd]."""
        by_block = cache.view(self.n_kv_heads, self.num_blocks, self.block_size * self.head_dim)
        return by_block.index_select(1, block_table).view(self.n_kv_heads, seqs, -1, self.head_dim)


def group_by_length(pieces: list[tuple[SequenceChunk, int]]) -> list[list[tuple[SequenceChunk, int]]]:
    """Group prefill chunks for batched attention: longest first, a group grows while padding
    every member to its longest keeps the padded rows within 25% (+ 8) of the real ones, and
    under MAX_GROUP_ROWS rows."""
    groups: list[list[tuple[SequenceChunk, int]]] = []
    real_rows = 0
    for piece in sorted(pieces, key=lambda p: -p[0].num_rows):
        if groups:
            longest = groups[-1][0][0].num_rows
            padded = longest * (len(groups[-1]) + 1)
            if padded <= 1.25 * (real_rows + piece[0].num_rows) + 8 and padded <= MAX_GROUP_ROWS:
                groups[-1].append(piece)
                real_rows += piece[0].num_rows
                continue
        groups.append([piece])
        real_rows = piece[0].num_rows
    return groups


def reference_attention(q: Tensor, keys: Tensor, values: Tensor, query_positions: Tensor) -> Tensor:
    """Dense causal attention for tests: q [H, T, hd] at positions; keys/values [KV, L, hd]."""
    mask = torch.arange(keys.shape[1])[None, :] <= query_positions[:, None]
    return F.scaled_dot_product_attention(q[None].float(), keys[None].float(), values[None].float(), attn_mask=mask,
                                          enable_gqa=q.shape[0] != keys.shape[0])[0]


def find_row_multiple(dtype: torch.dtype, device: torch.device | str = "cpu", candidates: Sequence[int] = (1, 2, 4, 8, 16)) -> int:
    """Smallest row padding that makes matmul results per row independent of the row count.

    BLAS kernels may take a different path for a few rows (MKL's float32 GEMM does
    below 4 rows, and for the 1-3 leftover rows of a small M), which changes a
    row's low bits depending on what else is in the batch. Padding the rows of
    every linear and the query rows of every attention matmul to a multiple of
    this makes each row's result canonical (MKL float32 here: 4). Probed on the
    shapes the engine uses (a linear, and the two attention matmuls).
    """
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    weight, inputs = rand(96, 64), rand(48, 64)
    keys, queries = rand(3, 48, 16), rand(3, 48, 16)
    canonical_linear = F.linear(inputs, weight)
    canonical_scores = torch.matmul(queries, keys.transpose(1, 2))  # [3, 48, 48]
    canonical_mixed = torch.matmul(canonical_scores, keys)  # scores as probabilities: [3, 48, 16]
    for multiple in candidates:
        ok = True
        for rows in range(1, 3 * multiple + 1):
            padded = -(-rows // multiple) * multiple
            ok &= torch.equal(F.linear(inputs[:padded], weight)[:rows], canonical_linear[:rows])
            ok &= torch.equal(torch.matmul(queries[:, :padded], keys.transpose(1, 2))[:, :rows], canonical_scores[:, :rows])
            ok &= torch.equal(torch.matmul(queries[:1, :padded], keys[:1].transpose(1, 2))[:, :rows], canonical_scores[:1, :rows])
            ok &= torch.equal(torch.matmul(canonical_scores[:, :padded], keys)[:, :rows], canonical_mixed[:, :rows])
        if ok:
            return multiple
    return candidates[-1]
