"""Constrained decoding cost: 16 concurrent json_schema requests vs 16 unconstrained, and schema compile times.

    python bench/bench_structured.py                          # random `small` weights (bf16), 16 x 64 tokens
    python bench/bench_structured.py --checkpoint weights/X --concurrency 16 --max-tokens 64 --rounds 3

What it measures, in one process:
- aggregate decode tok/s of C concurrent requests (distinct prompts, seeded temperature 1, `--max-tokens`
  each), unconstrained (ignore_eos) and constrained by a JSON schema that cannot finish within max_tokens
  (an array of at least 1000 objects), so both generate exactly the same number of tokens; rounds
  alternate which goes first; the median per side is reported with the ratio;
- the sampler alone (no model): ms per step of `sample_batch` for C rows of random logits, with and
  without the grammar, alternating, medians: the mask's own cost, far less noisy than the end-to-end rows;
- the llguidance tokenizer build (once per model), a schema's compile time cold (first time) and cached
  (the same schema again: a hash lookup), the mean of many.

The machine is shared and noisy: compare the rows of one run, and see the load average printed with them.
Not a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import build_random_small, machine, make_prompts  # noqa: E402
from server.engine.engine import Engine, EngineConfig, run_in_fresh_thread  # noqa: E402
from server.engine.grammar import GrammarCompiler, GrammarSpec  # noqa: E402
from server.engine.types import GenerationRequest, SamplingParams  # noqa: E402

ITEM = {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "tags": {
    "type": "array", "items": {"enum": ["a", "b", "c"]}}}, "required": ["id", "name", "tags"]}
ENDLESS = {"type": "array", "items": ITEM, "minItems": 1000}  # never completes within max_tokens: same token count
TYPICAL = {"$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                 "required": ["street", "zip"]}},
           "type": "object", "properties": {
               "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
               "email": {"type": "string", "format": "email"}, "home": {"$ref": "#/$defs/address"},
               "work": {"anyOf": [{"$ref": "#/$defs/address"}, {"type": "null"}]},
               "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5}},
           "required": ["name", "age", "home"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: random `small` weights)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (unconstrained, constrained), order alternating")
    parser.add_argument("--sampler-only", action="store_true", help="skip the end-to-end rows (the model)")
    return parser.parse_args()


async def one(engine, request_id: str, prompt: list[int], params: SamplingParams) -> int:
    tokens = 0
    async for output in engine.generate(GenerationRequest(request_id, prompt, params)):
        tokens += sum(len(delta.token_ids) for delta in output.deltas)
    return tokens


async def concurrent_tok_s(engine, prompts, max_tokens: int, grammar, tag: str) -> float:
    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=grammar is None, grammar=grammar)

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(engine, f"{tag}-{i}", p, params(i)) for i, p in enumerate(prompts)))
    return sum(counts) / (time.perf_counter() - start)


def sampler_ms(engine, grammar, rows: int, steps: int = 64) -> float:
    """Median ms per `sample_batch` step over rows sequences (seeded, temperature 1) on random logits."""
    import torch

    from server.engine.sampling import SequenceSampler, sample_batch

    vocab = engine.model_config.vocab_size
    samplers = [SequenceSampler(SamplingParams(max_tokens=steps, temperature=1.0, seed=i, grammar=grammar), [1], vocab, 0)
                for i in range(rows)]
    generator, times = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        logits = torch.randn(rows, vocab, generator=generator)
        start = time.perf_counter()
        results = sample_batch(logits, samplers)
        times.append(time.perf_counter() - start)
        for sampler, result in zip(samplers, results):
            sampler.append(result.token_id)
    return statistics.median(times) * 1e3


def compile_times(engine) -> dict[str, float]:
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size)
    start = time.perf_counter()
    compiler.llg_tokenizer()
    tokenizer_s = time.perf_counter() - start
    colds, cached = [], []
    for index in range(20):  # distinct schemas (a different maxLength each): every one compiles cold
        schema = {**TYPICAL, "properties": {**TYPICAL["properties"], "name": {"type": "string", "maxLength": 40 + index}}}
        spec = GrammarSpec.json_schema(schema, "bench")
        start = time.perf_counter()
        compiler.compile(spec)
        colds.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(50):
            compiler.compile(spec)
        cached.append((time.perf_counter() - start) / 50)
    return {"tokenizer": tokenizer_s, "cold": statistics.median(colds), "cached": statistics.median(cached)}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.checkpoint) if args.checkpoint else run_in_fresh_thread(build_random_small, Path(folder))
        engine = Engine.from_checkpoint(path, EngineConfig(dtype="bfloat16", max_num_seqs=max(16, args.concurrency)))
        engine.start()
        try:
            prompts = make_prompts(engine.tokenizer, args.concurrency, 20)
            grammar = engine.grammars.compile(GrammarSpec.json_schema(ENDLESS, "bench"))
            if not args.sampler_only:
                asyncio.run(concurrent_tok_s(engine, prompts[:2], 4, None, "warm"))
            rates: dict[str, list[float]] = {"unconstrained": [float("nan")], "json_schema": [float("nan")]}
            for round_index in range(0 if args.sampler_only else args.rounds):
                if round_index == 0:
                    rates = {"unconstrained": [], "json_schema": []}
                order = [("unconstrained", None), ("json_schema", grammar)]
                for name, each in order if round_index % 2 == 0 else order[::-1]:
                    rates[name].append(asyncio.run(concurrent_tok_s(engine, prompts, args.max_tokens, each, f"{name}-{round_index}")))
            times = compile_times(engine)
            sampling = {"unconstrained": [], "json_schema": []}
            for _ in range(3):
                for name, each in (("unconstrained", None), ("json_schema", grammar)):
                    sampling[name].append(run_in_fresh_thread(sampler_ms, engine, each, args.concurrency))
        finally:
            engine.shutdown()
    plain, constrained = (statistics.median(rates[k]) for k in ("unconstrained", "json_schema"))
    print(f"\n{machine()}; load average {os.getloadavg()[0]:.2f}")
    if not args.sampler_only:
        print(f"{args.concurrency} concurrent x {args.max_tokens} tokens, {args.rounds} rounds (medians)")
        print("| requests | tok/s |\n|---|---|")
        print(f"| unconstrained | {plain:.1f} |\n| json_schema | {constrained:.1f} ({constrained / plain:.2f}x) |")
    plain_ms, constrained_ms = (statistics.median(sampling[k]) for k in ("unconstrained", "json_schema"))
    print(f"sampler alone, {args.concurrency} rows x {engine.model_config.vocab_size} vocab: {plain_ms:.1f} ms/step unconstrained, "
          f"{constrained_ms:.1f} ms/step json_schema")
    print(f"llguidance tokenizer build: {times['tokenizer'] * 1e3:.0f} ms (once per model); schema compile: "
          f"cold {times['cold'] * 1e3:.1f} ms, cached {times['cached'] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
