"""A/B of the native matmul kernels: a git revision's against the working tree's, alternated in one process.

    python bench/ab_kernels.py --base 26c8534                 # bf16, int8 (and int4 where both have it)
    python bench/ab_kernels.py --base 35ea234 --against 442ffcb --kernels int4 --rows 1,16

A revision's model/native.py and model/csrc/ are written to a temporary folder and imported as a
module of its own, so each side packs the weights with its own layout and runs its own compiled
library (`--against` another revision instead of the working tree). Both sides get the same random weights: 12 layers of `small`'s q/k/v, o, gate/up
and down (cold in cache between calls, as in a decode step), and the same inputs. Rounds alternate
the two sides, and which goes first (the first is slower); the table gives medians, the ratio, and whether the outputs were the same bits.
Not a test; nothing asserts. This shared machine moves by up to 20% within minutes, so trust ratios
that hold over a rerun.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import native as current_native  # noqa: E402
from server.engine.engine import run_in_fresh_thread  # noqa: E402

LAYER_SHAPES = [(2304, 768), (768, 768), (6144, 768), (768, 3072)]  # `small`: q/k/v, o, gate/up, down
NUM_LAYERS = 12
BYTES_PER_WEIGHT = {"bf16": 2, "int8": 1, "int4": 0.625}  # int4: 4 bits and a bf16 scale and zero per 32


def load_revision(revision: str, folder: Path):
    """model/native.py and model/csrc/ at `revision`, imported as a separate module."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", revision, "model/csrc"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in ["model/native.py", *files]:
        target = folder / Path(name).relative_to("model")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{name}"],
                                          capture_output=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location(f"native_{revision}", folder / "native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_layers(kind: str) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(NUM_LAYERS):
        for out_features, in_features in LAYER_SHAPES:
            if kind == "bf16":
                weight = {"weight": torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)}
            elif kind == "int8":
                weight = {"codes": torch.randint(-127, 128, (out_features, in_features), generator=generator,
                                                 dtype=torch.int8), "scales": torch.rand(out_features, generator=generator)}
            else:
                scales = torch.rand(out_features, in_features // 32, generator=generator).to(torch.bfloat16)
                weight = {"codes": torch.randint(0, 16, (out_features, in_features), generator=generator,
                                                 dtype=torch.uint8), "scales": scales, "zeros": scales}
            layers.append(dict(weight, out_features=out_features, in_features=in_features))
    return layers


def matmuls(module, kind: str, layers: list[dict]):
    """Each layer packed by `module` -> a function running them all on the inputs by width."""
    if kind == "bf16":
        packed = [(module.pack_bf16_weight(layer["weight"]), layer) for layer in layers]
        run = lambda x, p, layer: module.linear_bf16(x, p, layer["out_features"])  # noqa: E731
    elif kind == "int8":
        packed = [(module.pack_int8_weight(layer["codes"], layer["scales"]), layer) for layer in layers]
        run = lambda x, p, layer: module.linear_int8(x, p, layer["out_features"])  # noqa: E731
    else:
        packed = [(module.pack_int4_weight(layer["codes"], layer["scales"], layer["zeros"]), layer) for layer in layers]
        run = lambda x, p, layer: module.linear_int4(x, p, layer["out_features"], 32)  # noqa: E731
    return lambda inputs: [run(inputs[layer["in_features"]], p, layer) for p, layer in packed]


def compare(base, against, kind: str, rows: list[int], rounds: int) -> list[tuple]:
    layers = random_layers(kind)
    sides = {"base": matmuls(base, kind, layers), "current": matmuls(against, kind, layers)}
    flops = 2 * sum(o * i for o, i in LAYER_SHAPES) * NUM_LAYERS
    results = []
    for num_rows in rows:
        inputs = {k: torch.randn(num_rows, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
                  for k in (768, 3072)}
        repeats = max(2, 40 // num_rows)
        speeds: dict[str, list[float]] = {"base": [], "current": []}
        outputs = {}
        for round_index in range(rounds):
            order = list(sides.items()) if round_index % 2 == 0 else list(sides.items())[::-1]  # who goes first alternates
            for name, run in order:
                outputs[name] = run(inputs)  # warm-up, and the outputs to compare
                start = time.perf_counter()
                for _ in range(repeats):
                    run(inputs)
                speeds[name].append(flops * num_rows * repeats / (time.perf_counter() - start) / 1e9)
        same = all(torch.equal(a, b) for a, b in zip(outputs["base"], outputs["current"]))
        base_speed, current_speed = (statistics.median(speeds[name]) for name in ("base", "current"))
        gb_s = current_speed / (2 * num_rows) * BYTES_PER_WEIGHT[kind] if num_rows == 1 else None
        results.append((kind, num_rows, base_speed, current_speed, current_speed / base_speed, same, gb_s))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose kernels to compare against")
    parser.add_argument("--against", default=None, help="git revision to compare with (default: the working tree)")
    parser.add_argument("--kernels", default="bf16,int8,int4", help="comma-separated: bf16, int8, int4")
    parser.add_argument("--rows", default="1,4,16,64", help="comma-separated rows of X")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="hearth-ab-") as tmp:
        base = load_revision(args.base, Path(tmp) / "base")
        against = load_revision(args.against, Path(tmp) / "against") if args.against else current_native
        table = []
        for kind in args.kernels.split(","):
            if not all(hasattr(m, f"linear_{kind}") for m in (base, against)) or against.load_kernel(f"hearth_linear_{kind}") is None:
                print(f"{kind}: skipped (no native {kind} kernel on one side, or none runs here)")
                continue
            table += run_in_fresh_thread(compare, base, against, kind, rows, args.rounds)  # one OpenMP team (see README)
    print(f"\n| kernel | rows | {args.base} GFLOP/s | {args.against or 'working tree'} GFLOP/s | ratio | same bits |\n|---|---|---|---|---|---|")
    for kind, num_rows, base_speed, current_speed, ratio, same, gb_s in table:
        stream = f" ({gb_s:.1f} GB/s)" if gb_s else ""
        print(f"| {kind} | {num_rows} | {base_speed:.0f} | {current_speed:.0f}{stream} | {ratio:.2f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
