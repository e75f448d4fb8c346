"""How well a chat model answers "what does WORD mean?" (the default model's card figure).

For definition chats sampled from a chat JSONL file, generate a greedy reply
with the reference generator and score it against the reference answer with
SQuAD-style token F1 (lower-cased, punctuation stripped, whitespace split).
Prints JSON: mean F1 and the share of answers with F1 >= 0.5.

    python scripts/eval_word_answers.py weights/default \
        --data ../shared/corpus/wordnet-chat-valid.jsonl.gz --limit 200
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import string
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.chat import encode_chat  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.generate import GenerationSettings, generate  # noqa: E402


def answer_tokens(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip().split()


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def read_chats(path: Path, kind: str, limit: int, seed: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        chats = [chat for chat in map(json.loads, handle) if chat.get("kind") == kind]
    random.Random(seed).shuffle(chats)
    return chats[:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--kind", default="definition")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    tokenizer = checkpoint.tokenizer
    settings = GenerationSettings(max_tokens=args.max_tokens, temperature=0, stop_ids=tuple(tokenizer.stop_ids))
    scores = []
    for chat in read_chats(args.data, args.kind, args.limit, args.seed):
        question, reference = chat["messages"][0], chat["messages"][1]["content"]
        prompt = encode_chat(tokenizer, [question]).ids
        reply = tokenizer.decode(generate(checkpoint.model, prompt, settings))
        scores.append(token_f1(reply, reference))
    result = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "kind": args.kind,
        "questions": len(scores),
        "mean_f1": round(sum(scores) / max(len(scores), 1), 4),
        "share_f1_at_least_0.5": round(sum(s >= 0.5 for s in scores) / max(len(scores), 1), 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
