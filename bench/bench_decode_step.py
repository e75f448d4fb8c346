"""Where a decode step goes, and how fast the CPU matmul kernels stream cold weights.

    python bench/bench_decode_step.py                 # `small` shape, random weights, bf16 and int8
    python bench/bench_decode_step.py --part kernels  # only the kernel streaming table

Two measurements behind README's Engine section:
- kernels: each CPU matmul the engine can use (Hearth's native bf16 and int8 kernels where they
  run, oneDNN packed bf16, `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), one row of activations, over 12 layers of `small`'s q/k/v, o, gate/up
  and down weights, so every call reads weights that are not in cache (12 layers of bf16 are 227 MB,
  the L3 is 32 MB); GB/s = weight bytes / time. Beside them, a plain `sum` over 1.6 GB (on 4 KB pages and
  on 2 MB ones, as the packed weights get where the OS allows): the read
  bandwidth the GEMVs could have.
- step: the engine's worker driven directly (no HTTP, no asyncio) for one sequence decoding, on a
  thread of its own as the engine runs it: time per step in the decoder body, the LM head and
  sampling, with the layers run in one native call (server/engine/cpu_fast.NativeDecoder) and as
  FusedBlock modules, alternated; then the modules with every packed bf16 linear replaced by an
  empty output of its shape, which leaves the rest of the body (norms, rotary, paged attention).
  `--quantize int8` (or int4) does the same for the int8 per-channel (int4 g32) model.

More parts, on demand: `--part batched` gives the native kernels' GFLOP/s at 1-64 rows, on the 12
cold layers and on one layer's weights used 12 times (in L3); `--part attention` times the native paged attention alone (decode rows over
cached keys), `--part calls` the fixed Python cost of a native call and of nn.Module.__call__.

Not a test; nothing asserts. Rows of one run compare; this shared machine varies by up to 20%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from server.engine.engine import run_in_fresh_thread  # noqa: E402

LAYER_SHAPES = {"qkv": (2304, 768), "o": (768, 768), "gate_up": (6144, 768), "down": (768, 3072)}  # `small`
NUM_LAYERS = 12


def cold_gemv_matmuls(kind: str, out_features: int, in_features: int):
    """One layer's matmul of `kind`: x [1, in] bf16 -> [1, out]; random weights (speed only)."""
    from model import native

    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    if kind == "bf16 native (model/native.py)":
        tiles = native.pack_bf16_weight(weight)
        return lambda x: native.linear_bf16(x, tiles, out_features)
    if kind == "int8 native (model/native.py)":
        packed = native.pack_int8_weight(torch.randint(-127, 128, weight.shape, dtype=torch.int8), torch.rand(out_features))
        return lambda x: native.linear_int8(x, packed, out_features)
    if kind == "int4 g32 native (model/native.py)":
        codes = torch.randint(0, 16, weight.shape, dtype=torch.uint8)
        scales = torch.rand(out_features, in_features // 32, dtype=torch.bfloat16)
        packed = native.pack_int4_weight(codes, scales, scales)
        return lambda x: native.linear_int4(x, packed, out_features, 32)
    if kind == "bf16 packed (oneDNN)":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if kind == "int8 (_weight_int8pack_mm)":
        codes, scales = torch.randint(-127, 128, weight.shape, dtype=torch.int8), torch.rand(out_features, dtype=torch.bfloat16)
        return lambda x: torch._weight_int8pack_mm(x, codes, scales)
    codes = torch.randint(0, 16, weight.shape, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_and_zeros = torch.rand(in_features // 32, out_features, 2, dtype=torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)


def time_per_call(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def batched_rows(row_counts=(1, 4, 16, 64)) -> list[tuple[str, list[float]]]:
    """(kernel and weights, GFLOP/s at each row count): the 12 cold layers, and one layer's weights
    used 12 times (19 MB in bf16: in L3), which tells memory-bound from compute-bound."""
    from model import native

    kinds = ["int4 g32 (_weight_int4pack_mm_for_cpu)"]
    if None not in (native.linear_bf16_kernel(), native.linear_int8_kernel(), native.linear_int4_kernel()):
        kinds = ["bf16 native (model/native.py)", "int8 native (model/native.py)", "int4 g32 native (model/native.py)", *kinds]
    flops_per_row = 2 * NUM_LAYERS * sum(o * i for o, i in LAYER_SHAPES.values())
    rows = []
    for kind in kinds:
        cold = [[cold_gemv_matmuls(kind, *shape) for shape in LAYER_SHAPES.values()] for _ in range(NUM_LAYERS)]
        for weights, layers in (("12 cold layers", cold), ("one layer 12 times", [cold[0]] * NUM_LAYERS)):
            speeds = []
            for num_rows in row_counts:
                inputs = [torch.randn(num_rows, shape[1], dtype=torch.bfloat16) for shape in LAYER_SHAPES.values()]

                def all_layers() -> None:
                    for layer in layers:
                        for matmul, x in zip(layer, inputs):
                            matmul(x)

                speeds.append(flops_per_row * num_rows / time_per_call(all_layers, max(3, 40 // num_rows)) / 1e9)
            rows.append((f"{kind}, {weights}", speeds))
    return rows


def kernel_rows() -> list[tuple[str, float, float]]:
    """(kernel, ms per 12 layers, GB/s of weights)."""
    rows = []
    from model import native

    kinds = [("bf16 packed (oneDNN)", 2), ("int8 (_weight_int8pack_mm)", 1), ("int4 g32 (_weight_int4pack_mm_for_cpu)", 0.625)]
    if None not in (native.linear_bf16_kernel(), native.linear_int8_kernel(), native.linear_int4_kernel()):
        kinds[1:1] = [("bf16 native (model/native.py)", 2)]
        kinds[3:3] = [("int8 native (model/native.py)", 1)]
        kinds.append(("int4 g32 native (model/native.py)", 0.625))  # 4 bits and a bf16 scale and zero per 32
    for kind, bytes_per_weight in kinds:
        layers = [{name: cold_gemv_matmuls(kind, *shape) for name, shape in LAYER_SHAPES.items()} for _ in range(NUM_LAYERS)]
        inputs = {name: torch.randn(1, shape[1], dtype=torch.bfloat16) for name, shape in LAYER_SHAPES.items()}

        def all_layers() -> None:
            for layer in layers:
                for name, matmul in layer.items():
                    matmul(inputs[name])

        seconds = time_per_call(all_layers, 30)
        weight_bytes = NUM_LAYERS * sum(o * i for o, i in LAYER_SHAPES.values()) * bytes_per_weight
        rows.append((kind, seconds * 1e3, weight_bytes / seconds / 1e9))
    big = torch.ones(400_000_000, dtype=torch.float32)
    huge = native.on_huge_pages(big)  # where the OS gives 2 MB pages (the packed weights' memory)
    for name, tensor in (("sum over 1.6 GB", big), ("sum over 1.6 GB on 2 MB pages", huge)):
        seconds = time_per_call(tensor.sum, 3)
        rows.append((f"read bandwidth: {name}", seconds * 1e3, big.numel() * 4 / seconds / 1e9))
    return rows


def attention_rows() -> list[tuple[str, float]]:
    """(case, ms for 12 layers) of the native paged attention: `small`'s 12 heads of 64, blocks of 16."""
    from model import native

    heads, head_dim, block_size, rows = 12, 64, 16, []
    for num_keys, num_seqs in ((100, 1), (1500, 1), (100, 16), (500, 16)):
        blocks_per_seq = -(-num_keys // block_size)
        cache_blocks = num_seqs * blocks_per_seq + 1  # block 0: the null block
        keys = torch.randn(heads, cache_blocks * block_size, head_dim, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        block_ids = torch.arange(1, cache_blocks, dtype=torch.int32)  # sequence s owns the s-th run of blocks
        offsets = torch.arange(num_seqs, dtype=torch.int64) * blocks_per_seq
        positions = torch.full((num_seqs,), num_keys - 1, dtype=torch.int32)
        q = torch.randn(num_seqs, heads, head_dim, dtype=torch.bfloat16)
        seconds = time_per_call(lambda: native.paged_attention(q, keys, values, block_ids, offsets, positions,
                                                               block_size, head_dim ** -0.5), 50)
        rows.append((f"{num_seqs} decode row(s) over {num_keys} keys", seconds * 12e3))
    return rows


def call_rows() -> list[tuple[str, float]]:
    """(call, us): the fixed cost of the Python around a tiny native matmul, and of nn.Module.__call__."""
    from model import native
    from server.engine.cpu_fast import PackedLinear

    layer = PackedLinear(torch.nn.Linear(64, 8, bias=False).to(torch.bfloat16))
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    kernel, out = native.linear_bf16_kernel(), torch.empty(1, 8, dtype=torch.bfloat16)
    weight_pointer = layer.packed_weight.data_ptr()
    calls = [("native linear, the C call alone (8 x 64)",
              lambda: kernel(x.data_ptr(), 64, weight_pointer, out.data_ptr(), 8, 1, 8, 64, torch.get_num_threads())),
             ("native linear through model/native.py", lambda: native.linear_bf16(x, layer.packed_weight, 8)),
             ("the same module, layer.forward(x)", lambda: layer.forward(x)),
             ("the same module, layer(x) (nn.Module.__call__)", lambda: layer(x))]
    return [(name, time_per_call(fn, 20000) * 1e6) for name, fn in calls]


def step_rows(checkpoint: Path, steps: int, rounds: int = 3) -> list[tuple[str, float]]:
    """(part of a single-stream decode step, ms): the layers in one native call and as FusedBlock
    modules, alternated over `rounds` (medians), then the modules with their linears emptied."""
    from server.engine import Engine, EngineConfig
    from server.engine import cpu_fast, worker as worker_module

    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_num_seqs=4, enable_prefix_caching=False))
    worker, timings = engine.worker, {}
    native_decoder = worker.native_decoder

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
            return result
        return wrapper

    worker._hidden_states = timed("decoder body", worker._hidden_states)
    engine.model.lm_head.forward = timed("LM head", engine.model.lm_head.forward)
    real_sample_batch = worker_module.sample_batch
    worker_module.sample_batch = timed("sampling", real_sample_batch)
    modes = [("modules", None)] + ([("one native call", native_decoder)] if native_decoder is not None else [])
    samples: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for mode, decoder in modes:
                worker.native_decoder = decoder
                total = run_in_fresh_thread(decode_steps, engine, steps, timings)
                parts = {"whole step (scheduler + worker)": total,
                         **{name: timings[name] / steps * 1e3 for name in ("decoder body", "LM head", "sampling")}}
                for name, ms in parts.items():
                    samples.setdefault(f"{name}, layers as {mode}", []).append(ms)
        worker.native_decoder = None
        linear_classes = (cpu_fast.PackedLinear, cpu_fast.PackedInt8Linear, cpu_fast.PackedInt4Linear)
        real_forwards = [cls.forward for cls in linear_classes]
        for cls in linear_classes:
            cls.forward = lambda self, x: x.new_zeros(*x.shape[:-1], self.out_features)
        try:
            run_in_fresh_thread(decode_steps, engine, steps, timings)
            samples["decoder body, layers as modules, packed linears replaced by empty outputs"] = [
                timings["decoder body"] / steps * 1e3]
        finally:
            for cls, forward in zip(linear_classes, real_forwards):
                cls.forward = forward
    finally:
        worker_module.sample_batch = real_sample_batch
        worker.native_decoder = native_decoder
    return [(name, sorted(values)[len(values) // 2]) for name, values in samples.items()]


def decode_steps(engine, steps: int, timings: dict[str, float]) -> float:
    """One greedy sequence through scheduler + worker for 8 warm-up steps, then `steps` timed; ms per step."""
    from server.engine.sampling import SequenceSampler
    from server.engine.scheduler import Sequence
    from server.engine.types import SamplingParams

    prompt = engine.tokenizer.encode("Now is the winter of our discontent made glorious summer by this sun", add_bos=True)
    params = SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True)
    sampler = SequenceSampler(params, prompt, engine.model.config.vocab_size, 0)
    engine.scheduler.add_sequence(Sequence("bench", list(prompt), len(prompt), params, frozenset(), sampler=sampler))

    def step() -> None:
        output = engine.scheduler.schedule()
        results = engine.worker.execute(output)
        engine.scheduler.update_from_output(output, {seq: [s.token_id for s in samples] for seq, samples in results.items()})

    for _ in range(8):
        step()
    timings.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    engine.scheduler.abort_request("bench")
    return elapsed / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("both", "kernels", "batched", "step", "attention", "calls"), default="both",
                        help="both: kernels and step; attention and calls need the native kernels")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint (default: random `small`)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="step: quantize the checkpoint first (int8 per channel, int4 in groups of 32)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.part in ("both", "kernels"):
        rows = run_in_fresh_thread(kernel_rows)
        print("\n| kernel, 12 layers of `small`, 1 row | ms | GB/s |\n|---|---|---|")
        for kind, ms, gb_s in rows:
            print(f"| {kind} | {ms:.2f} | {gb_s:.1f} |")
    if args.part == "batched":
        rows = run_in_fresh_thread(batched_rows)
        print("\n| kernel, `small` shapes | 1 row | 4 rows | 16 rows | 64 rows (GFLOP/s) |\n|---|---|---|---|---|")
        for kind, speeds in rows:
            print(f"| {kind} | " + " | ".join(f"{speed:.0f}" for speed in speeds) + " |")
    if args.part == "attention":
        rows = run_in_fresh_thread(attention_rows)
        print("\n| native paged attention, `small` heads | ms for 12 layers |\n|---|---|")
        for case, ms in rows:
            print(f"| {case} | {ms:.2f} |")
    if args.part == "calls":
        rows = run_in_fresh_thread(call_rows)
        print("\n| call | us |\n|---|---|")
        for name, us in rows:
            print(f"| {name} | {us:.2f} |")
    if args.part in ("both", "step"):
        import tempfile

        from bench_engine import build_random_small

        with tempfile.TemporaryDirectory(prefix="hearth-step-") as tmp:
            checkpoint = args.checkpoint or run_in_fresh_thread(build_random_small, Path(tmp))
            if args.quantize:
                from model.quant import quantize_checkpoint

                group_size = 32 if args.quantize == "int4" else None
                checkpoint = run_in_fresh_thread(quantize_checkpoint, checkpoint, Path(tmp) / args.quantize,
                                                 args.quantize, group_size).out
            rows = step_rows(checkpoint, args.steps)
        print(f"\n| single-stream {args.quantize or 'bf16'} decode step (median of 3) | ms |\n|---|---|")
        for name, ms in rows:
            print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
