"""The native linear kernels of the path in use, on 12 cold layers of the `small` shape, any CPU.

    python bench/bench_kernels.py [--rows 1,16,64] [--threads 1] [--isa avx2]

For bf16, int8 (per row) and int4 (groups of 32) weights: the best of five passes over 12 layers'
q/k/v, o, gate/up and down matmuls (each weight read once a pass, 48 matrices, far more than the
caches), as CPU time of the calling thread with --threads 1 (robust on a shared machine) or wall
time otherwise; GB/s of weights read (int4 counted with its scales and zeros) and GFLOP/s; then
the rate of a plain `sum` over 512 MB. bench_decode_step.py has the AVX-512 BF16 path's
breakdown against oneDNN. Not a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (6144, 768), (768, 3072)] * 12  # small: qkv, o, gate_up, down; 12 layers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16,64", help="comma-separated row counts of X")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--isa", choices=["avx512bf16", "avx2", "neon"], help="force the native path")
    return parser.parse_args()


def packed_layers(native) -> dict:
    """kind -> (packed weights, matmul)."""
    from model.quant_kernels import quantize_int4, quantize_int8, unpack_nibbles

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=generator).to(torch.bfloat16) for n, k in SHAPES]
    int8 = [quantize_int8(w.float()) for w in weights]
    int4 = [quantize_int4(w.float(), 32) for w in weights]
    return {
        "bf16": ([native.pack_bf16_weight(w) for w in weights], native.linear_bf16),
        "int8": ([native.pack_int8_weight(q.data, q.scales) for q in int8], native.linear_int8),
        "int4 g32": ([native.pack_int4_weight(unpack_nibbles(q.data), q.scales, q.zeros) for q in int4],
                     lambda x, packed, n: native.linear_int4(x, packed, n, 32)),
    }


def nbytes(packed) -> int:
    return sum(t.numel() * t.element_size() for t in (packed if isinstance(packed, tuple) else (packed,)))


def best_pass(packs, matmul, inputs, clock) -> float:
    best = float("inf")
    for _ in range(5):
        start = clock()
        for packed, (n, k) in zip(packs, SHAPES):
            matmul(inputs[k], packed, n)
        best = min(best, clock() - start)
    return best


def main() -> None:
    args = parse_args()
    if args.isa:
        os.environ["HEARTH_NATIVE_ISA"] = args.isa
    from model import native

    if native.selected_isa() is None:
        raise SystemExit("no native path runs here (see the log line above)")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    dtype = native.activation_dtype()
    print(f"native path {native.isa_name()}, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time")
    print("| kernel | rows | ms | GB/s | GFLOP/s |\n|---|---|---|---|---|")
    for kind, (packs, matmul) in packed_layers(native).items():
        size = sum(nbytes(p) for p in packs)
        for rows in map(int, args.rows.split(",")):
            inputs = {k: torch.randn(rows, k).to(dtype) for k in (768, 3072)}
            seconds = best_pass(packs, matmul, inputs, clock)
            flops = 2 * rows * sum(n * k for n, k in SHAPES)
            print(f"| {kind} | {rows} | {seconds * 1e3:.2f} | {size / seconds / 1e9:.1f} | {flops / seconds / 1e9:.1f} |")
    big = torch.randn(128 << 20)
    seconds = min(_timed(big.sum, clock) for _ in range(5))
    print(f"| plain sum, 512 MB | | {seconds * 1e3:.2f} | {big.numel() * 4 / seconds / 1e9:.1f} | |")


def _timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


if __name__ == "__main__":
    main()
