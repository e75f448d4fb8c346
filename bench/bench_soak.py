"""Soak test: N streaming clients for T minutes against `hearth serve`, watching the server's memory.

    python bench/bench_soak.py                                   # 32 clients, 1 min warm-up + 10 min
    python bench/bench_soak.py --clients 32 --warmup 60 --minutes 4 --model weights/default
    MALLOC_ARENA_MAX=8 python bench/bench_soak.py ...            # the environment goes to the server

Starts the server itself (clients.spawn, so its PID is known), then keeps
`--clients` streaming /v1/completions requests in flight without pause
(token-id prompts of --prompt-tokens, random per request, --max-tokens new
tokens, greedy). Every --every seconds it samples the server's RSS
(/proc/PID/status), the KV blocks in use and the asyncio tasks alive (both
from /metrics), and the requests done and failed so far; it prints one table
row per sample, then the verdict: RSS growth from the end of the warm-up to
the end, against --max-growth (exit status 1 beyond it, or on any error).
The warm-up ends at the first sample after --warmup seconds once every
client has finished two requests (on a slow machine the first ones take
longer than the warm-up).

After the clients stop it waits for the KV blocks to return to 0 and the
task count to fall back, which is what a leak of per-request state would
break first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.loadbench import make_prompt  # noqa: E402
from clients.spawn import start_server, stop_server  # noqa: E402


@dataclass
class Sample:
    seconds: float
    rss_mb: float
    kv_blocks_used: int
    tasks: int
    done: int
    errors: int


@dataclass
class Counters:
    done: int = 0
    errors: int = 0
    first_error: str | None = None


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def gauge(metrics: str, name: str) -> int:
    values = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name)]
    return int(sum(values))


async def one_request(client: httpx.AsyncClient, body: dict, counters: Counters) -> None:
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"error"' in line[:20]:
                    raise RuntimeError(line[:200])
            if response.status_code != 200:
                raise RuntimeError(f"status {response.status_code}")
        counters.done += 1
    except (httpx.HTTPError, RuntimeError) as exc:
        counters.errors += 1
        counters.first_error = counters.first_error or f"{type(exc).__name__}: {exc}"


async def client_loop(url: str, model: str, args: argparse.Namespace, stop_at: float, counters: Counters, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        while time.monotonic() < stop_at:
            body = {"model": model, "prompt": make_prompt(rng.randrange(1 << 30), args.prompt_tokens, seed),
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
            await one_request(client, body, counters)


async def sample(url: str, pid: int, started: float, counters: Counters) -> Sample:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        metrics = (await client.get("/metrics")).text
    return Sample(round(time.monotonic() - started), rss_mb(pid), gauge(metrics, "hearth_kv_cache_blocks_used"),
                  gauge(metrics, "hearth_event_loop_tasks"), counters.done, counters.errors)


def row(sample: Sample, baseline: float | None) -> str:
    growth = "" if baseline is None else f"{100 * (sample.rss_mb / baseline - 1):+.1f}%"
    return (f"| {sample.seconds} | {sample.rss_mb:.0f} | {growth} | {sample.kv_blocks_used} | {sample.tasks} | "
            f"{sample.done} | {sample.errors} |")


async def soak(url: str, pid: int, model: str, args: argparse.Namespace) -> tuple[list[Sample], float, Counters]:
    started = time.monotonic()
    stop_at = started + args.warmup + 60 * args.minutes
    counters = Counters()
    clients = [asyncio.create_task(client_loop(url, model, args, stop_at, counters, index)) for index in range(args.clients)]
    samples, baseline = [], None
    print("| s | RSS MB | vs warm-up end | KV blocks used | asyncio tasks | requests done | errors |")
    print("|---|---|---|---|---|---|---|", flush=True)
    while time.monotonic() < stop_at:
        await asyncio.sleep(min(args.every, max(0.0, stop_at - time.monotonic())))
        current = await sample(url, pid, started, counters)
        if baseline is None and current.seconds >= args.warmup and current.done >= 2 * args.clients:
            baseline = current.rss_mb
        samples.append(current)
        print(row(current, baseline), flush=True)
    await asyncio.gather(*clients)
    return samples, baseline or samples[-1].rss_mb, counters


async def settle(url: str, pid: int, started: float, counters: Counters, timeout: float = 60) -> Sample:
    """After the load: KV blocks back to 0, tasks back to the idle count."""
    deadline = time.monotonic() + timeout
    while True:
        current = await sample(url, pid, started, counters)
        if current.kv_blocks_used == 0 or time.monotonic() > deadline:
            return current
        await asyncio.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "weights" / "default"), help="checkpoint folder to serve")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before the RSS baseline")
    parser.add_argument("--minutes", type=float, default=10, help="minutes of load after the warm-up")
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-growth", type=float, default=5.0, help="percent of RSS growth allowed after warm-up")
    parser.add_argument("--serve-flag", action="append", default=[], help="extra `hearth serve` flag (repeat)")
    args = parser.parse_args()
    process, url = start_server(args.model, "--max-num-seqs", str(max(64, args.clients)), *args.serve_flag)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        started = time.monotonic()
        idle_tasks = gauge(httpx.get(f"{url}/metrics").text, "hearth_event_loop_tasks")
        samples, baseline, counters = asyncio.run(soak(url, process.pid, model, args))
        after = asyncio.run(settle(url, process.pid, started, counters))
    finally:
        stop_server(process)
    growth = 100 * (samples[-1].rss_mb / baseline - 1)
    print(f"\nafter the load: {row(after, baseline)} (idle before: {idle_tasks} tasks)")
    print(f"{args.clients} clients, {args.warmup:.0f} s warm-up + {args.minutes:g} min, {counters.done} requests, "
          f"{counters.errors} errors; RSS {baseline:.0f} -> {samples[-1].rss_mb:.0f} MB after the warm-up "
          f"({growth:+.1f}%, limit {args.max_growth}%); MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
    if counters.first_error:
        print(f"first error: {counters.first_error}")
    return 0 if growth <= args.max_growth and not counters.errors and after.kv_blocks_used == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
