"""LoRA adapters per request: aggregate decode tok/s of 16 requests over 4 adapters vs 16 on the base.

    python bench/bench_lora_serving.py                      # random `small` bf16 weights, 4 rank-16 adapters
    python bench/bench_lora_serving.py --preset mini --rank 8 --rounds 5

What it measures, in one process and one engine (dtype auto: the native path where the CPU has it):
- `base`: C concurrent requests (distinct ~20-token prompts, --max-tokens each, ignore_eos) on the base;
- `4 adapters`: the same C requests spread round-robin over 4 adapters (random A and B on all seven
  targets, Hearth format, loaded through server/engine/lora.py);
- `half base`: half of them on the base, half over the adapters.
Rounds alternate base / adapters / half, and the table shows each one's median and its ratio to the
base's, then the ratio within each round (neighbours in time: on a shared machine, the steadier figure).
Where the native kernels run, every step is one native decoder call, adapter rows' deltas added in
it (csrc/lora_delta.c); elsewhere steps with adapter rows run the per-layer path and PyTorch deltas.
The machine is shared and noisy: compare rows of one run, and read the median of the per-round
ratios (neighbours in time) as the headline. Not a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a bf16/fp32 checkpoint folder (default: random weights of --preset)")
    parser.add_argument("--preset", default="small", help="model preset for random weights (small, mini, tiny)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    return parser.parse_args()


def build_random(folder: Path, preset: str) -> Path:
    """Random bf16 weights of `preset` (the serving dtype), with bench_engine's tokenizer for `small`."""
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.decoder import Transformer

    if preset == "small":
        from bench_engine import build_random_small

        return build_random_small(folder)
    from model.tokenizer import Tokenizer

    text = (Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "shakespeare_sample.txt").read_text()
    tokenizer = Tokenizer.train(iter(text.splitlines(keepends=True)), vocab_size=2048)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size)).init_weights(seed=0)
    return save_checkpoint(folder / f"{preset}-bf16", model.to(torch.bfloat16), tokenizer)


def make_adapter(base: Path, out: Path, rank: int, seed: int) -> Path:
    from model.checkpoint import load_checkpoint
    from trainer.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

    checkpoint = load_checkpoint(base)
    config = LoRAConfig(rank=rank, alpha=2.0 * rank)
    apply_lora(checkpoint.model, config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(checkpoint.model).values():
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=generator) * 0.01)
    return save_adapter(out, checkpoint.model, config, base, checkpoint.metadata)


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    words = ("Now is the winter of our discontent made glorious summer by this sun of York and all the clouds "
             "that lowered upon our house in the deep bosom of the ocean buried").split() * 4
    return [tokenizer.encode(" ".join(words[i:i + 16]), add_bos=True) for i in range(count)]


async def run_request(engine, request_id: str, prompt: list[int], max_tokens: int, lora: str | None) -> int:
    from server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    tokens = 0
    async for output in engine.generate(GenerationRequest(request_id, prompt, params, lora=lora)):
        tokens += sum(len(delta.token_ids) for delta in output.deltas)
    return tokens


async def run_concurrent(engine, prompts, loras, max_tokens: int, tag: str) -> float:
    start = time.perf_counter()
    counts = await asyncio.gather(*(run_request(engine, f"{tag}-{i}", p, max_tokens, lora)
                                    for i, (p, lora) in enumerate(zip(prompts, loras))))
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    from model.checkpoint import read_metadata
    from server.engine import Engine, EngineConfig
    from server.engine.engine import run_in_fresh_thread
    from server.engine.lora import read_serving_adapter

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = Path(args.checkpoint) if args.checkpoint else run_in_fresh_thread(build_random, folder, args.preset)
        names = [f"adapter{i}" for i in range(args.adapters)]
        dirs = [run_in_fresh_thread(make_adapter, base, folder / name, args.rank, i + 1) for i, name in enumerate(names)]
        engine = Engine.from_checkpoint(base, EngineConfig(dtype="auto", max_num_seqs=args.concurrency))
        for name, adapter_dir in zip(names, dirs):
            adapter = run_in_fresh_thread(read_serving_adapter, name, adapter_dir, engine.model_config, base,
                                          read_metadata(base), 64)
            engine.add_lora(adapter)
        engine.start()
        try:
            results = measure(engine, names, args)
        finally:
            engine.shutdown()
    report(results, engine, args)


def measure(engine, names: list[str], args) -> dict[str, list[float]]:
    count = args.concurrency
    prompts = make_prompts(engine.tokenizer, count)
    mixes = {"base": [None] * count,
             f"{len(names)} adapters": [names[i % len(names)] for i in range(count)],
             "half base": [None if i % 2 else names[(i // 2) % len(names)] for i in range(count)]}
    asyncio.run(run_concurrent(engine, prompts, mixes[f"{len(names)} adapters"], 8, "warmup"))
    results: dict[str, list[float]] = {mix: [] for mix in mixes}
    for round_index in range(args.rounds):
        for mix, loras in mixes.items():
            tok_s = asyncio.run(run_concurrent(engine, prompts, loras, args.max_tokens, f"r{round_index}-{mix}"))
            results[mix].append(tok_s)
            print(f"  round {round_index + 1}: {mix:>12}: {tok_s:.1f} tok/s", flush=True)
    return results


def report(results: dict[str, list[float]], engine, args) -> None:
    base = statistics.median(results["base"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\n{cpu}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"engine {engine.compute()}; {args.concurrency} concurrent, {args.max_tokens} tokens each, "
          f"rank {args.rank}, median of {args.rounds} rounds")
    print("| requests | tok/s | vs base | vs base, median of rounds | vs base, round by round |\n|---|---|---|---|---|")
    for mix, values in results.items():
        median = statistics.median(values)
        ratios = [value / base_value for value, base_value in zip(values, results["base"])]
        rounds = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"| {mix} | {median:.1f} | {median / base:.2f}x | {statistics.median(ratios):.2f}x | {rounds} |")


if __name__ == "__main__":
    main()
