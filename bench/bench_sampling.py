"""Per-step cost of `sample_batch` (server/engine/sampling.py) against the reference sampler.

    python bench/bench_sampling.py --rows 64 --vocab 32000

For each setting, all rows share it (a batch of `--rows` sequences), and the same logits go
through:
- `sample_batch` (what the engine runs once per decode step);
- the reference `model.generate.sample_token`, one row at a time (what a per-request loop costs);
- one `torch.softmax` over the batch: the floor of any sampler that looks at every logit.

Logits are synthetic: by default Zipf-like like a language model's (probability ~ rank^-1.5 in
a random order, so top-p 0.9 keeps about 60 tokens); `--zipf 0` gives Gaussian logits of std
`--scale` instead, a flatter worst case for top-p. Minimum over `--repeats` runs: the machine
is shared and noisy, compare within one run. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.generate import GenerationSettings, sample_token  # noqa: E402
from server.engine.sampling import SequenceSampler, sample_batch  # noqa: E402
from server.engine.types import SamplingParams  # noqa: E402

SETTINGS = {
    "greedy": dict(temperature=0),
    "temperature 1, no seed": dict(),
    "temperature 1, seeded": dict(seed=1),
    "top_k 40, top_p 0.95, no seed": dict(top_k=40, top_p=0.95),
    "top_p 0.9, no seed": dict(top_p=0.9),
    "top_p 0.9, seeded": dict(top_p=0.9, seed=1),
    "penalties + logit_bias, no seed": dict(
        repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5, logit_bias={7: 2.0}
    ),
    "greedy + logprobs 5": dict(temperature=0, logprobs=5),
}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_samplers(params: dict, rows: int, vocab: int, prompt_len: int, output_len: int) -> list[SequenceSampler]:
    samplers = []
    for row in range(rows):
        sampler = SequenceSampler(SamplingParams(**params), [(row * 7 + i) % vocab for i in range(prompt_len)], vocab)
        for i in range(output_len):
            sampler.append((row * 13 + i * 5) % vocab)
        samplers.append(sampler)
    return samplers


def synthetic_logits(rows: int, vocab: int, zipf: float, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if not zipf:
        return torch.randn(rows, vocab, generator=generator) * scale
    ranked = -zipf * torch.arange(1, vocab + 1).float().log()  # log p of rank r, unnormalised
    return torch.stack([ranked[torch.randperm(vocab, generator=generator)] for _ in range(rows)])


def reference_step(logits: torch.Tensor, params: dict, generator: torch.Generator) -> None:
    settings = GenerationSettings(**{k: v for k, v in params.items() if k in ("temperature", "top_k", "top_p")})
    for row in logits:
        sample_token(row, settings, generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--zipf", type=float, default=1.5, help="Zipf exponent of the logits (0: Gaussian)")
    parser.add_argument("--scale", type=float, default=4.0, help="std of Gaussian logits (--zipf 0)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=500)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logits = synthetic_logits(args.rows, args.vocab, args.zipf, args.scale)
    generator = torch.Generator().manual_seed(0)
    softmax_ms = best_time(lambda: torch.softmax(logits, dim=-1), args.repeats) * 1e3
    shape = f"Zipf {args.zipf}" if args.zipf else f"Gaussian std {args.scale}"
    print(f"{args.rows} rows x {args.vocab} vocab, {shape} logits, torch threads {torch.get_num_threads()}, "
          f"min of {args.repeats}; one batched softmax: {softmax_ms:.2f} ms\n")
    print("| setting | sample_batch ms | per row us | x softmax | reference per-row loop ms |")
    print("|---|---|---|---|---|")
    for name, params in SETTINGS.items():
        samplers = make_samplers(params, args.rows, args.vocab, args.prompt_len, args.output_len)
        batch_ms = best_time(lambda: sample_batch(logits, samplers), args.repeats) * 1e3
        reference = "-"
        if not set(params) - {"temperature", "top_k", "top_p", "seed"}:
            reference_s = best_time(lambda: reference_step(logits, params, generator), max(2, args.repeats // 3))
            reference = f"{reference_s * 1e3:.1f}"
        print(f"| {name} | {batch_ms:.2f} | {batch_ms * 1e3 / args.rows:.0f} | {batch_ms / softmax_ms:.1f} | {reference} |")


if __name__ == "__main__":
    main()
