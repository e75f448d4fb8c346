"""Engine throughput on the `small` preset, side by side with transformers `generate()`.

    python bench/bench_engine.py                          # random small weights, bf16 + int8 + int4, HF at batch 1 and 16
    python bench/bench_engine.py --checkpoint weights/X   # a trained checkpoint instead
    python bench/bench_engine.py --dtypes bfloat16 --concurrency 1,16 --no-hf

What it measures, all in one process, one system after another:
- single-stream decode tok/s: one request, `--max-tokens` generated tokens after
  a short prompt; (tokens - 1) / decode time from the engine's usage record, the
  median of five requests;
- prefill tok/s: one request with a `--prefill-tokens` prompt (512, as llama-bench's pp512)
  and one output token; prompt tokens / prefill time from the usage record;
- aggregate tok/s and mean time to first token with C concurrent requests
  (distinct ~20-token prompts, `--max-tokens` each, ignore_eos), C in --concurrency;
- transformers LlamaForCausalLM.generate() on the same weights (exported with
  model.hf.export_hf), greedy, batch 1 and 16, same prompt and output lengths.

The machine is shared and noisy: compare rows of one run (ratios), and see the
load average printed with the table. Not a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from server.engine.engine import run_in_fresh_thread  # noqa: E402

CORPUS = Path("/work/shared/corpus/shakespeare.txt.gz")
QUANTIZED = {"int8": ("int8", None), "int4": ("int4", 32)}  # --dtypes name -> (method, group size)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a bf16/fp32 checkpoint folder (default: random `small` weights)")
    parser.add_argument("--dtypes", default="bfloat16,int8,int4",
                        help="comma-separated: bfloat16, float32, int8, int4 (group 32); a -pytorch suffix "
                             "(bfloat16-pytorch, int8-pytorch) runs PyTorch's kernels instead of model/native.py's, "
                             "a -modules suffix the native kernels from Python modules, a call each, instead of "
                             "all the layers of a step in one native call")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=16, help="prompt length in words (~20 tokens)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill row (llama.cpp's pp512)")
    parser.add_argument("--hf-batches", default="1,16", help="transformers generate() batch sizes")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


# ----------------------------------------------------------------------------- setup


def build_random_small(folder: Path) -> Path:
    """`small` preset with random weights (seed 0) and a 32000-token BPE trained on Shakespeare."""
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.decoder import Transformer
    from model.tokenizer import Tokenizer

    if CORPUS.is_file():
        with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines(keepends=True)
    else:  # no shared corpus: the test fixtures (a smaller vocabulary is learnt; the model stays 32000 wide)
        fixtures = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
        lines = (fixtures / "shakespeare_sample.txt").read_text().splitlines(keepends=True)
    tokenizer = Tokenizer.train(iter(lines), vocab_size=32000)
    config = ModelConfig.from_preset("small", vocab_size=32000)
    model = Transformer(config).init_weights(seed=0).to(torch.bfloat16)
    return save_checkpoint(folder / "small-bf16", model, tokenizer)


def make_prompts(tokenizer, count: int, words: int) -> list[list[int]]:
    text = ("Now is the winter of our discontent made glorious summer by this sun of York and all the clouds "
            "that lowered upon our house in the deep bosom of the ocean buried").split()
    return [tokenizer.encode(" ".join((text * 4)[i % len(text):i % len(text) + words]), add_bos=True) for i in range(count)]


# ----------------------------------------------------------------------------- engine


async def run_request(engine, request_id: str, prompt: list[int], max_tokens: int):
    from server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start, first, tokens, usage = time.perf_counter(), None, 0, None
    async for output in engine.generate(GenerationRequest(request_id, prompt, params)):
        if first is None:
            first = time.perf_counter()
        tokens += sum(len(delta.token_ids) for delta in output.deltas)
        usage = output.usage or usage
    return tokens, first - start, usage


async def run_concurrent(engine, prompts: list[list[int]], max_tokens: int, tag: str):
    start = time.perf_counter()
    results = await asyncio.gather(*(run_request(engine, f"{tag}-{i}", p, max_tokens) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    total = sum(tokens for tokens, _, _ in results)
    ttft = sum(ttft for _, ttft, _ in results) / len(results)
    return total / wall, ttft


@contextlib.contextmanager
def native_kernels(enabled: bool):
    """Build an engine with or without the native bf16 kernel (model/native.py)."""
    from model import native

    saved = os.environ.get("HEARTH_NATIVE_KERNELS")
    os.environ["HEARTH_NATIVE_KERNELS"] = "1" if enabled else "0"
    native.forget_kernels()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HEARTH_NATIVE_KERNELS"]
        else:
            os.environ["HEARTH_NATIVE_KERNELS"] = saved
        native.forget_kernels()


def bench_engine(path: Path, dtype_name: str, concurrency: list[int], args, tokenizer_out: list) -> list[dict]:
    from server.engine import Engine, EngineConfig

    engine_dtype = "float32" if dtype_name == "float32" else "auto"  # auto: what the native path computes in
    load_start = time.perf_counter()
    with native_kernels(not dtype_name.endswith("-pytorch")):
        engine = Engine.from_checkpoint(path, EngineConfig(dtype=engine_dtype, max_num_seqs=max(concurrency)))
    if dtype_name.endswith("-modules"):
        engine.worker.native_decoder = None  # server/engine/cpu_fast.py's FusedBlocks run the layers
    load_seconds = time.perf_counter() - load_start
    engine.start()
    tokenizer_out.append(engine.tokenizer)
    rows = []
    try:
        prompts = make_prompts(engine.tokenizer, max(concurrency), args.prompt_words)
        asyncio.run(run_concurrent(engine, prompts[:2], 8, "warmup"))
        singles = []
        for attempt in range(5):  # the median of five: the first run on fresh KV blocks is often slower, and
            # this shared machine's speed moves between requests
            tokens, _, usage = asyncio.run(run_request(engine, f"single-{attempt}", prompts[0], args.max_tokens))
            singles.append(((tokens - 1) / usage.decode_time, usage))
        single, usage = sorted(singles, key=lambda pair: pair[0])[len(singles) // 2]
        rows.append(dict(system=f"hearth engine {dtype_name}", what="single-stream decode", tok_s=single,
                         ttft=usage.queue_time + usage.prefill_time, note=f"load {load_seconds:.1f}s"))
        print(f"  {dtype_name}: single-stream decode {single:.1f} tok/s", flush=True)
        prefill_tokens = min(args.prefill_tokens, engine.max_seq_len - 1)  # room for the one output token
        long_prompt = (prompts[0] * (prefill_tokens // len(prompts[0]) + 1))[:prefill_tokens]
        _, _, usage = asyncio.run(run_request(engine, "prefill", long_prompt, 1))
        prefill = len(long_prompt) / usage.prefill_time  # one request alone: the prompt is its only work
        rows.append(dict(system=f"hearth engine {dtype_name}", what=f"prefill, {len(long_prompt)}-token prompt",
                         tok_s=prefill, ttft=usage.queue_time + usage.prefill_time))
        print(f"  {dtype_name}: prefill {prefill:.1f} tok/s ({len(long_prompt)} tokens)", flush=True)
        for count in concurrency:
            aggregate, ttft = asyncio.run(run_concurrent(engine, prompts[:count], args.max_tokens, f"c{count}"))
            rows.append(dict(system=f"hearth engine {dtype_name}", what=f"{count} concurrent", tok_s=aggregate, ttft=ttft))
            print(f"  {dtype_name}: {count:3d} concurrent: {aggregate:.1f} tok/s aggregate, TTFT {ttft * 1e3:.0f} ms", flush=True)
    finally:
        engine.shutdown()
    return rows


# ----------------------------------------------------------------------------- transformers


def bench_transformers(path: Path, folder: Path, batches: list[int], args, tokenizer) -> list[dict]:
    from transformers import LlamaForCausalLM

    from model.hf import export_hf

    hf_dir = export_hf(path, folder / "hf-bf16", dtype="bfloat16", overwrite=True)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    rows = []
    for batch in batches:
        prompts = make_prompts(tokenizer, batch, args.prompt_words)
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=args.max_tokens,
                      min_new_tokens=args.max_tokens, pad_token_id=pad)
        with torch.inference_mode():
            model.generate(ids[:, :width], attention_mask=mask, do_sample=False, max_new_tokens=4, pad_token_id=pad)
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            wall = time.perf_counter() - start
        generated = (out.shape[1] - width) * batch
        rows.append(dict(system="transformers bf16 generate()", what=f"batch {batch}", tok_s=generated / wall, ttft=None))
        print(f"  transformers bf16 batch {batch}: {generated / wall:.1f} tok/s", flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from model import native

    flags = [flag for flag in ("avx512_bf16", "avx512f", "avx2", "asimd") if flag in native_cpu_flags()]
    return (f"{name} ({', '.join(flags) or 'no AVX2/AVX-512/NEON'}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, native path {native.isa_name()}")


def native_cpu_flags() -> set[str]:
    from model import native

    try:
        return native.cpu_flags()
    except native.NativeUnavailable:
        return set()


def print_table(rows: list[dict]) -> None:
    print("\n| system | measurement | tok/s | TTFT ms |")
    print("|---|---|---|---|")
    for row in rows:
        ttft = f"{row['ttft'] * 1e3:.0f}" if row.get("ttft") is not None else ""
        print(f"| {row['system']} | {row['what']} | {row['tok_s']:.1f} | {ttft} |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hearth-bench-") as tmp:
        folder = Path(tmp)
        if args.checkpoint:
            source = Path(args.checkpoint)
        else:
            print("building random `small` weights and a 32000-token tokenizer...", flush=True)
            source = run_in_fresh_thread(build_random_small, folder)  # main thread: no OpenMP team (see it)
        tokenizers: list = []
        for dtype_name in dtypes:
            path = source
            method = dtype_name.removesuffix("-pytorch").removesuffix("-modules")
            if method in QUANTIZED:
                from model.quant import quantize_checkpoint

                path = folder / f"small-{method}"
                if not path.exists():
                    run_in_fresh_thread(quantize_checkpoint, source, path, *QUANTIZED[method])
            rows += bench_engine(path, dtype_name, concurrency, args, tokenizers)
        if not args.no_hf:
            from model.checkpoint import load_checkpoint

            tokenizer = tokenizers[0] if tokenizers else load_checkpoint(source).tokenizer
            rows += bench_transformers(source, folder, [int(b) for b in args.hf_batches.split(",")], args, tokenizer)
    print_table(rows)
    print(f"\n{machine()}; load average at the end {os.getloadavg()[0]:.1f}; "
          f"{args.max_tokens} new tokens per request, ~{args.prompt_words}-word prompts, greedy, ignore_eos")


if __name__ == "__main__":
    main()
