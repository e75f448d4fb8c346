"""`hearth bench`: N concurrent streaming clients against a running server.

    hearth bench --url http://127.0.0.1:8080 --concurrency 1,4,16,64 --requests 128 \
        --prompt-tokens 128 --max-tokens 128

Reports, per concurrency level: requests/s, output tokens/s, time to first
token p50/p99, inter-token latency p50/p99 and errors, as a Markdown table
(or JSON with --json).

Design choices:
- Each client is an asyncio task with its own streaming request in flight;
  `--requests` requests are shared among `--concurrency` clients, so the
  server always sees exactly N concurrent streams until the last few finish.
- Prompts are token-id arrays sent to /v1/completions (OpenAI accepts them),
  so the prompt length is exact whatever the tokenizer; ids are random per
  request (seeded), so the prefix cache cannot make later requests look
  cheap. `ignore_eos` makes every request generate exactly --max-tokens.
- Tokens are counted from the server's usage chunk; time to first token is
  measured from sending the request to the first chunk with text, and
  inter-token latency is every gap between consecutive text chunks (a chunk
  that carries k tokens counts as k gaps of 1/k of it).
- One warm-up request runs first and is not counted.
- Sampling is greedy by default (`--temperature 0`), so two runs generate
  the same tokens and compare; `--temperature` sets another.
- One new TCP connection per request (no keep-alive reuse): a pooled
  connection can be closed by the server's keep-alive timeout just as a
  request is sent on it, which would count as a spurious error. Connecting
  on loopback costs well under a millisecond, inside the TTFT measured.
  The report says so.
- The client shares the machine with the server when both run locally; at
  high concurrency its own SSE parsing takes CPU from the server. That is
  reported honestly, not corrected for.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from model.errors import HearthError

TOKEN_ID_RANGE = (300, 500)  # ordinary (non-special) ids in any vocabulary of >= 512 tokens


@dataclass
class RequestResult:
    """One benchmark request as the client saw it."""

    ok: bool
    error: str | None = None  # the server's message or the exception, when not ok
    output_tokens: int = 0  # usage.completion_tokens
    ttft: float | None = None  # seconds: request sent -> first text chunk
    gaps: list[float] = field(default_factory=list)  # seconds between text chunks, per token
    latency: float = 0.0  # seconds: request sent -> stream closed


@dataclass
class LevelReport:
    """Aggregates for one concurrency level."""

    concurrency: int
    requests: int
    errors: int
    seconds: float  # wall time of the level
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    first_error: str | None = None


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (pct in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))  # the smallest value with >= pct% of values at or below it
    return ordered[rank - 1]


def make_prompt(index: int, prompt_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(prompt_tokens)]


async def run_request(client: httpx.AsyncClient, body: dict) -> RequestResult:
    started = time.perf_counter()
    result = RequestResult(ok=False)
    last_text_at: float | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"{response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                now = time.perf_counter()
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    if last_text_at is None:
                        result.ttft = now - started
                    else:
                        result.gaps.append(now - last_text_at)
                    last_text_at = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.latency = time.perf_counter() - started
    _spread_gaps(result)
    return result


def _spread_gaps(result: RequestResult) -> None:
    """Chunks may carry several tokens (held-back UTF-8, stop-string look-ahead): spread the gaps."""
    num_gaps = result.output_tokens - 1
    if result.ok and result.gaps and num_gaps > len(result.gaps):
        total, extra = sum(result.gaps), num_gaps
        result.gaps = [total / extra] * extra


CONNECTION_POLICY = "one new connection per request (no keep-alive reuse)"


async def run_level(url: str, model: str, concurrency: int, num_requests: int, prompt_tokens: int,
                    max_tokens: int, headers: dict, seed: int, temperature: float = 0.0) -> LevelReport:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)  # see CONNECTION_POLICY
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        def body(index: int) -> dict:
            return {
                "model": model, "prompt": make_prompt(index, prompt_tokens, seed), "max_tokens": max_tokens,
                "temperature": temperature, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            }

        warmup = await run_request(client, body(-1))
        if not warmup.ok:
            raise HearthError(f"warm-up request failed: {warmup.error}")
        next_index = iter(range(num_requests))
        results: list[RequestResult] = []

        async def worker() -> None:
            for index in next_index:  # shared iterator: each request is taken by exactly one client
                results.append(await run_request(client, body(index)))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summarize(concurrency, results, time.perf_counter() - started)


def summarize(concurrency: int, results: list[RequestResult], seconds: float) -> LevelReport:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [gap for r in ok for gap in r.gaps]
    ms = lambda value: None if value is None else round(value * 1000, 1)  # noqa: E731
    return LevelReport(
        concurrency=concurrency,
        requests=len(results),
        errors=len(failed),
        seconds=round(seconds, 2),
        requests_per_s=round(len(ok) / seconds, 2),
        output_tokens_per_s=round(sum(r.output_tokens for r in ok) / seconds, 1),
        ttft_p50_ms=ms(percentile(ttfts, 50)),
        ttft_p99_ms=ms(percentile(ttfts, 99)),
        itl_p50_ms=ms(percentile(gaps, 50)),
        itl_p99_ms=ms(percentile(gaps, 99)),
        first_error=failed[0].error if failed else None,
    )


def markdown_table(reports: list[LevelReport]) -> str:
    lines = [
        "| clients | requests | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(f"| {r.concurrency} | {r.requests} | {r.requests_per_s} | {r.output_tokens_per_s} | {r.ttft_p50_ms} | "
                     f"{r.ttft_p99_ms} | {r.itl_p50_ms} | {r.itl_p99_ms} | {r.errors} |")
    return "\n".join(lines)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise HearthError(f"--concurrency {text}: expected a number or a comma-separated list like 1,4,16") from None
    if not levels or min(levels) < 1:
        raise HearthError(f"--concurrency {text}: every level must be at least 1")
    return levels


def first_model(url: str, headers: dict) -> str:
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise HearthError(f"cannot reach the server at {url}: {exc}") from None
    if response.status_code != 200:
        raise HearthError(f"{url}/v1/models answered {response.status_code}: {response.text[:200]}")
    models = [model["id"] for model in response.json().get("data", [])]
    if not models:
        raise HearthError(f"{url} serves no models")
    return models[0]


def run_bench(args) -> int:
    """Handler of `hearth bench`."""
    for name in ("requests", "prompt_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            raise HearthError(f"--{name.replace('_', '-')} must be at least 1")
    url = args.url.rstrip("/")
    api_key = args.api_key or os.environ.get("HEARTH_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = args.model or first_model(url, headers)
    reports = []
    for level in parse_levels(args.concurrency):
        requests = max(args.requests, level)  # at least one request per client
        report = asyncio.run(run_level(url, model, level, requests, args.prompt_tokens, args.max_tokens, headers, args.seed,
                                       args.temperature))
        reports.append(report)
        if not args.json:
            print(f"clients={level}: {report.output_tokens_per_s} output tok/s, {report.errors} errors", flush=True)
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        print(f"\nmodel {model}, prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens per request, "
              f"temperature {args.temperature}, {CONNECTION_POLICY}\n")
        print(markdown_table(reports))
        for r in reports:
            if r.first_error:
                print(f"clients={r.concurrency}: first error: {r.first_error}")
    return 1 if any(r.errors for r in reports) else 0
