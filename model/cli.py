"""`hearth generate`: the reference generator on the command line."""

from __future__ import annotations

import argparse
import sys


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="generate text from a checkpoint (the reference generator)")
    parser.add_argument("checkpoint", help="checkpoint folder, e.g. weights/default")
    parser.add_argument("--prompt", required=True, help="prompt text (with --chat: the user message)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from model.chat import encode_chat
    from model.checkpoint import load_checkpoint
    from model.generate import GenerationSettings, generate

    settings = GenerationSettings(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    checkpoint = load_checkpoint(args.checkpoint, device=args.device)
    tokenizer = checkpoint.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt_ids = encode_chat(tokenizer, messages + [{"role": "user", "content": args.prompt}]).ids
        settings.stop_ids = tuple(tokenizer.stop_ids)
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=True)
        settings.stop_ids = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    if not args.chat:
        sys.stdout.write(args.prompt)
    generated: list[int] = []
    printed = ""
    for token in generate(checkpoint.model, prompt_ids, settings):
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    return 0
