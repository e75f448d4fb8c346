"""Hearth's engine against llama.cpp's `llama-bench` on the `small` shape, interleaved in one run.

    python bench/bench_vs_llamacpp.py --llama-bench ~/llama.cpp/build/bin/llama-bench \
        --gguf bf16=small-f16.gguf,int8=small-q8_0.gguf,int4=small-q4_0.gguf [--isa avx2]

llama.cpp is not part of Hearth: build it yourself and convert a model of the same shape
(hidden 768, 12 layers, 12 heads, FFN 3072, vocab 32000, untied; random weights are fine,
speed does not depend on them) with its `convert_hf_to_gguf.py` and `llama-quantize`.

Each round runs, for each Hearth weight format and its llama.cpp counterpart (bf16 / F16,
int8 / Q8_0, int4 g32 / Q4_0): the engine in-process on random `small` weights (one request
decoding `--max-tokens` tokens after a short prompt, then one `--prefill-tokens` prompt),
then `llama-bench -t THREADS -p PREFILL -n TOKENS -fa 1 -r 1` on the GGUF file. Rounds
alternate the two systems, so a noisy neighbour hits both; the table gives the median of
the rounds and the ratio. `--isa` forces Hearth's native path (HEARTH_NATIVE_ISA: an AVX-512
machine can measure its AVX2 path; build llama.cpp for the same ISA then). A real GGUF file
against llama.cpp on the same file: bench/bench_gguf.py. One engine is alive at a time (each engine thread owns an OpenMP
team; two would slow each other, see README). Not a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import QUANTIZED, build_random_small, machine, make_prompts, run_request  # noqa: E402
from server.engine.engine import run_in_fresh_thread  # noqa: E402

LLAMA_NAMES = {"bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-bench", required=True, type=Path, help="path to llama.cpp's llama-bench binary")
    parser.add_argument("--gguf", required=True, help="comma-separated FORMAT=FILE, FORMAT one of bf16, int8, int4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=["avx512bf16", "avx2", "neon", "off"], help="force Hearth's native path")
    args = parser.parse_args()
    args.files = {}
    for item in args.gguf.split(","):
        name, _, path = item.partition("=")
        if name not in LLAMA_NAMES or not Path(path).is_file():
            parser.error(f"--gguf: {item!r} is not FORMAT=FILE with FORMAT in {', '.join(LLAMA_NAMES)} and an existing file")
        args.files[name] = Path(path)
    if not args.llama_bench.is_file():
        parser.error(f"--llama-bench: no such file {args.llama_bench}")
    return args


def hearth_round(checkpoint: Path, args) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) of one freshly loaded engine."""
    from server.engine import Engine, EngineConfig

    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_num_seqs=4))
    engine.start()
    try:
        prompt = make_prompts(engine.tokenizer, 1, 16)[0]
        asyncio.run(run_request(engine, "warmup", prompt, 8))
        asyncio.run(run_request(engine, "warmup-decode", prompt, args.max_tokens))  # first use of fresh KV blocks
        tokens, _, usage = asyncio.run(run_request(engine, "decode", prompt, args.max_tokens))
        decode = (tokens - 1) / usage.decode_time
        length = min(args.prefill_tokens, engine.max_seq_len - 1)  # room for the one output token (`small`: 511)
        long_prompt = (prompt * (length // len(prompt) + 1))[:length]
        _, _, usage = asyncio.run(run_request(engine, "prefill", long_prompt, 1))
        return decode, len(long_prompt) / usage.prefill_time
    finally:
        engine.shutdown()


def llama_round(gguf: Path, args) -> tuple[float, float]:
    """(tg tok/s, pp tok/s) from one llama-bench repetition."""
    command = [str(args.llama_bench), "-m", str(gguf), "-t", str(args.threads), "-p", str(args.prefill_tokens),
               "-n", str(args.max_tokens), "-fa", "1", "-r", "1", "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads(result.stdout)
    speed = {("pp" if row["n_prompt"] else "tg"): row["avg_ts"] for row in rows}
    return speed["tg"], speed["pp"]


def main() -> None:
    args = parse_args()
    if args.isa:
        import os

        from model import native

        os.environ["HEARTH_NATIVE_ISA"] = args.isa
        native.forget_kernels()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    results = {name: {"hearth": [], "llama": []} for name in args.files}
    with tempfile.TemporaryDirectory(prefix="hearth-vs-llama-") as tmp:
        source = run_in_fresh_thread(build_random_small, Path(tmp))
        checkpoints = {"bf16": source}
        for name in args.files:
            if name in QUANTIZED:
                from model.quant import quantize_checkpoint

                checkpoints[name] = run_in_fresh_thread(quantize_checkpoint, source, Path(tmp) / name, *QUANTIZED[name]).out
        runs = {name: (checkpoints[name], gguf) for name, gguf in args.files.items()}
        for round_index in range(args.rounds):
            for name, (checkpoint, gguf) in runs.items():
                results[name]["hearth"].append(hearth_round(checkpoint, args))
                results[name]["llama"].append(llama_round(gguf, args))
                hearth, llama = results[name]["hearth"][-1], results[name]["llama"][-1]
                print(f"round {round_index + 1} {name}: hearth decode {hearth[0]:.1f} prefill {hearth[1]:.0f} | "
                      f"llama.cpp {LLAMA_NAMES[name]} tg {llama[0]:.1f} pp {llama[1]:.0f}", flush=True)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    print(f"\n| weights | Hearth decode tok/s | llama.cpp tg{args.max_tokens} | ratio | "
          f"Hearth prefill tok/s | llama.cpp pp{args.prefill_tokens} | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        hearth = [statistics.median(values) for values in zip(*runs["hearth"])]
        llama = [statistics.median(values) for values in zip(*runs["llama"])]
        print(f"| {name} / {LLAMA_NAMES[name]} | {hearth[0]:.1f} | {llama[0]:.1f} | {hearth[0] / llama[0]:.2f} | "
              f"{hearth[1]:.0f} | {llama[1]:.0f} | {hearth[1] / llama[1]:.2f} |")
    print(f"\n{machine()}; medians of {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
