"""`hearth sft`, `hearth eval` and `hearth merge-lora`: argument parsing and handlers.

Handlers import torch and the trainer lazily so `hearth --help` stays fast.
Every user mistake is a `HearthError` (one line, exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    register_sft(commands)
    register_eval(commands)
    register_merge(commands)


def register_sft(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("sft", help="supervised fine-tuning on chats (full or LoRA)")
    parser.add_argument("--base", required=True, help="checkpoint folder to fine-tune")
    parser.add_argument("--data", required=True, nargs="+", help="chat JSONL file(s), plain or .gz")
    parser.add_argument("--val-data", nargs="+", default=None, help="chat JSONL file(s) for validation loss")
    parser.add_argument("--upsample", nargs="+", default=None, metavar="FILE:N",
                        help="also train on FILE's chats, N times per epoch (a rare kind, e.g. greetings)")
    parser.add_argument("--text-data", nargs="+", default=None, metavar="PATH",
                        help="also train on plain text (.txt paragraphs, {\"text\"} JSONL records), loss on every "
                             "token: continued pretraining mixed into the fine-tune")
    parser.add_argument("--out", required=True, help="output folder (checkpoint, or adapter with --lora-rank)")
    lora = parser.add_argument_group("LoRA (leave out --lora-rank for full fine-tuning)")
    lora.add_argument("--lora-rank", type=int, default=None, help="adapter rank r")
    lora.add_argument("--lora-alpha", type=float, default=None, help="adapter scale is alpha / r (default 2r)")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="comma-separated module names")
    lora.add_argument("--merge", action="store_true", help="save the merged model instead of the adapter")
    run = parser.add_argument_group("run")
    run.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4 full, 1e-3 LoRA)")
    run.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr / 10)")
    run.add_argument("--weight-decay", type=float, default=0.0)
    run.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    run.add_argument("--epochs", type=float, default=None, help="passes over the chats (default 1)")
    run.add_argument("--max-steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    run.add_argument("--seq-len", type=int, default=None, help="packed row length (default: model context)")
    run.add_argument("--batch-size", type=int, default=None, help="rows per optimizer step")
    run.add_argument("--batch-tokens", type=int, default=None, help="tokens per optimizer step (default 8192)")
    run.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward pass")
    run.add_argument("--warmup", type=int, default=None, help="warmup steps (default 3%% of the run)")
    run.add_argument("--eval-every", type=int, default=None, help="steps between validation passes")
    run.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
    run.add_argument("--long-chats", choices=("truncate", "drop"), default="truncate",
                     help="chats longer than --seq-len + 1 tokens")
    run.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N, mps (torchrun for several GPUs)")
    run.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                     help="compute dtype over fp32 master weights (default: bfloat16 where fast)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--log-file", default=None, help="append metrics to this JSONL file as the run goes")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--resume", action="store_true", help="continue the run saved in --out (same command)")
    run.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step; --resume later")
    run.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=run_sft_command)


def register_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="perplexity on text, assistant-token loss on chats (prints JSON)")
    parser.add_argument("checkpoint", help="checkpoint folder (any quantization) or LoRA adapter folder")
    parser.add_argument("--data", required=True, nargs="+", help="text files or chat JSONL (plain or .gz)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents or chats")
    parser.add_argument("--seq-len", type=int, default=None, help="text window length (default: model context)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPU, slightly less exact)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad chat record")
    parser.add_argument("--base", default=None, help="base checkpoint of an adapter (default: the one it records)")
    parser.set_defaults(handler=run_eval_command)


def register_merge(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("merge-lora", help="fold a LoRA adapter into its base, as a new checkpoint")
    parser.add_argument("base", help="base checkpoint folder (unquantized)")
    parser.add_argument("adapter", help="adapter folder (adapter.safetensors + adapter_config.json)")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--force", action="store_true", help="merge even if the base weights differ from training")
    parser.set_defaults(handler=run_merge_command)


def check_positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    from model.errors import HearthError

    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise HearthError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def run_eval_command(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate
    from trainer.pretrain import pick_device
    from trainer.sft import load_model

    for name in ("max_tokens", "limit", "seq_len", "batch_tokens"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    args.device = pick_device(args.device)
    checkpoint = load_model(args.checkpoint, base=args.base, device=args.device)
    result = evaluate(checkpoint, args.data, device=args.device, bf16=args.bf16, seq_len=args.seq_len,
                      limit=args.limit, max_tokens=args.max_tokens, strict=args.strict, batch_tokens=args.batch_tokens)
    result["checkpoint"] = args.checkpoint
    print(json.dumps(result, indent=2))
    return 0


def run_merge_command(args: argparse.Namespace) -> int:
    from trainer.sft import merge_adapter_folder

    out = merge_adapter_folder(Path(args.base), Path(args.adapter), Path(args.out), args.overwrite, args.force)
    print(f"merged {args.adapter} into {args.base}: {out}", file=sys.stderr)
    return 0


def run_sft_command(args: argparse.Namespace) -> int:
    from trainer.sft import SFTOptions, run_sft

    return run_sft(SFTOptions.from_args(args))
