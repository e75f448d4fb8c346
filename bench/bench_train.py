"""Training throughput: Hearth's trainer vs karpathy/nanoGPT's train.py, side by side in one run.

    python bench/bench_train.py --presets mini small --nanogpt /tmp/nanogpt

For each preset, the same shape (layers, width, heads), sequence length,
batch and vocabulary go through:
- Hearth's `trainer.loop.train` with the model `hearth pretrain` trains, fp32,
  bf16 autocast, and bf16 with torch.compile, on random tokens (throughput
  does not depend on the text);
- nanoGPT's own `train.py` (a checkout kept outside this repo), fp32 with
  compile off and dropout 0 (nanoGPT runs CPU training in fp32 only), on the
  same random tokens written in its data format.

Tokens/s is measured after `--warmup-steps` steps (kernel selection, first
allocations). MFU is model FLOP/s (6N + attention, ModelConfig.flops_per_token)
over the machine's matmul peak at that dtype, measured with a matmul probe.
Nothing here is a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle  # only to write nanoGPT's own meta.pkl in a temp folder; Hearth never reads pickles
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import ModelConfig  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from trainer.fast_model import TrainingTransformer  # noqa: E402
from trainer.loop import TrainConfig, train  # noqa: E402
from trainer.metrics import peak_flops  # noqa: E402


class RandomTokens:
    """BatchSource of uniformly random tokens."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def next_batch(self, batch_size: int):
        block = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), generator=self.generator)
        return block[:, :-1], block[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def hearth_tokens_per_s(config: ModelConfig, args, variant: str) -> float:
    """variant: "float32", "bfloat16", optionally with "+compile"."""
    dtype, _, extra = variant.partition("+")
    model = TrainingTransformer(config).init_weights(0)  # what `hearth pretrain` trains
    train_config = TrainConfig(max_steps=args.warmup_steps + args.steps, batch_size=args.batch,
                               micro_batch_size=args.micro_batch or args.batch, lr=1e-4, dtype=dtype,
                               progress=False, log_every=1, compile=extra == "compile")
    tokenizer = Tokenizer.train(iter(["a b c"]), vocab_size=300)  # unused: nothing is saved but the metrics
    with tempfile.TemporaryDirectory() as out:
        def save_metrics_only(folder: Path, extra_files: dict, info: dict) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            extra_files["metrics.jsonl"](folder / "metrics.jsonl")

        train(model, RandomTokens(config.vocab_size, args.seq_len), None, train_config, Path(out) / "m", tokenizer,
              save_fn=save_metrics_only)
        lines = (Path(out) / "m" / "metrics.jsonl").read_text().splitlines()
    return _steady_rate([json.loads(line) for line in lines], args.warmup_steps)


def _steady_rate(records: list[dict], warmup_steps: int) -> float:
    train_records = [r for r in records if "loss" in r]
    start = next(r for r in train_records if r["step"] == warmup_steps)
    end = train_records[-1]
    return (end["tokens"] - start["tokens"]) / (end["train_seconds"] - start["train_seconds"])


def nanogpt_tokens_per_s(nanogpt: Path, config: ModelConfig, args) -> float:
    """Run nanoGPT's train.py on random tokens of our vocabulary; tokens/s from its per-iteration times."""
    with tempfile.TemporaryDirectory() as tmp:
        data = nanogpt / "data" / "hearthbench"
        data.mkdir(parents=True, exist_ok=True)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=2_000_000, dtype=np.uint16)
        tokens.tofile(data / "train.bin")
        tokens[:200_000].tofile(data / "val.bin")
        with open(data / "meta.pkl", "wb") as handle:
            pickle.dump({"vocab_size": config.vocab_size}, handle)
        command = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--dataset=hearthbench",
                   "--device=cpu", "--compile=False", "--dtype=float32", "--dropout=0.0", f"--out_dir={tmp}",
                   f"--batch_size={args.batch}", f"--block_size={args.seq_len}", f"--n_layer={config.n_layers}",
                   f"--n_head={config.n_heads}", f"--n_embd={config.dim}", "--eval_iters=1",
                   "--eval_interval=1000000", "--log_interval=1", f"--max_iters={args.warmup_steps + args.steps}",
                   "--wandb_log=False", "--always_save_checkpoint=False",
                   f"--gradient_accumulation_steps={args.batch // (args.micro_batch or args.batch)}"]
        if args.micro_batch:
            command[command.index(f"--batch_size={args.batch}")] = f"--batch_size={args.micro_batch}"
        result = subprocess.run(command, cwd=nanogpt, capture_output=True, text=True, env={**os.environ})
        if result.returncode:
            raise RuntimeError(f"nanoGPT failed:\n{result.stderr[-2000:]}")
    times = [float(m) for m in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", result.stdout) for m in [m[1]]]
    steady = times[args.warmup_steps + 1:]  # iter 0 also runs the first evaluation
    return args.batch * args.seq_len / (statistics.mean(steady) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mini", "small"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=12, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per forward (0: the whole batch)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "bfloat16+compile"],
                        help="Hearth runs: compute dtype, +compile for torch.compile")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (outside this repo) to compare with")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq {args.seq_len}, "
          f"batch {args.batch}, vocab {args.vocab_size}")
    rows = []
    for preset in args.presets:
        config = ModelConfig.from_preset(preset, vocab_size=args.vocab_size)
        flops = config.flops_per_token(args.seq_len)
        params = config.num_params() / 1e6
        for variant in args.variants:
            rate = hearth_tokens_per_s(config, args, variant)
            peak = peak_flops("cpu", torch.bfloat16 if variant.startswith("bfloat16") else torch.float32)
            rows.append((preset, f"{params:.1f}M", f"Hearth {variant}", rate, rate * flops / peak))
            print(rows[-1], flush=True)
        if args.nanogpt:
            rate = nanogpt_tokens_per_s(args.nanogpt, config, args)
            peak = peak_flops("cpu", torch.float32)
            rows.append((preset, f"{params:.1f}M", "nanoGPT float32", rate, rate * flops / peak))
            print(rows[-1], flush=True)
    print("\n| preset | params | trainer | tokens/s | MFU |\n|---|---|---|---|---|")
    for preset, params, who, rate, mfu in rows:
        print(f"| {preset} | {params} | {who} | {rate:,.0f} | {mfu:.1%} |")


if __name__ == "__main__":
    main()
