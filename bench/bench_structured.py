"""Constrained decoding cost: 16 concurrent json_schema requests vs 16 unconstrained, and schema compile times.

    python bench/bench_structured.py                          # random `small` weights (bf16), 16 x 64 tokens
    python bench/bench_structured.py --checkpoint weights/X --concurrency 16 --max-tokens 64 --rounds 3

What it measures, in one process:
- aggregate decode tok/s of C concurrent requests (distinct prompts, seeded temperature 1, `--max-tokens`
  each), unconstrained (ignore_eos) and constrained by a JSON schema that cannot finish within max_tokens
  (an array of at least 1000 objects), so both generate exactly the same number of tokens; rounds
  alternate which goes first; the median per side is reported with the ratio;
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
            asyncio.run(concurrent_tok_s(engine, prompts[:2], 4, None, "warm"))
            rates: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
            for round_index in range(args.rounds):
                order = [("unconstrained", None), ("json_schema", grammar)]
                for name, each in order if round_index % 2 == 0 else order[::-1]:
                    rates[name].append(asyncio.run(concurrent_tok_s(engine, prompts, args.max_tokens, each, f"{name}-{round_index}")))
            times = compile_times(engine)
        finally:
            engine.shutdown()
    plain, constrained = (statistics.median(rates[k]) for k in ("unconstrained", "json_schema"))
    print(f"\n{machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.concurrency} concurrent x {args.max_tokens} tokens, {args.rounds} rounds (medians)")
    print("| requests | tok/s |\n|---|---|")
    print(f"| unconstrained | {plain:.1f} |\n| json_schema | {constrained:.1f} ({constrained / plain:.2f}x) |")
    print(f"llguidance tokenizer build: {times['tokenizer'] * 1e3:.0f} ms (once per model); schema compile: "
          f"cold {times['cold'] * 1e3:.1f} ms, cached {times['cached'] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
