"""The `hearth` command: one argparse tree, subcommands registered by their packages.

Each feature module exposes `register(subparsers)` and imports its heavy
dependencies inside the handler, so `hearth --help` stays fast. Every user
mistake is a `HearthError`: printed as one line, exit status 1, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMAND_MODULES = [
    "model.cli",  # generate
    "model.hf",  # import-hf, export-hf
    "model.gguf_import",  # import-gguf
    "model.gguf_export",  # export-gguf
    "model.quant",  # quantize
    "trainer.commands",  # pretrain
    "trainer.sft_commands",  # sft, eval, merge-lora
    "server.cli",  # serve
    "clients.commands",  # chat, bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Hearth: train, quantize and serve small LLMs locally.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from model.errors import HearthError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except HearthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
