"""The engine's public contract: what the HTTP layer sends in and gets back.

Shared by the engine (worker, scheduler, KV cache), the sampler and the
OpenAI/Ollama protocol layers, so each can be built and tested on its own.

    engine = Engine.from_checkpoint("weights/default", EngineConfig())
    engine.start()
    async for output in engine.generate(GenerationRequest(id, prompt_ids, params)):
        for delta in output.deltas: ...        # one per choice that advanced
        if output.usage: ...                   # set on the last output only

Admission errors (`QueueFullError`, `ContextOverflowError`,
`InvalidRequestError`) are raised by `generate()` before anything is
yielded; a failure while running raises `RequestFailedError` mid-stream.
Breaking out of the `async for` (client gone) cancels the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.errors import HearthError

FinishReason = str  # "stop" (stop string, stop token, EOS) or "length" (max_tokens or context end)


@dataclass
class SamplingParams:
    """Per-request decoding settings, validated by `validate()` against the model."""

    max_tokens: int = 16  # new tokens per choice
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens seen in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # OpenAI: subtract once if the token appeared in the output
    frequency_penalty: float = 0.0  # OpenAI: subtract count * penalty for output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # per-request torch.Generator; same seed -> same tokens whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings: matched across tokens, never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's own stop tokens
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    n: int = 1  # choices per request; they share the prompt's KV blocks
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus the top k alternatives
    grammar: Any = None  # a server.engine.grammar.CompiledGrammar: each choice's tokens are masked to it

    def validate(self, vocab_size: int) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("n", 1 <= self.n <= 16, "must be between 1 and 16"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be between 0 and 20"),
            ("logit_bias", all(0 <= t < vocab_size for t in self.logit_bias), f"token ids must be in [0, {vocab_size})"),
            ("stop_token_ids", all(0 <= t < vocab_size for t in self.stop_token_ids), f"token ids must be in [0, {vocab_size})"),
            ("stop", len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop), "at most 16 non-empty strings"),
            ("ignore_eos", not (self.ignore_eos and self.grammar is not None), "cannot be combined with structured outputs"),
            ("grammar", self.grammar is None or self.grammar.vocab_size == vocab_size, "was compiled for another vocabulary"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidRequestError(param, f"{param} {message}")


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    lora: str | None = None  # name of a LoRA adapter loaded into the engine (Engine.add_lora); None: the base


POOLING_METHODS = ("mean", "last")  # how an embedding request's final-normed hidden states become one vector


@dataclass
class EmbeddingRequest:
    """A prefill-only request: its prompt's final-normed hidden states pooled into one vector.

    `Engine.embed()` takes it; pooling and normalize None mean the engine's
    configured defaults (EngineConfig.pooling, EngineConfig.embed_normalize).
    """

    request_id: str
    prompt_ids: list[int]
    pooling: str | None = None  # "mean" (over every prompt row) or "last" (the last prompt row)
    normalize: bool | None = None  # L2-normalize the pooled vector


@dataclass
class EmbeddingOutput:
    request_id: str
    embedding: Any  # float32 torch.Tensor [dim] on the CPU
    prompt_tokens: int
    queue_time: float  # seconds from arrival to first scheduled
    prefill_time: float  # seconds from first scheduled to the pooled vector


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class CompletionDelta:
    index: int  # which of the n choices
    text: str  # new text since the previous delta of this choice (stop strings never included)
    token_ids: list[int]  # the tokens that produced it
    logprobs: list[TokenLogprob] | None = None  # one per token when requested
    finish_reason: FinishReason | None = None  # set on the choice's last delta


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int  # summed over the n choices
    queue_time: float  # seconds from arrival to first scheduled
    prefill_time: float  # seconds from first scheduled to first token
    decode_time: float  # seconds from first token to finish


@dataclass
class RequestOutput:
    request_id: str
    deltas: list[CompletionDelta]
    usage: Usage | None = None  # only on the final output
    finished: bool = False


@dataclass
class EngineStats:
    """A snapshot for /metrics and /api/ps."""

    num_waiting: int
    num_running: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_hit_tokens: int  # cumulative


class EngineError(HearthError):
    """Base class of the errors the HTTP layer maps to status codes."""


class InvalidRequestError(EngineError):
    """400: a parameter is out of range. `param` names it (OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class ContextOverflowError(InvalidRequestError):
    """400: prompt + max_tokens exceeds the model's context."""

    def __init__(self, limit: int, requested: int, prompt_tokens: int):
        super().__init__(
            "messages",
            f"this model's maximum context length is {limit} tokens, but {requested} were requested "
            f"({prompt_tokens} in the prompt + max_tokens)",
        )
        self.limit, self.requested = limit, requested


class QueueFullError(EngineError):
    """429/503: the bounded waiting queue is full; retry later."""


class UnknownAdapterError(InvalidRequestError):
    """No LoRA adapter of that name is loaded (a 400 at admission: the HTTP layer answers 404 before, when
    it resolves the model name; this is the race with an unload in between)."""

    def __init__(self, name: str):
        super().__init__("model", f"no LoRA adapter named '{name}' is loaded")
        self.name = name


class AdapterBusyError(EngineError):
    """409: an adapter cannot be unloaded while requests use it."""


class RequestFailedError(EngineError):
    """A request failed while running (its neighbours carry on)."""
