"""Hearth's engine on an imported GGUF file, side by side with llama.cpp's `llama-bench` on the same file.

    python bench/bench_gguf.py weights/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--llama-bench ~/llama.cpp/build/bin/llama-bench] [--dtypes keep,bfloat16] [--rounds 3]

The file is imported once per `--dtypes` entry (`hearth import-gguf --dtype D`, into a temp
folder); each round then runs, one after another, every Hearth import (a fresh engine: one
request decoding `--max-tokens` tokens after a short prompt, then one `--prefill-tokens`
prompt, at --engine-dtype) and, when `--llama-bench` is given, `llama-bench -t
THREADS -p PREFILL -n TOKENS -fa 1 -r 1` on the GGUF file itself. Rounds alternate the systems,
so a noisy neighbour hits both; the table gives medians. Not a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import machine, make_prompts, run_request  # noqa: E402
from bench_vs_llamacpp import llama_round  # noqa: E402
from server.engine.engine import run_in_fresh_thread  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="GGUF file (general.architecture llama)")
    parser.add_argument("--llama-bench", type=Path, default=None, help="llama.cpp's llama-bench binary (optional)")
    parser.add_argument("--dtypes", default="keep,bfloat16", help="import-gguf --dtype values to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="the engine's compute dtype (hearth serve --dtype)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        parser.error(f"no such file {args.gguf}")
    if args.llama_bench is not None and not args.llama_bench.is_file():
        parser.error(f"--llama-bench: no such file {args.llama_bench}")
    return args


def hearth_round(checkpoint: Path, args) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) of one freshly loaded engine (as bench_vs_llamacpp's, with --engine-dtype)."""
    import asyncio

    from server.engine import Engine, EngineConfig

    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_num_seqs=4, dtype=args.engine_dtype))
    engine.start()
    try:
        prompt = make_prompts(engine.tokenizer, 1, 16)[0]
        asyncio.run(run_request(engine, "warmup", prompt, 8))
        tokens, _, usage = asyncio.run(run_request(engine, "decode", prompt, args.max_tokens))
        long_prompt = (prompt * (args.prefill_tokens // len(prompt) + 1))[:args.prefill_tokens]
        _, _, prefill = asyncio.run(run_request(engine, "prefill", long_prompt, 1))
        return (tokens - 1) / usage.decode_time, len(long_prompt) / prefill.prefill_time
    finally:
        engine.shutdown()


def main() -> None:
    from model.gguf_import import import_gguf

    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*dtypes, "llama.cpp"]}
    with tempfile.TemporaryDirectory(prefix="hearth-gguf-bench-") as tmp:
        checkpoints = {}
        for dtype in dtypes:
            started = time.perf_counter()
            checkpoints[dtype] = run_in_fresh_thread(import_gguf, args.gguf, Path(tmp) / dtype, dtype)
            print(f"import --dtype {dtype}: {time.perf_counter() - started:.1f} s", flush=True)
        for round_index in range(args.rounds):
            for dtype, checkpoint in checkpoints.items():
                results[dtype].append(hearth_round(checkpoint, args))
                print(f"round {round_index + 1} hearth {dtype}: decode {results[dtype][-1][0]:.1f} tok/s, "
                      f"prefill {results[dtype][-1][1]:.0f} tok/s", flush=True)
            if args.llama_bench is not None:
                results["llama.cpp"].append(llama_round(args.gguf, args))
                print(f"round {round_index + 1} llama.cpp: tg {results['llama.cpp'][-1][0]:.1f} tok/s, "
                      f"pp {results['llama.cpp'][-1][1]:.0f} tok/s", flush=True)
    print(f"\n| system | decode tok/s ({args.max_tokens} tokens) | prefill tok/s ({args.prefill_tokens}-token prompt) |")
    print("|---|---|---|")
    for name, runs in results.items():
        if runs:
            decode, prefill = (statistics.median(values) for values in zip(*runs))
            label = (f"llama.cpp on {args.gguf.name}" if name == "llama.cpp"
                     else f"Hearth, import-gguf --dtype {name}, engine {args.engine_dtype}")
            print(f"| {label} | {decode:.1f} | {prefill:.0f} |")
    print(f"\n{machine()}; medians of {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
