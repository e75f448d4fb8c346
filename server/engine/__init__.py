"""The inference engine: paged KV cache, continuous-batching scheduler, model worker, sampling.

The contract types import light; `Engine` and `EngineConfig` pull in torch, so
they load on first use (`from server.engine import Engine`).
"""

from server.engine.types import (
    CompletionDelta,
    ContextOverflowError,
    EngineError,
    EngineStats,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    Usage,
)

__all__ = [
    "CompletionDelta", "ContextOverflowError", "Engine", "EngineConfig", "EngineError", "EngineStats",
    "GenerationRequest", "InvalidRequestError", "QueueFullError", "RequestFailedError", "RequestOutput",
    "SamplingParams", "TokenLogprob", "Usage",
]


def __getattr__(name: str):
    if name in ("Engine", "EngineConfig"):
        from server.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'server.engine' has no attribute {name!r}")
