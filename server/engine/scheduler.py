"""Continuous-batching scheduler: which sequences run each step, and how many tokens each.

Design choices (after vLLM v1's scheduler):
- One uniform rule, no prefill/decode phases: every sequence has token_ids
  (prompt + generated) and num_computed_tokens (those whose KV is in the cache);
  a step gives it up to `len(token_ids) - num_computed_tokens` tokens under a
  per-step token budget. A decode is the case where that is 1; a long prompt
  is simply cut by the budget (chunked prefill) and continues next step. A
  sequence whose chunk reaches the end of its tokens is sampled.
- Running sequences go first, decodes before prefill chunks, so a long prompt
  never stalls running generations; waiting sequences are admitted, FIFO,
  with what budget and blocks are left.
- Blocks are allocated as sequences grow. When the pool runs dry the newest
  running sequence not yet scheduled this step is preempted by recompute: its
  blocks are freed, num_computed_tokens goes back to 0, and it waits at the
  front of the queue; when readmitted it prefills prompt + generated tokens
  (mostly prefix-cache hits) and carries on. No new sequence is admitted in a
  step that preempted.
- Prefix caching happens at admission: the longest cached run of full blocks
  of the sequence's tokens becomes the head of its block table.
- n > 1: a request starts as one sequence; when its prompt is done, the n
  tokens drawn from the prompt's logits fork it into n sequences sharing the
  prompt's blocks (see KVCacheManager.fork). Admission reserves their slots.
- An embedding request is a sequence with a `pooler` (server/engine/pooling.py):
  scheduled like any prompt, but with no prefix-cache lookup or registration and
  no sample when its prompt is done; the engine then finishes it.
- The scheduler knows nothing of tensors, text or asyncio: the engine feeds it
  sampled token ids and stop decisions (tests drive it with fake outputs).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from server.engine.kv_cache import KVCacheManager, extend_block_hashes
from server.engine.types import FinishReason, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds blocks; scheduled every step while it has budget
    FINISHED = "finished"  # done (stop, length, aborted or failed); blocks freed


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One choice of one request: its tokens and where the engine is with them."""

    request_id: str  # the GenerationRequest it belongs to
    token_ids: list[int]  # prompt followed by the tokens generated so far
    num_prompt_tokens: int  # length of the prompt part of token_ids
    params: SamplingParams  # the request's settings (max_tokens, stop ids, n)
    stop_token_ids: frozenset[int] = frozenset()  # ids that end the choice ("stop"): model stop tokens + params'
    choice_index: int = 0  # which of the request's n choices
    seq_id: int = field(default_factory=lambda: next(_seq_ids))  # unique within the process
    num_computed_tokens: int = 0  # leading tokens whose KV is in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # chained hash of each full block of token_ids
    num_pending_forks: int = 0  # choices still to split off when the prompt is done (n - 1, then 0)
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None  # "stop" or "length" once finished normally
    sampler: Any = None  # its SequenceSampler (the engine's; the scheduler only carries it)
    fork_samplers: list[Any] = field(default_factory=list)  # samplers of choices 1..n-1, used at the fork
    pooler: Any = None  # an embedding request's EmbeddingPooler (server/engine/pooling.py): prefill only, never sampled
    lora: Any = None  # its LoRA adapter (server/engine/lora.py; the worker's), None: the base model
    cache_salt: bytes | None = None  # seeds its block hashes: the adapter's cache key, so prefixes are per adapter

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # most sequences running at once (decode batch size)
    max_num_batched_tokens: int = 2048  # token budget of one step: decodes + prefill chunks
    max_seq_len: int = 512  # the model's context; a sequence never grows past it
    block_size: int = 16  # tokens per KV block (must match the KVCacheManager)


@dataclass
class ScheduledSequence:
    seq: Sequence  # the sequence (the worker reads its token ids and samplers)
    start_position: int  # num_computed_tokens before this step: position of its first token fed
    num_tokens: int  # tokens fed this step: 1 for a decode, a chunk for a prefill
    block_ids: list[int]  # its block table, covering start_position + num_tokens
    num_samples: int  # 0: mid-prompt chunk; 1: sample one token; n: sample a forking prompt's n choices


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # running decodes, running prefill chunks, then new admissions
    total_num_tokens: int  # sum of num_tokens: rows of the step's flattened batch (before padding)
    blocks_to_copy: list[tuple[int, int]]  # (src, dst) whole-block copies to make before the forward (forks)
    preempted: list[Sequence]  # preempted this step: blocks freed, they will recompute
    blocks_to_zero: list[int] = field(default_factory=list)  # newly handed-out blocks: zeroed first, then the copies

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.blocks_to_copy and not self.blocks_to_zero


@dataclass
class TokenEvent:
    """One token appended to a sequence by `update_from_output`."""

    seq: Sequence  # the sequence it was appended to (a fork child for choices >= 1)
    token_id: int  # the sampled token
    sampled_seq_id: int  # the scheduled sequence whose logits it was drawn from (the parent, for a fork)
    sample_index: int  # which of that sequence's samples this step (index into the worker's results)
    finish_reason: FinishReason | None  # "stop" (stop token) or "length"; None: still running
    stopped_by_token: bool  # the token itself is a stop token (not part of the text)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        if kv_manager.block_size != config.block_size:
            raise ValueError("scheduler and KV cache manager disagree on block_size")
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Sequence] = deque()  # FIFO; preempted sequences go back to the front
        self.running: list[Sequence] = []  # in admission order; the last is preempted first
        self.seqs_by_request: dict[str, list[Sequence]] = {}  # every unfinished sequence of each request
        self.pending_copies: list[tuple[int, int]] = []  # block copies from forks, for the next step
        self.num_preemptions = 0  # cumulative
        self.prefix_cache_hit_tokens = 0  # cumulative prompt tokens served from the prefix cache

    # ------------------------------------------------------------------ requests in and out

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a request's first sequence (its other n-1 choices are forked from it)."""
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.config.block_size, seq.cache_salt)
        seq.num_pending_forks = seq.params.n - 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.seqs_by_request.setdefault(seq.request_id, []).append(seq)

    def finish_sequence(self, seq: Sequence, reason: FinishReason | None) -> None:
        """End one sequence (stop string, abort, failure) and free its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        siblings = self.seqs_by_request.get(seq.request_id, [])
        if seq in siblings:
            siblings.remove(seq)
            if not siblings:
                del self.seqs_by_request[seq.request_id]

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of a request (client gone, failure); returns them."""
        seqs = list(self.seqs_by_request.get(request_id, ()))
        for seq in seqs:
            self.finish_sequence(seq, None)
        return seqs

    @property
    def num_waiting_new(self) -> int:
        """Queued sequences never admitted (preempted ones excluded): the queue bound counts these."""
        return sum(1 for seq in self.waiting if seq.num_cached_tokens is None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending_copies)

    # ------------------------------------------------------------------------ the step

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._allocate_or_preempt(seq, num_new, scheduled, preempted):
                scheduled.append(self._schedule(seq, num_new))
                budget -= num_new
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        copies, self.pending_copies = self.pending_copies, []
        return SchedulerOutput(scheduled, sum(s.num_tokens for s in scheduled), copies, preempted,
                               self.kv.take_fresh_blocks())

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, scheduled: list[ScheduledSequence],
                             preempted: list[Sequence]) -> bool:
        """Find blocks for seq's next num_new tokens, preempting newer unscheduled sequences."""
        scheduled_ids = {s.seq.seq_id for s in scheduled}
        while not self.kv.allocate_slots(seq.seq_id, seq.num_computed_tokens + num_new):
            victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled_ids), seq)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            reserved = len(self.running) + sum(s.num_pending_forks for s in self.running)  # forks to come
            if reserved + 1 + seq.num_pending_forks > self.config.max_num_seqs:
                break
            # an embedding needs every row computed: no prefix-cache hit
            cached_prefix = self.kv.find_cached_prefix(seq.token_ids, seq.block_hashes) if seq.pooler is None else []
            num_cached = len(cached_prefix) * self.config.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(seq.seq_id, num_cached + num_new, cached_prefix):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens is None:  # first admission: what the usage record reports
                seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
                self.prefix_cache_hit_tokens += seq.num_cached_tokens
            scheduled.append(self._schedule(seq, num_new))
            budget -= num_new
        return budget

    def _schedule(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_new  # counted as computed now; the worker runs them this step
        reaches_end = seq.num_computed_tokens == seq.num_tokens
        num_samples = (1 + seq.num_pending_forks) if reaches_end and seq.pooler is None else 0
        return ScheduledSequence(seq, start, num_new, self.kv.block_ids(seq.seq_id), num_samples)

    # -------------------------------------------------------------------- after the step

    def update_from_output(self, output: SchedulerOutput, sampled: dict[int, list[int]]) -> list[TokenEvent]:
        """Append sampled tokens (seq id -> one per sample), fork, register full blocks, finish.

        Sequences finished or aborted since `schedule` are skipped.
        """
        events: list[TokenEvent] = []
        for item in output.scheduled:
            seq = item.seq
            if seq.is_finished:
                continue
            if seq.pooler is None:  # an embedding's blocks are never cached: freed, they are reused first
                self.kv.register_full_blocks(seq.seq_id, seq.block_hashes, seq.num_computed_tokens)
            tokens = sampled.get(seq.seq_id, [])
            # Fork before the parent's own token: the parent may finish on it and free its blocks.
            child_events = self._fork(seq, tokens[1:]) if item.num_samples > 1 and len(tokens) > 1 else []
            if tokens:
                events.append(self._append_token(seq, tokens[0], seq.seq_id, 0))
            events += child_events
        return events

    def _append_token(self, seq: Sequence, token_id: int, sampled_seq_id: int, sample_index: int) -> TokenEvent:
        seq.token_ids.append(token_id)
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.config.block_size, seq.cache_salt)
        stopped_by_token = token_id in seq.stop_token_ids
        reason = None
        if stopped_by_token:
            reason = "stop"
        elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.config.max_seq_len:
            reason = "length"
        if reason is not None:
            self.finish_sequence(seq, reason)
        return TokenEvent(seq, token_id, sampled_seq_id, sample_index, reason, stopped_by_token)

    def _fork(self, parent: Sequence, child_tokens: list[int]) -> list[TokenEvent]:
        """Split choices 1.. off a sequence whose prompt was just computed."""
        parent.num_pending_forks = 0
        events = []
        for offset, token_id in enumerate(child_tokens):
            child = Sequence(
                request_id=parent.request_id, token_ids=parent.token_ids[:parent.num_prompt_tokens],
                num_prompt_tokens=parent.num_prompt_tokens, params=parent.params,
                stop_token_ids=parent.stop_token_ids, choice_index=offset + 1,
                block_hashes=list(parent.block_hashes[:parent.num_prompt_tokens // self.config.block_size]),
                num_cached_tokens=parent.num_cached_tokens,
                sampler=parent.fork_samplers[offset] if offset < len(parent.fork_samplers) else None,
                lora=parent.lora, cache_salt=parent.cache_salt,
            )
            self.seqs_by_request[parent.request_id].append(child)
            self._start_child(parent, child)
            events.append(self._append_token(child, token_id, parent.seq_id, offset + 1))
        parent.fork_samplers = []
        return events

    def _start_child(self, parent: Sequence, child: Sequence) -> None:
        """Share the parent's prompt blocks; with no block free for the copy, queue it to recompute."""
        try:
            copy = self.kv.fork(parent.seq_id, child.seq_id, parent.num_prompt_tokens)
        except MemoryError:
            child.status = SequenceStatus.WAITING
            self.waiting.appendleft(child)
            return
        if copy is not None:
            self.pending_copies.append(copy)
        child.num_computed_tokens = parent.num_prompt_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
