"""The engine: admission on the event loop, its steps on the process's engine thread.

    engine = Engine.from_checkpoint("weights/default", EngineConfig())
    engine.start()
    async for output in engine.generate(GenerationRequest(request_id, prompt_ids, params)):
        ...

Design choices:
- One background thread owns the scheduler, the KV cache and the model; the
  event loop never touches them. It is shared by every engine of the process
  (server/engine/step_loop.py: one OpenMP team however many models are served). `generate()` checks the request (what in
  its parameters depends on the model, context, queue bound) on the caller's side, then hands it over through a
  locked inbox and waits on its own asyncio.Queue; the thread puts outputs
  there with `loop.call_soon_threadsafe`. Torch releases the GIL in its
  kernels, so HTTP stays responsive while a step computes.
- Each loop iteration: take new requests and aborts, schedule, run the worker,
  append tokens, detokenize (stop strings), emit one RequestOutput per request
  that advanced. An abort (the consumer left the `async for`) is applied at the
  start of the next iteration, so its blocks are free within one step.
- Failures are contained: an exception sampling one sequence fails its request
  (RequestFailedError mid-stream); an exception in the forward fails the
  step's requests; the loop itself carries on.
- Requests submitted before `start()` wait in the queue until it is called.
- Usage timings: queue = arrival -> first scheduled, prefill = first scheduled
  -> first token, decode = first token -> finish.
- `from_checkpoint` loads on a thread of its own that exits when done (see
  `run_in_fresh_thread`): the engine thread must be the only thread that
  keeps an OpenMP team alive.
- Embeddings: `embed()` admits a prefill-only sequence into the same batch
  as generation (server/engine/pooling.py says how it flows); its pooled vector
  is delivered, and its blocks freed, in the step that computes its last row.
- LoRA adapters (server/engine/lora.py) are added and removed under the lock, from any thread;
  a request names one (`GenerationRequest.lora`) and pins it from admission to its end, so an
  adapter in use is never removed (AdapterBusyError) and a running step never loses its weights.
- `dtype` "auto" is what the CPU computes natively (`auto_dtype`): fp32 on AVX2
  and NEON, bf16 on AVX-512 BF16 (model/native.py's paths) and on CUDA.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

import torch

from model import native
from model.config import ModelConfig
from model.decoder import Transformer
from model.errors import HearthError
from model.tokenizer import Tokenizer
from server.engine import cpu_fast, step_loop
from server.engine.grammar import GrammarCompiler
from server.engine.kv_cache import KVCacheManager, PagedKVCache
from server.engine.lora import ServingAdapter
from server.engine.pooling import EmbeddingPooler
from server.engine.sampling import SampleResult, SequenceSampler
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, Sequence, TokenEvent
from server.engine.types import (
    POOLING_METHODS,
    AdapterBusyError,
    CompletionDelta,
    ContextOverflowError,
    EmbeddingOutput,
    EmbeddingRequest,
    EngineStats,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
    UnknownAdapterError,
    Usage,
)
from server.engine.worker import ModelWorker, SampleResults

logger = logging.getLogger("hearth.engine")

T = TypeVar("T")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class EngineConfig:
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (cuda when available)
    dtype: str = "auto"  # compute and KV dtype: auto (what the CPU computes natively: auto_dtype), bfloat16 or float32
    block_size: int = 16  # tokens per KV block
    kv_cache_blocks: int | None = None  # pool size; None: from kv_cache_memory_gb, capped at max_num_seqs full contexts
    kv_cache_memory_gb: float = 2.0  # KV budget when kv_cache_blocks is None
    max_num_seqs: int = 64  # most sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (decodes + prefill chunks)
    max_waiting: int = 256  # requests queued beyond free running slots; more get QueueFullError
    enable_prefix_caching: bool = True  # reuse KV of identical full-block prefixes
    pooling: str = "mean"  # embeddings: mean over the prompt's final hidden states, or the last token's
    embed_normalize: bool = True  # embeddings: L2-normalize the pooled vector
    max_lora_rank: int = 64  # largest LoRA adapter rank add_lora accepts

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise HearthError(f"engine config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise HearthError(f"engine config: max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                              f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token each step")
        if self.max_waiting < 0:
            raise HearthError(f"engine config: max_waiting must be >= 0, got {self.max_waiting}")
        if self.pooling not in POOLING_METHODS:
            raise HearthError(f"engine config: pooling must be {' or '.join(POOLING_METHODS)}, got {self.pooling!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise HearthError(f"engine config: dtype must be auto, bfloat16 or float32, got {self.dtype!r}")

    def torch_dtype(self) -> torch.dtype:
        return auto_dtype(self.torch_device()) if self.dtype == "auto" else DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def num_blocks_for(self, model_config: ModelConfig, dtype: torch.dtype) -> int:
        """Pool size including the null block."""
        if self.kv_cache_blocks is not None:
            return self.kv_cache_blocks + 1
        blocks_per_seq = -(-model_config.max_seq_len // self.block_size)
        wanted = self.max_num_seqs * blocks_per_seq
        affordable = int(self.kv_cache_memory_gb * 2**30) // PagedKVCache.bytes_per_block(model_config, self.block_size, dtype)
        return max(min(wanted, affordable), blocks_per_seq) + 1


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA; a CPU with AVX-512 BF16 or AMX: the native
    kernels' bf16 path, or oneDNN's), else fp32 (AVX2, NEON without bf16, anything else): bf16
    emulated in fp32 costs more than the halved bytes save, and fp32 is exact."""
    if device.type != "cpu":
        return torch.bfloat16
    native_dtype = native.activation_dtype()
    if native_dtype is not None:
        return native_dtype
    return torch.bfloat16 if cpu_fast.has_onednn_bf16() else torch.float32


def run_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread that exits when it is done; its result, or its exception re-raised.

    Why: libgomp (PyTorch's OpenMP on Linux) cuts its spin-wait to ~100 iterations
    whenever it manages more threads than there are CPUs, and the OpenMP team a
    thread forms lives until that thread exits. Torch work at load time on a
    long-lived thread (the main thread, an asyncio executor thread) leaves a
    sleeping team behind; the engine thread's own team then sleeps and wakes on
    a futex around each of the ~100 parallel kernels of a decode step. Measured
    on 2 cores, `small` bf16: 25 ms a step instead of 18. A thread that exits
    frees its team.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="hearth-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@dataclass
class _RequestState:
    """The engine thread's view of one request."""

    request: GenerationRequest | EmbeddingRequest
    loop: asyncio.AbstractEventLoop  # the caller's loop: outputs go through call_soon_threadsafe
    queue: asyncio.Queue  # RequestOutput items, or an exception to raise in the caller
    samplers: list[SequenceSampler]  # one per choice
    detokenizers: list[Any]  # one IncrementalDetokenizer per choice
    arrival_time: float
    first_seq: Sequence | None = None  # choice 0 (the one that prefills the prompt)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    completion_tokens: int = 0  # summed over choices
    finished_choices: set[int] = field(default_factory=set)
    pooler: EmbeddingPooler | None = None  # set for an embedding request
    lora: ServingAdapter | None = None  # the adapter it pinned at admission


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def make_detokenizer(tokenizer: Tokenizer, stop: list[str], prompt_ids: list[int]) -> Any:
    from server.engine.detokenize import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, stop, prompt_ids)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 model_id: str = "model"):
        self.config = config or EngineConfig()
        self.model = model.eval()
        self._tokenizer = tokenizer
        self._model_id = model_id
        model_config = model.config
        dtype = model.embed.weight.dtype
        num_blocks = self.config.num_blocks_for(model_config, dtype)
        blocks_per_seq = -(-model_config.max_seq_len // self.config.block_size)
        if num_blocks - 1 < blocks_per_seq:
            raise HearthError(f"engine config: kv_cache_blocks={num_blocks - 1} cannot hold one full context "
                              f"({model_config.max_seq_len} tokens = {blocks_per_seq} blocks of {self.config.block_size})")
        self.grammars = GrammarCompiler(tokenizer, model_config.vocab_size)  # structured outputs, cached per schema
        self.kv_manager = KVCacheManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   model_config.max_seq_len, self.config.block_size), self.kv_manager)
        self.worker = ModelWorker(model, num_blocks, self.config.block_size)
        self._requests: dict[str, _RequestState] = {}  # engine thread only
        self._loop = step_loop.SHARED
        self._lock = self._loop.lock  # shared with every engine on the loop
        self._inbox: deque[_RequestState] = deque()  # guarded by _lock
        self._aborts: deque[str] = deque()  # guarded by _lock
        self._num_unadmitted = 0  # submitted, never scheduled; guarded by _lock
        self._submitted: set[str] = set()  # request ids in flight; guarded by _lock
        self._started = False
        self._stopped = threading.Event()
        self._stopping = False
        self._loras: dict[str, ServingAdapter] = {}  # loaded adapters by name; guarded by _lock
        self._lora_users: dict[str, int] = {}  # requests admitted and not finished, per adapter; guarded by _lock

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EngineConfig | None = None) -> "Engine":
        """Load and pack the checkpoint on a short-lived thread (see run_in_fresh_thread)."""
        return run_in_fresh_thread(cls._load, path, config or EngineConfig())

    @classmethod
    def _load(cls, path: str | Path, config: EngineConfig) -> "Engine":
        from model.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path, device=config.torch_device(), dtype=config.torch_dtype())
        engine = cls(checkpoint.model, checkpoint.tokenizer, config, model_id=Path(path).name)
        logger.info("engine %s: %s", engine.model_id, ", ".join(f"{k} {v}" for k, v in engine.compute().items()))
        return engine

    # ------------------------------------------------------------------ public facts

    def compute(self) -> dict[str, str]:
        """How this engine computes: device, activation/KV dtype, the native kernels' path (or 'off'),
        and whether a step runs its layers in one native call (for logs and /v1/models)."""
        device = self.worker.device
        return {"device": device.type, "dtype": str(self.worker.dtype).removeprefix("torch."),
                "native_isa": native.isa_name() if device.type == "cpu" else "off",
                "native_decoder": "yes" if self.worker.native_decoder is not None else "no"}

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = self._num_waiting_locked()
        return EngineStats(
            num_waiting=waiting,
            num_running=len(self.scheduler.running),
            kv_blocks_total=self.kv_manager.num_usable_blocks,
            kv_blocks_used=self.kv_manager.num_used_blocks,
            prefix_cache_hit_tokens=self.scheduler.prefix_cache_hit_tokens,
        )

    # ------------------------------------------------------------------ LoRA adapters

    def add_lora(self, adapter: ServingAdapter) -> None:
        """Serve `adapter` (already checked against this base: server/engine/lora.py) under its name."""
        adapter.to(self.worker.device)
        with self._lock:
            if adapter.name in self._loras:
                raise HearthError(f"a LoRA adapter named '{adapter.name}' is already loaded")
            self.worker.enable_lora()
            self._loras[adapter.name] = adapter
            self._lora_users[adapter.name] = 0

    def remove_lora(self, name: str) -> ServingAdapter:
        """Stop serving an adapter; AdapterBusyError while requests use it."""
        with self._lock:
            if name not in self._loras:
                raise UnknownAdapterError(name)
            users = self._lora_users[name]
            if users:
                raise AdapterBusyError(f"LoRA adapter '{name}' has {users} request(s) running or queued; "
                                       "unload it when they finish")
            del self._lora_users[name]
            return self._loras.pop(name)

    def _pin_lora_locked(self, name: str | None) -> ServingAdapter | None:
        if name is None:
            return None
        adapter = self._loras.get(name)
        if adapter is None:
            raise UnknownAdapterError(name)
        self._lora_users[name] += 1
        return adapter

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Step on the shared engine thread (server/engine/step_loop.py) from now on."""
        if self._started:
            return
        self._started, self._stopping = True, False
        self._stopped.clear()
        self._loop.add(self)

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._started:
            self._stopped.wait()
            self._started = False

    # ------------------------------------------------------------------ the caller's side

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; admission errors raise before the first one."""
        state = self._admit(request)
        done = False
        try:
            while True:
                item = await state.queue.get()
                done = isinstance(item, BaseException) or item.finished
                if isinstance(item, BaseException):
                    raise item
                yield item
                if done:
                    return
        finally:
            if not done:  # the consumer left early: free its blocks
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._submitted:
                self._aborts.append(request_id)
                self._lock.notify_all()

    def _admit(self, request: GenerationRequest) -> _RequestState:
        self._check(request)
        params = request.params
        vocab_size = self.model.config.vocab_size
        samplers = [SequenceSampler(params, request.prompt_ids, vocab_size, choice) for choice in range(params.n)]
        detokenizers = [make_detokenizer(self._tokenizer, list(params.stop), request.prompt_ids) for _ in range(params.n)]
        state = _RequestState(request, asyncio.get_running_loop(), asyncio.Queue(), samplers, detokenizers, time.monotonic())
        self._submit(state)
        return state

    async def embed(self, request: EmbeddingRequest) -> EmbeddingOutput:
        """The request's pooled vector; admission errors raise at once, and cancelling the await aborts it."""
        self._check_embedding(request)
        pooler = EmbeddingPooler(len(request.prompt_ids), request.pooling or self.config.pooling,
                                 self.config.embed_normalize if request.normalize is None else request.normalize)
        state = _RequestState(request, asyncio.get_running_loop(), asyncio.Queue(), [], [], time.monotonic(),
                              pooler=pooler)
        self._submit(state)
        try:
            item = await state.queue.get()
        except BaseException:  # cancelled (client gone): free its blocks
            self.abort(request.request_id)
            raise
        if isinstance(item, BaseException):
            raise item
        return item

    def _submit(self, state: _RequestState) -> None:
        """Hand a checked request to the engine thread, within the waiting-queue bound."""
        request = state.request
        with self._lock:
            if self._stopping:
                raise RequestFailedError("the engine is shutting down")
            if request.request_id in self._submitted:
                raise InvalidRequestError("request_id", f"request id {request.request_id!r} is already running")
            waiting = self._num_waiting_locked()
            if not self._has_free_slot_locked() and waiting >= self.config.max_waiting:
                raise QueueFullError(f"the server is busy: the waiting queue is full ({waiting} waiting for a free "
                                     f"slot, limit {self.config.max_waiting}: --max-waiting); retry later")
            state.lora = self._pin_lora_locked(getattr(request, "lora", None))  # embeddings: the base
            self._num_unadmitted += 1
            self._submitted.add(request.request_id)
            self._inbox.append(state)
            self._lock.notify_all()

    def _num_waiting_locked(self) -> int:
        """Requests submitted but not started, beyond the free running slots: what --max-waiting bounds.

        A request admitted while a slot is free starts at the next step and is
        not counted, so the 429 message and hearth_num_requests_waiting agree.
        """
        return max(0, self._num_unadmitted - self._free_slots_locked())

    def _free_slots_locked(self) -> int:
        return max(0, self.config.max_num_seqs - len(self.scheduler.running))

    def _has_free_slot_locked(self) -> bool:
        """A new request would start at the next step without waiting."""
        return self._num_unadmitted < self._free_slots_locked()

    def _check(self, request: GenerationRequest) -> None:
        params, prompt = request.params, request.prompt_ids
        params.check_against(self.model.config.vocab_size)  # the rest was checked when params were made
        if not prompt:
            raise InvalidRequestError("prompt", "prompt is empty")
        vocab_size = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
            raise InvalidRequestError("prompt", f"prompt token ids must be integers in [0, {vocab_size})")
        requested = len(prompt) + params.max_tokens
        if requested > self.max_seq_len:
            raise ContextOverflowError(self.max_seq_len, requested, len(prompt))

    def _check_embedding(self, request: EmbeddingRequest) -> None:
        prompt, vocab_size = request.prompt_ids, self.model.config.vocab_size
        if not prompt:
            raise InvalidRequestError("prompt", "prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
            raise InvalidRequestError("prompt", f"prompt token ids must be integers in [0, {vocab_size})")
        if len(prompt) > self.max_seq_len:
            raise InvalidRequestError("prompt", f"prompt is {len(prompt)} tokens, over this model's maximum "
                                                f"context length of {self.max_seq_len} tokens")
        if request.pooling is not None and request.pooling not in POOLING_METHODS:
            raise InvalidRequestError("pooling", f"pooling must be {' or '.join(POOLING_METHODS)}")

    # ------------------------------------------------------------------ the engine thread

    def has_turn(self) -> bool:
        """Anything to do: new requests, aborts, a shutdown, or scheduled work (the lock held)."""
        return bool(self._inbox or self._aborts or self._stopping or self.scheduler.has_work())

    def take_turn(self) -> bool:
        """Take new requests and aborts, then one step; False once shutting down."""
        with self._lock:
            if self._stopping:
                return False
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for state in new:
            self._add(state)
        for request_id in aborts:
            self._drop(request_id)
        try:
            self._step()
        except Exception:  # noqa: BLE001 -- a bug must not kill the loop silently
            logger.exception("engine step failed")
            self._fail_all(RequestFailedError("internal engine error"))
        return True

    def finish(self) -> None:
        self._fail_all(RequestFailedError("the engine shut down"))
        self._stopped.set()

    def _add(self, state: _RequestState) -> None:
        if state.pooler is not None:
            return self._add_embedding(state)
        request = state.request
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self._tokenizer.stop_ids)
        seq = Sequence(request.request_id, list(request.prompt_ids), len(request.prompt_ids), params,
                       frozenset(stop_ids), sampler=state.samplers[0], fork_samplers=state.samplers[1:],
                       lora=state.lora, cache_salt=state.lora.cache_key if state.lora else None)
        state.first_seq = seq
        self._requests[request.request_id] = state
        self.scheduler.add_sequence(seq)

    def _add_embedding(self, state: _RequestState) -> None:
        request = state.request
        seq = Sequence(request.request_id, list(request.prompt_ids), len(request.prompt_ids),
                       SamplingParams(max_tokens=1), pooler=state.pooler)
        state.first_seq = seq
        self._requests[request.request_id] = state
        self.scheduler.add_sequence(seq)

    def _step(self) -> None:
        output = self.scheduler.schedule()
        if output.is_empty:
            time.sleep(0.001)  # waiting requests that do not fit yet; nothing to compute
            return
        self._note_scheduled(output)
        try:
            results = self.worker.execute(output)
        except Exception as exc:  # noqa: BLE001 -- the step's requests fail, the engine goes on
            logger.exception("forward pass failed")
            for request_id in {item.seq.request_id for item in output.scheduled}:
                self._fail(request_id, RequestFailedError(f"the model failed on this batch: {exc}"))
            return
        tokens = self._collect_tokens(results)
        events = self.scheduler.update_from_output(output, tokens)
        self._emit(events, results)
        self._emit_embeddings(output)

    def _note_scheduled(self, output: SchedulerOutput) -> None:
        now = time.monotonic()
        for item in output.scheduled:
            state = self._requests.get(item.seq.request_id)
            if state is not None and state.first_scheduled_time is None:
                state.first_scheduled_time = now
                with self._lock:
                    self._num_unadmitted -= 1

    def _collect_tokens(self, results: SampleResults) -> dict[int, list[int]]:
        """Token ids per sequence; a sequence with any failed sample fails its request."""
        tokens = {}
        for seq_id, samples in results.items():
            failure = next((s for s in samples if isinstance(s, Exception)), None)
            if failure is None:
                tokens[seq_id] = [s.token_id for s in samples]
                continue
            request_id = self._request_of(seq_id)
            if request_id is not None:
                message = str(failure) or type(failure).__name__
                self._fail(request_id, RequestFailedError(f"sampling failed: {message}"))
        return tokens

    def _request_of(self, seq_id: int) -> str | None:
        for request_id, seqs in self.scheduler.seqs_by_request.items():
            if any(seq.seq_id == seq_id for seq in seqs):
                return request_id
        return None

    def _emit(self, events: list[TokenEvent], results: SampleResults) -> None:
        now = time.monotonic()
        deltas: dict[str, list[CompletionDelta]] = {}
        for event in events:
            state = self._requests.get(event.seq.request_id)
            if state is None:
                continue
            sample = results[event.sampled_seq_id][event.sample_index]
            deltas.setdefault(state.request.request_id, []).append(self._delta(state, event, sample))
            if state.first_token_time is None:
                state.first_token_time = now
        outputs = []
        for request_id, request_deltas in deltas.items():
            state = self._requests[request_id]
            finished = len(state.finished_choices) == state.request.params.n
            usage = self._usage(state, now) if finished else None
            if finished:  # before delivering: the caller may reuse the id as soon as it has this
                self._forget(request_id)
            outputs.append((state, RequestOutput(request_id, request_deltas, usage, finished)))
        self._deliver_all(outputs)

    def _emit_embeddings(self, output: SchedulerOutput) -> None:
        """Deliver the vectors pooled this step; their sequences finish now, freeing their blocks."""
        now = time.monotonic()
        outputs = []
        for item in output.scheduled:
            seq = item.seq
            if seq.pooler is None or seq.pooler.vector is None or seq.is_finished:
                continue
            self.scheduler.finish_sequence(seq, "stop")
            state = self._requests.get(seq.request_id)
            if state is not None:
                self._forget(seq.request_id)  # before delivering: the caller may reuse the id at once
                outputs.append((state, self._embedding_output(state, seq.pooler.vector, now)))
        self._deliver_all(outputs)

    @staticmethod
    def _embedding_output(state: _RequestState, vector: torch.Tensor, now: float) -> EmbeddingOutput:
        first_scheduled = state.first_scheduled_time or now
        return EmbeddingOutput(state.request.request_id, vector, len(state.request.prompt_ids),
                               queue_time=first_scheduled - state.arrival_time, prefill_time=now - first_scheduled)

    def _delta(self, state: _RequestState, event: TokenEvent, sample: SampleResult) -> CompletionDelta:
        seq, choice = event.seq, event.seq.choice_index
        detokenizer = state.detokenizers[choice]
        state.completion_tokens += 1
        reason = event.finish_reason
        if event.stopped_by_token:  # the stop token is not part of the text
            return self._finish_choice(state, choice, CompletionDelta(choice, detokenizer.flush(), [], None, "stop"))
        text, hit_stop = detokenizer.add(event.token_id)
        if hit_stop:
            reason = "stop"
            self.scheduler.finish_sequence(seq, "stop")
        elif reason is not None:
            text += detokenizer.flush()
        logprobs = [sample.logprob] if sample.logprob is not None else None
        delta = CompletionDelta(choice, text, [event.token_id], logprobs, reason)
        return self._finish_choice(state, choice, delta) if reason is not None else delta

    @staticmethod
    def _finish_choice(state: _RequestState, choice: int, delta: CompletionDelta) -> CompletionDelta:
        state.finished_choices.add(choice)
        return delta

    def _usage(self, state: _RequestState, now: float) -> Usage:
        first_scheduled = state.first_scheduled_time or now
        first_token = state.first_token_time or now
        return Usage(
            prompt_tokens=len(state.request.prompt_ids),
            cached_tokens=state.first_seq.num_cached_tokens or 0,
            completion_tokens=state.completion_tokens,
            queue_time=first_scheduled - state.arrival_time,
            prefill_time=first_token - first_scheduled,
            decode_time=now - first_token,
        )

    def _deliver(self, state: _RequestState, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(state, item)])

    @staticmethod
    def _deliver_all(outputs: list[tuple[_RequestState, RequestOutput | EmbeddingOutput | BaseException]]) -> None:
        """One wake-up per event loop per step, not one per request (each is a syscall)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for state, item in outputs:
            by_loop.setdefault(state.loop, []).append((state.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _drop(self, request_id: str) -> None:
        """Abort: free the request's blocks now; nothing more is delivered."""
        if request_id in self._requests:
            self.scheduler.abort_request(request_id)
            self._forget(request_id)

    def _fail(self, request_id: str, error: RequestFailedError) -> None:
        state = self._requests.get(request_id)
        self.scheduler.abort_request(request_id)
        if state is not None:
            self._forget(request_id)
            self._deliver(state, error)

    def _fail_all(self, error: RequestFailedError) -> None:
        with self._lock:
            pending, self._inbox = list(self._inbox), deque()
        for state in pending:
            self._requests[state.request.request_id] = state
        for request_id in list(self._requests):
            self._fail(request_id, error)

    def _forget(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        with self._lock:
            self._submitted.discard(request_id)
            if state is not None and state.first_scheduled_time is None:
                self._num_unadmitted -= 1
            if state is not None and state.lora is not None:
                self._lora_users[state.lora.name] -= 1
