"""How well a chat model answers "what does WORD mean?" (the default model's card figure).

For definition chats sampled from a chat JSONL file, ask the question through
`hearth serve` (greedy, many at once: the engine is batch-invariant, so each
reply is the one it would be alone) and score the reply against the reference
answer with SQuAD-style token F1 (lower-cased, punctuation stripped,
whitespace split). Prints JSON: mean F1 and the share of answers with
F1 >= 0.5; `--answers FILE` also writes every question, reply and score.

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

from scripts.default_model.served import ask_all  # noqa: E402


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
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--kind", default="definition")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--answers", type=Path, help="also write each question, reply and F1 here (JSONL)")
    args = parser.parse_args()
    chats = read_chats(args.data, args.kind, args.limit, args.seed)
    replies = ask_all(args.checkpoint, [chat["messages"][:1] for chat in chats], args.max_tokens)
    scores = [token_f1(reply["content"], chat["messages"][1]["content"]) for chat, reply in zip(chats, replies)]
    if args.answers:
        write_answers(args.answers, chats, replies, scores)
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


def write_answers(path: Path, chats: list[dict], replies: list[dict], scores: list[float]) -> None:
    rows = [{"question": chat["messages"][0]["content"], "reference": chat["messages"][1]["content"],
             "reply": reply["content"], "f1": round(score, 4)} for chat, reply, score in zip(chats, replies, scores)]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
