"""Diagnostic, not part of the recipe: does reading a word's dictionary entry during the fine-tune lift the
F1 of its definition answer? (README, "The default model": the route to the F1 target.)

    python scripts/default_model/dictionary_pilot.py data --corpus ../shared/corpus --chats runs/default/word-chats.jsonl \
        --general runs/default/general.jsonl --out runs/pilot
    hearth sft --base runs/default/merged-f32 --data runs/pilot/chats.jsonl --text-data runs/pilot/dictionary.jsonl \
        --lora-rank 16 --lora-alpha 32 --seq-len 512 --batch-tokens 4096 --epochs 3 --out runs/pilot/sft
    hearth merge-lora runs/default/merged-f32 runs/pilot/sft --out runs/pilot/merged
    python scripts/eval_word_answers.py runs/pilot/merged --data ../shared/corpus/wordnet-chat-valid.jsonl.gz \
        --limit 200 --answers runs/pilot/answers.jsonl
    python scripts/default_model/dictionary_pilot.py split runs/pilot/answers.jsonl runs/default/f1-default-answers.jsonl

The full fine-tune variant: `data ... --others 400 --num-chats 300 --out runs/pilot-full`, then the same
`hearth sft` without the --lora-* options (`--out runs/pilot-full/sft`), and eval_word_answers.py on that
folder directly (no merge).

`seen` asks a related question of the training chats: how many held-out words' first gloss is in some
training chat's reply already (WordNet gives every lemma of a synset the same gloss, so a synonym's chat
carries it), and does the model answer those better:

    python scripts/default_model/dictionary_pilot.py seen runs/default/f1-default-answers.jsonl --corpus ../shared/corpus

The 200 questions eval_word_answers.py asks (its seed) are split by position: the even ones' words are
"read" (their dictionary entries are in the text data, shuffled among --others random entries), the odd
ones' are not. The fine-tune also rehearses --num-chats word chats and the base's general answers, so the
answer form stays. Because it picks entries by validation word, this is an experiment and never a shipped
model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_word_answers import read_chats  # noqa: E402


def dictionary_entries(corpus: Path) -> dict[str, str]:
    with gzip.open(corpus / "wordnet-dictionary.txt.gz", "rt", encoding="utf-8") as handle:
        entries = [entry.strip() for entry in handle.read().split("\n\n") if entry.strip()]
    return {entry.split("\n", 1)[0]: entry for entry in entries}


def write_data(args: argparse.Namespace) -> None:
    questions = read_chats(args.corpus / "wordnet-chat-valid.jsonl.gz", "definition", 200, 0)
    read_words = {chat["word"] for chat in questions[0::2]}
    asked = read_words | {chat["word"] for chat in questions[1::2]}
    entries = dictionary_entries(args.corpus)
    others = [entry for word, entry in entries.items() if word not in asked]
    random.Random(0).shuffle(others)
    texts = [entries[word] for word in sorted(read_words) if word in entries] + others[:args.others]
    random.Random(1).shuffle(texts)
    chats = args.chats.read_text(encoding="utf-8").splitlines()
    random.Random(2).shuffle(chats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dictionary.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (args.out / "chats.jsonl").write_text("\n".join(chats[:args.num_chats] + args.general.read_text().splitlines()) + "\n")
    print(json.dumps({"read_words": len(read_words), "text_records": len(texts)}))


def split_f1(answers: list[Path]) -> None:
    for path in answers:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        report(path, "read", rows[0::2])
        report(path, "unread", rows[1::2])


def first_gloss(reference: str) -> str:
    """The first sense's gloss of a definition answer ('W (pos): gloss. For example: ...' or a numbered list)."""
    body = re.sub(r"^.*?\(\w[\w ]*\)( has several meanings:\n1\.)?:?", "", reference, count=1, flags=re.S)
    return body.split("\n", 1)[0].split(" For example", 1)[0].strip().rstrip(".")


def training_replies(corpus: Path) -> str:
    with gzip.open(corpus / "wordnet-chat-train.jsonl.gz", "rt", encoding="utf-8") as handle:
        chats = map(json.loads, handle)
        return "\n".join(m["content"] for chat in chats for m in chat["messages"] if m["role"] == "assistant")


def split_seen(answers: Path, corpus: Path) -> None:
    replies = training_replies(corpus)
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    seen = [first_gloss(row["reference"]) in replies for row in rows]
    report(answers, "first gloss in a training chat", [row for row, hit in zip(rows, seen) if hit])
    report(answers, "first gloss in no training chat", [row for row, hit in zip(rows, seen) if not hit])


def report(path: Path, group: str, rows: list[dict]) -> None:
    scores = [row["f1"] for row in rows]
    print(json.dumps({"answers": str(path), "words": group, "questions": len(scores),
                      "mean_f1": round(sum(scores) / len(scores), 3),
                      "share_f1_at_least_0.5": round(sum(s >= 0.5 for s in scores) / len(scores), 3)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data")
    data.add_argument("--corpus", type=Path, required=True)
    data.add_argument("--chats", type=Path, required=True)
    data.add_argument("--general", type=Path, required=True)
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--others", type=int, default=900, help="dictionary entries of words not asked about")
    data.add_argument("--num-chats", type=int, default=500, help="word chats rehearsed")
    split = commands.add_parser("split")
    split.add_argument("answers", type=Path, nargs="+")
    seen = commands.add_parser("seen")
    seen.add_argument("answers", type=Path)
    seen.add_argument("--corpus", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "data":
        write_data(args)
    elif args.command == "split":
        split_f1(args.answers)
    else:
        split_seen(args.answers, args.corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
