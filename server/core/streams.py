"""Admitted engine streams: submitting, merging several, closing (which aborts what still runs).

Design choices:
- `start_generation` awaits the engine's first output before returning, so
  admission errors (queue full, context overflow, bad parameter) raise
  before any answer has started.
- Whoever answers a request closes its streams when done, even when it is
  being cancelled (`close_all` shields the close): closing the engine's
  generator aborts a request still running and frees its KV blocks.
- Several prompts are several engine requests, submitted together (they
  prefill in the same steps) and merged as their outputs arrive.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any, AsyncIterator

import anyio

from server.engine.types import GenerationRequest, RequestOutput, SamplingParams, Usage


class AdmittedStream:
    """An engine stream whose first output has arrived. Closing it, iterated or not, aborts the request."""

    def __init__(self, first: RequestOutput | None, stream: Any):
        self._first, self._stream = first, stream

    def __aiter__(self) -> "AdmittedStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        self._first = None
        await self._stream.aclose()  # a no-op once the engine's stream has finished


async def start_generation(engine: Any, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AdmittedStream:
    """Submit a request and wait for its first output: admission errors raise here."""
    stream = engine.generate(GenerationRequest(request_id, prompt_ids, params))
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()
        raise
    return AdmittedStream(first, stream)


async def start_all(engine: Any, jobs: list[tuple[str, list[int], SamplingParams]]) -> list[AdmittedStream]:
    """Submit several requests together (they prefill in the same steps); if one is refused, cancel the rest."""
    results = await asyncio.gather(*(start_generation(engine, *job) for job in jobs), return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is None:
        return list(results)
    await close_all([r for r in results if not isinstance(r, BaseException)])
    raise failure


async def close_all(streams: list[AdmittedStream]) -> None:
    """Close streams (aborting whatever still runs), even if the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        for stream in streams:
            with suppress(Exception):
                await stream.aclose()


async def merge_streams(streams: list[AdmittedStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as their outputs arrive: (stream index, output)."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(index: int, stream: AdmittedStream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((index, exc))
        finally:
            await queue.put((index, done_marker))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done_marker:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await close_all(streams)


def add_usage(total: Usage | None, usage: Usage | None) -> Usage | None:
    """Sum the usage of several engine requests (a list of prompts)."""
    if usage is None or total is None:
        return total or usage
    return Usage(
        prompt_tokens=total.prompt_tokens + usage.prompt_tokens,
        cached_tokens=total.cached_tokens + usage.cached_tokens,
        completion_tokens=total.completion_tokens + usage.completion_tokens,
        queue_time=max(total.queue_time, usage.queue_time),
        prefill_time=max(total.prefill_time, usage.prefill_time),
        decode_time=max(total.decode_time, usage.decode_time),
    )
