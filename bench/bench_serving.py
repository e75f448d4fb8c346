"""Serving throughput and the cost of HTTP: the engine driven in-process vs `hearth serve` + `hearth bench`.

    python bench/bench_serving.py                       # `small` preset, random weights, 1/4/16/64 clients
    python bench/bench_serving.py --levels 16 --max-tokens 64 --part http

Both halves send the same requests (token-id prompts of --prompt-tokens,
exactly --max-tokens new tokens each via ignore_eos, temperature 0.8) at the
same concurrency levels, and both are summarized by `clients.loadbench`
(requests/s, output tok/s, TTFT and inter-token latency percentiles), so the
two tables differ only by what sits between the client and the engine:
JSON, SSE, uvicorn, and the client's own CPU time (the client runs on the
same two cores as the server, as a local user's would).

Wall-clock rates need a quiet machine; on a shared one they mostly measure the
neighbours. So each level also records CPU time per generated token: the
bench process for the in-process engine, the server process plus the client
for HTTP (from /proc). That ratio is the real cost of the HTTP layer and holds
up under load.

The checkpoint is the `small` shape (768 wide, 12 layers, vocab 32000) with
random weights and a 32000-token BPE trained on the offline corpus, so the
detokenizer sees real multi-byte merges; it is built once into --workdir.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.loadbench import LevelReport, RequestResult, make_prompt, markdown_table, run_level, summarize  # noqa: E402
from server.engine.engine import run_in_fresh_thread  # noqa: E402
from clients.spawn import start_server as spawn_server, stop_server  # noqa: E402

CORPUS = Path("/work/shared/corpus")


def build_checkpoint(folder: Path) -> Path:
    """`small` with random weights and a 32000-token tokenizer (cached)."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.decoder import Transformer
    from model.tokenizer import Tokenizer

    lines: list[str] = []
    for name in ("shakespeare.txt.gz", "wordnet-dictionary.txt.gz"):
        with gzip.open(CORPUS / name, "rt", encoding="utf-8") as file:
            lines += file.readlines()
    tokenizer = Tokenizer.train(iter(lines), vocab_size=32000)
    config = ModelConfig.from_preset("small", vocab_size=tokenizer.vocab_size)
    model = Transformer(config).init_weights(0).to(torch.bfloat16).eval()
    save_checkpoint(folder, model, tokenizer)
    print(f"built {folder}: small, vocab {tokenizer.vocab_size}, {config.num_params() / 1e6:.1f}M params")
    return folder


# ------------------------------------------------------------------------------ engine, in-process


async def engine_request(engine, index: int, args: argparse.Namespace) -> RequestResult:
    from server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, ignore_eos=True)
    request = GenerationRequest(f"bench-{index}", make_prompt(index, args.prompt_tokens, args.seed), params)
    result = RequestResult(ok=False)
    started = last = time.perf_counter()
    try:
        async for output in engine.generate(request):
            now = time.perf_counter()
            if any(delta.text for delta in output.deltas):
                if result.ttft is None:
                    result.ttft = now - started
                else:
                    result.gaps.append(now - last)
                last = now
            if output.usage is not None:
                result.output_tokens = output.usage.completion_tokens
        result.ok = True
    except Exception as exc:  # reported as an error row, like the HTTP client does
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - started
    if result.ok and result.gaps and result.output_tokens - 1 > len(result.gaps):
        result.gaps = [sum(result.gaps) / (result.output_tokens - 1)] * (result.output_tokens - 1)
    return result


async def engine_level(engine, level: int, num_requests: int, args: argparse.Namespace) -> LevelReport:
    await engine_request(engine, -1, args)  # warm-up, as the HTTP client does
    next_index = iter(range(num_requests))
    results: list[RequestResult] = []

    async def worker() -> None:
        for index in next_index:
            results.append(await engine_request(engine, index, args))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(level)))
    return summarize(level, results, time.perf_counter() - started)


def start_engine(checkpoint: Path, args: argparse.Namespace):
    from server.engine.engine import Engine, EngineConfig

    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_num_seqs=args.max_num_seqs))
    engine.start()
    return engine


def engine_report(engine, level: int, args: argparse.Namespace) -> LevelReport:
    return asyncio.run(engine_level(engine, level, requests_for(level, args), args))


# ------------------------------------------------------------------------------ through HTTP


def start_server(checkpoint: Path, args: argparse.Namespace, port: int = 18765) -> tuple[subprocess.Popen, str]:
    return spawn_server(checkpoint, "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning", port=port)


def http_report(url: str, checkpoint: Path, level: int, args: argparse.Namespace) -> LevelReport:
    return asyncio.run(run_level(url, checkpoint.name, level, requests_for(level, args), args.prompt_tokens,
                                 args.max_tokens, {}, args.seed))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(run, pids: list[int]) -> tuple[LevelReport, float]:
    """Run one level; also return the CPU milliseconds the given processes spent per output token."""
    before = [cpu_seconds(pid) for pid in pids]
    report = run()
    spent = sum(cpu_seconds(pid) - start for pid, start in zip(pids, before))
    tokens = report.output_tokens_per_s * report.seconds
    return report, round(1000 * spent / tokens, 2) if tokens else float("nan")


def requests_for(level: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, args.requests_per_client * level)


def comparison_table(engine: list[LevelReport], http: list[LevelReport], cpu_ms: dict) -> str:
    lines = ["| clients | engine tok/s | HTTP tok/s | engine CPU ms/token | HTTP CPU ms/token (server + client) | "
             "CPU ratio | engine TTFT p50 (ms) | HTTP TTFT p50 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for e, h in zip(engine, http):
        level = e.concurrency
        ratio = cpu_ms["http", level] / cpu_ms["engine", level]
        lines.append(f"| {level} | {e.output_tokens_per_s} | {h.output_tokens_per_s} | {cpu_ms['engine', level]} | "
                     f"{cpu_ms['http', level]} | {ratio:.2f} | {e.ttft_p50_ms} | {h.ttft_p50_ms} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", choices=("both", "engine", "http"), default="both")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".hearth-cache" / "bench-serving")
    parser.add_argument("--json", type=Path, default=None, help="also write the reports here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="serve this folder instead of the `small` one")
    args = parser.parse_args()
    args.levels = [int(level) for level in args.levels.split(",")]
    # Built on a thread that exits: this process's engine thread must be the only one keeping an
    # OpenMP team (see server.engine.engine.run_in_fresh_thread).
    checkpoint = args.checkpoint or run_in_fresh_thread(build_checkpoint, args.workdir / "small")
    # Both sides stay up for the whole run and take turns level by level, so load from other
    # processes on the machine falls on both alike; the idle one costs no CPU.
    engine = start_engine(checkpoint, args) if args.part in ("both", "engine") else None
    server, url = start_server(checkpoint, args) if args.part in ("both", "http") else (None, "")
    engine_reports: list[LevelReport] = []
    http_reports: list[LevelReport] = []
    cpu_ms: dict[tuple[str, int], float] = {}  # (side, level) -> CPU ms per output token
    me = os.getpid()
    try:
        for level in args.levels:
            load = os.getloadavg()[0]
            if engine is not None:
                report, cpu_ms["engine", level] = measured(lambda: engine_report(engine, level, args), [me])
                engine_reports.append(report)
                print(f"engine clients={level}: {report.output_tokens_per_s} tok/s, "
                      f"{cpu_ms['engine', level]} CPU ms/token (load {load:.1f})", flush=True)
            if server is not None:
                report, cpu_ms["http", level] = measured(lambda: http_report(url, checkpoint, level, args), [me, server.pid])
                http_reports.append(report)
                print(f"http   clients={level}: {report.output_tokens_per_s} tok/s, "
                      f"{cpu_ms['http', level]} CPU ms/token (server + client)", flush=True)
    finally:
        if engine is not None:
            engine.shutdown()
        if server is not None:
            stop_server(server)
    engine, http = engine_reports, http_reports
    header = (f"`small` (random weights, bf16), prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens "
              f"per request, max_num_seqs {args.max_num_seqs}")
    for name, reports in (("engine, in-process", engine), ("HTTP: hearth serve + hearth bench", http)):
        if reports:
            print(f"\n### {name}: {header}\n\n{markdown_table(reports)}")
    if engine and http:
        print(f"\n### HTTP overhead\n\n{comparison_table(engine, http, cpu_ms)}")
    if args.json:
        from dataclasses import asdict

        args.json.write_text(json.dumps({"engine": [asdict(r) for r in engine], "http": [asdict(r) for r in http]}, indent=2))


if __name__ == "__main__":
    main()
