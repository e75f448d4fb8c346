"""What OpenAI's chat and completions answers share: header, usage, logprobs, SSE framing.

Design choices:
- Streaming follows OpenAI's framing exactly: `data: {chunk}\\n\\n` frames,
  an optional usage chunk with empty choices, then `data: [DONE]`. An
  engine failure mid-stream is sent as an error frame (what the openai SDK
  raises on), without [DONE].
- Logprobs arrive converted (server/core/pieces.py); here they only take
  OpenAI's two shapes: chat's list of entries, completions' parallel lists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from server.core.events import Logprob
from server.core.http import SSE_HEADERS, CancellingStreamingResponse, collect_unless_disconnected, new_id
from server.core.serving import Generation
from server.engine.types import Usage
from server.http_errors import to_api_error
from server.openai.protocol import (
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionUsage,
    PromptTokensDetails,
    TopLogprob,
)
from server.registry import ModelRegistry, ServedModel


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


@dataclass
class ResponseContext:
    """What every chunk or answer of one response repeats."""

    response_id: str
    created: int
    served: ServedModel

    @classmethod
    def create(cls, prefix: str, served: ServedModel) -> "ResponseContext":
        return cls(new_id(prefix), int(time.time()), served)

    @property
    def header(self) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "created": self.created,
            "model": self.served.model_id,
            "system_fingerprint": self.served.system_fingerprint,
        }


def to_usage(usage: Usage | None) -> CompletionUsage | None:
    if usage is None:
        return None
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def chat_logprobs(logprobs: tuple[Logprob, ...] | list[Logprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        ChatCompletionTokenLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes,
                                   top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in entry.top])
        for entry in logprobs
    ])


def completion_logprobs(logprobs: tuple[Logprob, ...] | list[Logprob], start_offset: int) -> CompletionLogprobs:
    """The legacy completions layout: parallel lists, alternatives as {token text: logprob}."""
    result = CompletionLogprobs()
    offset = start_offset
    for entry in logprobs:
        result.tokens.append(entry.token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({t.token: t.logprob for t in entry.top})
        result.text_offset.append(offset)
        offset += len(entry.token)
    return result


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def sse_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frame the chunks, end with [DONE]; an engine failure becomes an error frame."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except Exception as exc:  # mid-stream: the status line is long gone, report in-band
        yield sse(json.dumps(to_api_error(exc).openai_body()))
        return
    yield sse("[DONE]")


async def respond(request: Request, generation: Generation, stream: bool | None,
                  chunks: Callable[[], AsyncIterator[str]], whole: Callable[[], Awaitable[BaseModel]]) -> Response:
    """Stream `chunks()` as SSE, or answer `whole()` as JSON (aborted if the client leaves first)."""
    streams = generation.streams
    if stream:
        return CancellingStreamingResponse(sse_stream(chunks()), streams=streams, media_type="text/event-stream", headers=SSE_HEADERS)
    answer = await collect_unless_disconnected(request, whole(), streams)
    return Response(answer.model_dump_json(), media_type="application/json")
