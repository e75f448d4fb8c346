"""`hearth chat` and `hearth bench`: the HTTP clients of a running server (no torch needed)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    _register_chat(commands)
    _register_bench(commands)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server address (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model id (default: the server's first model)")
    parser.add_argument("--api-key", default=None, help="the server's API key (default: $HEARTH_API_KEY)")


def _register_chat(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("chat", help="chat with a running server in the terminal (streaming, multi-turn)")
    _add_connection_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=40, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="most tokens per reply (default: not sent; the server allows the rest of the context)")
    parser.set_defaults(handler=_run_chat)


def _register_bench(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="load-test a running server with concurrent streaming clients")
    _add_connection_arguments(parser)
    parser.add_argument("--concurrency", default="4", help="clients, or a comma-separated list of levels (1,4,16,64)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least one per client)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0: greedy, so runs compare)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_run_bench)


def _run_chat(args: argparse.Namespace) -> int:
    from clients.chat import run_chat

    return run_chat(args)


def _run_bench(args: argparse.Namespace) -> int:
    from clients.loadbench import run_bench

    return run_bench(args)
