"""Two models in one process: does a second model slow the first?

    python bench/bench_two_models.py [--checkpoint weights/X] [--rounds 5] [--max-tokens 64]

Model A's single-stream decode tok/s (median of `--rounds` requests) in four setups, in one
process, alternated round by round:
- `alone`: A is the only engine;
- `shared, B idle`: B loaded, started and warmed up on the same engine thread (how `hearth serve
  --model A --model B` runs: server/engine/step_loop.py), B idle while A decodes;
- `own thread, B idle`: B on a step loop of its own, i.e. a second engine thread with its own
  OpenMP team (the design before the shared loop), B idle;
- `shared, both busy`: A and B decode at once; A's rate and the two together.
Default: random `small` weights (bench_engine.py's), loaded twice. Not a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import build_random_small, machine, make_prompts, run_request  # noqa: E402
from server.engine.engine import run_in_fresh_thread  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: random `small` weights)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def decode_rate(engine, prompt, max_tokens: int, tag: str) -> float:
    tokens, _, usage = asyncio.run(run_request(engine, tag, prompt, max_tokens))
    return (tokens - 1) / usage.decode_time


def both_busy(a, b, prompt, max_tokens: int, tag: str) -> tuple[float, float]:
    async def run():
        return await asyncio.gather(run_request(a, f"{tag}-a", prompt, max_tokens),
                                    run_request(b, f"{tag}-b", prompt, max_tokens))

    rates = [(tokens - 1) / usage.decode_time for tokens, _, usage in asyncio.run(run())]
    return rates[0], sum(rates)


def main() -> None:
    from server.engine import Engine, EngineConfig, step_loop

    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hearth-two-models-") as tmp:
        path = args.checkpoint or run_in_fresh_thread(build_random_small, Path(tmp))
        a, b = (Engine.from_checkpoint(path, EngineConfig(max_num_seqs=4)) for _ in range(2))
        prompt = make_prompts(a.tokenizer, 1, 16)[0]
        results: dict[str, list[float]] = {}
        a.start()
        decode_rate(a, prompt, 8, "warmup-a")
        for round_index in range(args.rounds):
            results.setdefault("alone", []).append(decode_rate(a, prompt, args.max_tokens, f"alone-{round_index}"))
            for setup, loop in (("shared, B idle", a._loop), ("own thread, B idle", step_loop.StepLoop())):
                b._loop, b._lock = loop, loop.lock
                b.start()
                decode_rate(b, prompt, 8, f"warm-b-{round_index}")
                results.setdefault(setup, []).append(decode_rate(a, prompt, args.max_tokens, f"{setup}-{round_index}"))
                if setup.startswith("shared"):
                    rate_a, total = both_busy(a, b, prompt, args.max_tokens, f"busy-{round_index}")
                    results.setdefault("shared, both busy: A", []).append(rate_a)
                    results.setdefault("shared, both busy: A + B", []).append(total)
                b.shutdown()
        a.shutdown()
    alone = statistics.median(results["alone"])
    print("\n| setup | model A decode tok/s | vs alone |\n|---|---|---|")
    for setup, rates in results.items():
        print(f"| {setup} | {statistics.median(rates):.1f} | {statistics.median(rates) / alone:.2f} |")
    print(f"\n{machine()}; medians of {args.rounds} alternated rounds, {args.max_tokens} tokens a request")


if __name__ == "__main__":
    main()
