"""Keeping the server's resident memory flat under load (glibc's allocator, not a leak).

    tune_malloc()                      # once, before the engine and uvicorn start their threads
    task = start_trimming(every=30)    # in the app's lifespan; cancel it at shutdown

Why: under 32 streaming clients the server's RSS grew for minutes while
nothing per request survived (KV blocks back to 0, the asyncio task count
back to its idle value: bench/bench_soak.py samples both). The growth is
glibc malloc keeping freed memory: every thread that allocates (the engine
thread, uvicorn's loop, PyTorch's intra-op threads, executors) gets its own
arena, up to 8 per core, and freed tensor buffers stay cached in them; and
after the first large buffer is freed glibc raises its mmap threshold (up to
32 MiB), so later activation buffers come from those arenas instead of
mmap, which would hand them back to the kernel on free.

Design choices:
- `mallopt` at start-up: at most 2 arenas (`M_ARENA_MAX`) and a fixed 1 MiB
  mmap threshold (`M_MMAP_THRESHOLD`; fixing it also turns off the dynamic
  raise), so big buffers go back to the kernel when freed. A variable the
  user set (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_) wins: glibc has read it.
- `malloc_trim(0)` every 30 s on a worker thread gives back what the arenas
  still hold free (it runs concurrently with the engine; glibc locks each
  arena while it trims it, a few milliseconds at most).
- Only glibc: elsewhere (musl, macOS) these are no-ops that say so.
  HEARTH_MALLOC_TUNING=0 turns both off (to compare, or under jemalloc).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from contextlib import suppress

logger = logging.getLogger("hearth.server")

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 1 << 20
TRIM_EVERY_S = 30.0


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_libc = _glibc()


def tune_malloc() -> dict[str, int]:
    """Apply the arena and mmap-threshold limits (unless set in the environment); returns what was set."""
    applied: dict[str, int] = {}
    if _libc is None or os.environ.get("HEARTH_MALLOC_TUNING", "1") == "0":
        return applied
    for variable, option, value in (("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
                                    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
        if variable not in os.environ and _libc.mallopt(option, value) == 1:
            applied[variable] = value
    return applied


def trim() -> bool:
    """Hand the free memory glibc holds back to the kernel; True if some was released."""
    return bool(_libc is not None and _libc.malloc_trim(0))


async def _trim_forever(every: float) -> None:
    while True:
        await asyncio.sleep(every)
        await asyncio.to_thread(trim)


def start_trimming(every: float = TRIM_EVERY_S) -> asyncio.Task | None:
    if os.environ.get("HEARTH_MALLOC_TUNING", "1") == "0":
        return None
    if _libc is None:
        logger.info("not glibc: no periodic malloc_trim")
        return None
    return asyncio.create_task(_trim_forever(every), name="hearth-malloc-trim")


async def stop_trimming(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
