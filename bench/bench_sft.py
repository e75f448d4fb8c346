"""SFT throughput: full fine-tuning vs LoRA, packed row lengths, bf16 vs fp32, side by side.

    python bench/bench_sft.py --base weights/default --data /work/shared/corpus/wordnet-chat-train.jsonl.gz

Every variant runs the code `hearth sft` runs (chat reading and packing from
trainer/chat_data.py, LoRA from trainer/lora.py, the shared trainer loop) on
the real chats, with the default step of 8192 tokens in 4096-token
micro-batches. Tokens/s counts every row position (packing padding
included); assistant tokens/s counts only the tokens that carry loss.
Timing starts after `--warmup-steps` steps and covers `--steps` steps;
variants are interleaved over `--rounds` rounds and the median reported.
Without --base a random `mini` model is built (throughput does not depend on
the weights) with a tokenizer trained on the first chats.
Nothing here is a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decoder import Transformer  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from trainer.chat_data import PackedChatBatches, read_chats  # noqa: E402
from trainer.loop import TrainConfig, train  # noqa: E402
from trainer.lora import LoRAConfig, apply_lora, lora_modules  # noqa: E402
from trainer.sft import fused_training_model  # noqa: E402

VARIANTS = {  # name: (seq_len, LoRA rank or None, dtype)
    "full, rows of 256, bf16": (256, None, "bfloat16"),
    "full, rows of 512, bf16": (512, None, "bfloat16"),
    "LoRA r=16, rows of 512, bf16": (512, 16, "bfloat16"),
    "full, rows of 512, fp32": (512, None, "float32"),
}


class TimedBatches:
    """Wraps a BatchSource; notes when each call happens (a step starts with its first call)."""

    def __init__(self, source: PackedChatBatches):
        self.source, self.call_times = source, []

    def next_batch(self, batch_size: int):
        self.call_times.append(time.perf_counter())
        return self.source.next_batch(batch_size)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def random_mini(data: str, folder: Path) -> Path:
    """A random `mini` checkpoint with an 8192-token BPE trained on the first 20,000 chats."""
    def texts():
        with gzip.open(data, "rt") if data.endswith(".gz") else open(data) as handle:
            for line in itertools.islice(handle, 20000):
                yield from (m["content"] for m in json.loads(line)["messages"])

    tokenizer = Tokenizer.train(texts(), vocab_size=8192)
    config = ModelConfig.from_preset("mini", vocab_size=tokenizer.vocab_size)
    return save_checkpoint(folder / "mini", Transformer(config).init_weights(0), tokenizer)


def run_variant(base: Path, chats, seq_len: int, rank: int | None, dtype: str, args, out: Path) -> float:
    """Row tokens per second over `args.steps` steps after warmup."""
    checkpoint = load_checkpoint(base, dtype=torch.float32)
    model, trainable = checkpoint.model, None
    if rank is not None:
        apply_lora(model, LoRAConfig(rank, 2.0 * rank))
        trainable = [f"{n}.{p}" for n in lora_modules(model) for p in ("lora_a", "lora_b")]
    else:
        model = fused_training_model(model)  # as `hearth sft` does for full fine-tuning
    batch_size = 8192 // seq_len
    source = TimedBatches(PackedChatBatches(chats, seq_len, checkpoint.tokenizer.pad_id or 0))
    config = TrainConfig(max_steps=args.warmup_steps + args.steps + 1, batch_size=batch_size,
                         micro_batch_size=min(batch_size, 4096 // seq_len), lr=1e-4, dtype=dtype,
                         progress=False, peak_flops=1.0)
    accum = batch_size // config.micro_batch_size
    train(model, source, None, config, out, checkpoint.tokenizer, trainable_params=trainable,
          save_fn=lambda folder, files, info: None)
    times = source.call_times
    elapsed = times[(args.warmup_steps + args.steps) * accum] - times[args.warmup_steps * accum]
    return args.steps * batch_size * seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="checkpoint to fine-tune (default: a random mini)")
    parser.add_argument("--data", default="/work/shared/corpus/wordnet-chat-train.jsonl.gz")
    parser.add_argument("--chats", type=int, default=5000, help="chats read (enough for the steps timed)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else random_mini(args.data, Path(tmp))
        tokenizer = load_checkpoint(base).tokenizer
        chat_sets = {n: read_chats([args.data], tokenizer, n + 1, limit=args.chats)[0] for n in (256, 512)}
        results: dict[str, list[float]] = {name: [] for name in args.variants}
        for _ in range(args.rounds):
            for name in args.variants:
                seq_len, rank, dtype = VARIANTS[name]
                results[name].append(run_variant(base, chat_sets[seq_len], seq_len, rank, dtype, args, Path(tmp) / "o"))
        print(f"base {base}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{args.steps} steps of 8192 tokens after {args.warmup_steps}, median of {args.rounds} rounds\n")
        print("| variant | row tokens/s | assistant tokens/s | packed rows filled |")
        print("|---|---|---|---|")
        for name in args.variants:
            seq_len = VARIANTS[name][0]
            chats = chat_sets[seq_len]
            source = PackedChatBatches(chats, seq_len, 0)
            fill = chats.num_tokens / (source.rows_per_epoch() * (seq_len + 1))
            assistant_share = chats.num_assistant_tokens / (source.rows_per_epoch() * seq_len)
            rate = statistics.median(results[name])
            print(f"| {name} | {rate:,.0f} | {rate * assistant_share:,.0f} | {fill:.1%} |")


if __name__ == "__main__":
    main()
