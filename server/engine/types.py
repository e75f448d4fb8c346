"""The engine's public contract: what the HTTP layer sends in and gets back.

Shared by the engine (worker, scheduler, KV cache), the sampler and the
OpenAI/Ollama protocol layers, so each can be built and tested on its own.

    engine = Engine.from_checkpoint("weights/default", EngineConfig())
    engine.start()
    async for output in engine.generate(GenerationRequest(id, prompt_ids, params)):
        for delta in output.deltas: ...        # one per choice that advanced
        if output.usage: ...                   # set on the last output only

A bad parameter raises `InvalidRequestError` when the `SamplingParams` is
made (its `param` is the field name); admission errors (`QueueFullError`,
`ContextOverflowError`, `InvalidRequestError` for what depends on the model)
are raised by `generate()` before anything is yielded; a failure while running raises `RequestFailedError` mid-stream.
Breaking out of the `async for` (client gone) cancels the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from model.errors import HearthError

FinishReason = str  # "stop" (stop string, stop token, EOS) or "length" (max_tokens or context end)


FLOAT32_MAX = 3.4028234e38  # the sampler computes in float32: 1e308 would become inf
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# (field, test, what a bad value must be): every model-independent rule, checked once on construction.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("max_tokens", lambda v: v >= 1, "must be at least 1"),
    ("temperature", lambda v: v >= 0, "must be >= 0"),
    ("top_k", lambda v: v >= 0, "must be >= 0"),
    ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("repetition_penalty", lambda v: v > 0, "must be > 0"),
    ("presence_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    ("frequency_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    ("n", lambda v: 1 <= v <= 16, "must be between 1 and 16"),
    ("logprobs", lambda v: v is None or 0 <= v <= 20, "must be between 0 and 20"),
    ("stop", lambda v: len(v) <= 16 and all(isinstance(s, str) and s for s in v), "at most 16 non-empty strings"),
    ("stop_token_ids", lambda v: all(type(t) is int for t in v), "must be token ids (integers)"),
)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings: frozen, and validated once, when constructed.

    A bad value raises `InvalidRequestError` whose `param` is the field name
    below (each API maps it to its own name). What depends on the model (token
    ids inside the vocabulary, the grammar's vocabulary, the context length) is
    checked by the engine at admission (`check_against`). Lists are stored as
    tuples and logit_bias as a read-only {int: float} mapping.
    """

    max_tokens: int = 16  # new tokens per choice
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens seen in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # OpenAI: subtract once if the token appeared in the output
    frequency_penalty: float = 0.0  # OpenAI: subtract count * penalty for output tokens
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # per-request torch.Generator; same seed -> same tokens whatever the batch
    stop: Sequence[str] = ()  # stop strings: matched across tokens, never emitted
    stop_token_ids: Sequence[int] = ()  # in addition to the model's own stop tokens
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    n: int = 1  # choices per request; they share the prompt's KV blocks
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus the top k alternatives
    grammar: Any = None  # a server.engine.grammar.CompiledGrammar: each choice's tokens are masked to it

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", MappingProxyType(_checked_logit_bias(self.logit_bias)))
        for name in _FLOAT_FIELDS:
            if not _holds(lambda v: abs(v) <= FLOAT32_MAX, getattr(self, name)):
                raise InvalidRequestError.for_field(name, "is out of range")
        for name, test, rule in _RULES:
            if not _holds(test, getattr(self, name)):
                raise InvalidRequestError.for_field(name, rule)
        if self.ignore_eos and self.grammar is not None:
            raise InvalidRequestError.for_field("ignore_eos", "cannot be combined with structured outputs")

    def check_against(self, vocab_size: int) -> None:
        """The model-dependent rules: token ids inside the vocabulary, a grammar compiled for it."""
        ids_rule = f"token ids must be in [0, {vocab_size})"
        if not all(0 <= t < vocab_size for t in self.logit_bias):
            raise InvalidRequestError.for_field("logit_bias", ids_rule)
        if not all(0 <= t < vocab_size for t in self.stop_token_ids):
            raise InvalidRequestError.for_field("stop_token_ids", ids_rule)
        if self.grammar is not None and self.grammar.vocab_size != vocab_size:
            raise InvalidRequestError.for_field("grammar", "was compiled for another vocabulary")


def _holds(test: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(test(value))
    except TypeError:  # a value of the wrong type is as wrong as one out of range
        return False


def _checked_logit_bias(logit_bias: Mapping[Any, Any]) -> dict[int, float]:
    """{token id: finite float}; keys as ints ({5: x, "5": y} must not write token 5 twice)."""
    checked: dict[int, float] = {}
    for token, value in dict(logit_bias).items():
        if not isinstance(token, int) and not str(token).lstrip("-").isdigit():  # JSON keys are strings: "5"
            raise InvalidRequestError("logit_bias", f"logit_bias keys must be token ids, got {token!r}")
        try:
            token_id, bias = int(token), float(value)
        except (TypeError, ValueError):
            raise InvalidRequestError("logit_bias", f"logit_bias entry {token!r}: {value!r} is not a token id and a number") from None
        if not abs(bias) <= FLOAT32_MAX:
            raise InvalidRequestError("logit_bias", f"logit_bias for token {token_id} must be a finite number")
        checked[token_id] = bias
    return checked


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
    """400: a parameter is out of range. `param` names it (OpenAI's error.param).

    Made by `for_field(field, rule)`, the message is "<field> <rule>", so an API
    can name its own field (`renamed`) without parsing the message.
    """

    def __init__(self, param: str | None, message: str, rule: str | None = None):
        super().__init__(message)
        self.param, self.rule = param, rule

    @classmethod
    def for_field(cls, param: str, rule: str) -> "InvalidRequestError":
        return cls(param, f"{param} {rule}", rule)

    def renamed(self, names: Mapping[str, str]) -> "InvalidRequestError":
        """The same error under an API's field name (`names`: engine field -> request field)."""
        if self.param not in names or names[self.param] == self.param:
            return self
        message = f"{names[self.param]} {self.rule}" if self.rule else str(self)
        return InvalidRequestError(names[self.param], message, self.rule)


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
