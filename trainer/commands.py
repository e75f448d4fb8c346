"""`hearth pretrain`: the command line of the pretraining pipeline (trainer/pretrain.py).

Every option defaults to None here so the handler knows what the user typed:
on `--resume` the untyped ones come from the checkpoint's recorded settings,
otherwise from `PretrainSettings`' defaults (shown in --help).
"""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pretrain", help="pretrain a model from scratch on text/JSONL data",
        description="Pretrain a Hearth model. Example: hearth pretrain --preset mini --data corpus/ "
                    "--out weights/mine --max-steps 2000")
    what = parser.add_argument_group("model and data")
    what.add_argument("--preset", help="model shape: tiny, mini, small, medium, large (default mini)")
    what.add_argument("--data", nargs="+", metavar="PATH",
                      help="files (.txt .md .jsonl, .gz too), folders, globs, a save_to_disk dataset folder "
                           "or hf:NAME[:SPLIT]")
    what.add_argument("--out", required=True, help="checkpoint folder to write, e.g. weights/mine")
    what.add_argument("--tokenizer", help="folder with a tokenizer.json to use (default: train one on the data)")
    what.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer (default 8192)")
    what.add_argument("--seq-len", type=int, help="tokens per training sequence (default: the preset's context)")
    what.add_argument("--cache-dir", help="token cache folder (default .hearth-cache)")
    what.add_argument("--val-fraction", type=float, help="share of tokens held out for validation (default 0.01)")
    what.add_argument("--min-chars", type=int, help="drop documents shorter than this after cleaning (default 16)")
    what.add_argument("--no-dedupe", dest="dedupe", action="store_false", default=None,
                      help="keep exact duplicate documents")
    what.add_argument("--strict", action="store_true", default=None, help="stop at a bad JSONL line instead of skipping it")

    how = parser.add_argument_group("optimisation")
    how.add_argument("--batch-tokens", type=int, help="tokens per optimizer step, via gradient accumulation (default 16384)")
    how.add_argument("--micro-batch-size", type=int, help="sequences per forward pass (default: ~4096 tokens' worth)")
    how.add_argument("--max-steps", type=int, help="optimizer steps")
    how.add_argument("--tokens", type=float, help="training tokens (instead of --max-steps), e.g. 2e7")
    how.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    how.add_argument("--min-lr", type=float, help="cosine floor (default lr/10)")
    how.add_argument("--warmup", type=int, help="linear warmup steps (default 5%% of steps, at most 500)")
    how.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    how.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    how.add_argument("--seed", type=int, help="initialisation and data order seed (default 0)")

    run = parser.add_argument_group("running")
    run.add_argument("--eval-every", type=int, help="steps between validation passes (default: 10 per run)")
    run.add_argument("--eval-batches", type=int, help="micro-batches per validation pass (default 8)")
    run.add_argument("--save-every", type=int, help="steps between checkpoints (default: 10 per run)")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue the run in --out exactly where its last checkpoint stopped")
    run.add_argument("--stop-at", type=int, help="end this invocation at this step (checkpoint; resume later)")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace a model already in --out")
    run.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    run.add_argument("--dtype", help="auto, bfloat16 or float32 compute (default auto: bf16 where fast)")
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    run.add_argument("--fsdp", action="store_true", default=None,
                     help="under torchrun: shard weights and optimizer state (FSDP2) instead of DDP")
    run.add_argument("--log-file", help="append metrics as JSON lines to this file while training")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    parser.set_defaults(handler=run_pretrain_command)


def run_pretrain_command(args: argparse.Namespace) -> int:
    from trainer.pretrain import run_pretrain

    given = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    if given.get("tokens") is not None:
        given["tokens"] = int(given["tokens"])
    return run_pretrain(given)
