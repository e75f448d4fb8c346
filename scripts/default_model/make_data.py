"""The default model's fine-tuning mix, written as chat JSONL files.

- `word-chats.jsonl`: N chats drawn (seeded) from the corpus' training chats,
  every kind in its corpus share; the 18 corpus greetings are left out, since
  they describe the from-scratch model ("trained from scratch").
- `general.jsonl`: the base model's own greedy answers, through `hearth serve`,
  to the prompts in general_prompts.txt (greetings, facts, small tasks),
  written before fine-tuning. Replies cut at --max-tokens are dropped (they
  would teach stopping mid-sentence). Rehearsing its own answers is what keeps
  the base's general ability while it learns the dictionary's answer form.
- `dictionary.jsonl` (with --dictionary-entries N, -1 for all): N entries of the
  corpus' WordNet dictionary, drawn seeded and blind to the validation words,
  as `{"text": ...}` records for `hearth sft --text-data` (continued
  pretraining: the validation split asks about words only the dictionary
  text describes).

    python scripts/default_model/make_data.py runs/smollm2-f32 --corpus ../shared/corpus --out runs
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from served import ask_all  # noqa: E402

PROMPTS = Path(__file__).with_name("general_prompts.txt")


def read_prompts(path: Path = PROMPTS) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def sample_word_chats(corpus: Path, count: int, seed: int) -> list[dict]:
    with gzip.open(corpus / "wordnet-chat-train.jsonl.gz", "rt", encoding="utf-8") as handle:
        chats = [chat for chat in map(json.loads, handle) if chat.get("kind") != "chitchat"]
    random.Random(seed).shuffle(chats)
    return chats[:count]


def sample_dictionary(corpus: Path, count: int, seed: int) -> list[dict]:
    """`count` dictionary entries (all for -1) as text records, in a seeded order."""
    with gzip.open(corpus / "wordnet-dictionary.txt.gz", "rt", encoding="utf-8") as handle:
        entries = [entry.strip() for entry in handle.read().split("\n\n") if entry.strip()]
    random.Random(seed).shuffle(entries)
    return [{"text": entry} for entry in (entries if count < 0 else entries[:count])]


def self_answers(base: Path, prompts: list[str], max_tokens: int) -> tuple[list[dict], int]:
    """(chats with the base's complete replies, number of replies dropped as cut)."""
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    replies = ask_all(base, conversations, max_tokens)
    chats = [{"kind": "general", "messages": [*messages, {"role": "assistant", "content": reply["content"]}]}
             for messages, reply in zip(conversations, replies) if reply["finish_reason"] == "stop"]
    return chats, len(prompts) - len(chats)


def write_jsonl(path: Path, chats: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(chat, ensure_ascii=False) + "\n" for chat in chats), encoding="utf-8")
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the unquantized base checkpoint")
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--word-chats", type=int, default=4000)
    parser.add_argument("--dictionary-entries", type=int, default=0,
                        help="also write N dictionary entries as text records (-1: all of them)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "word-chats.jsonl", sample_word_chats(args.corpus, args.word_chats, args.seed))
    if args.dictionary_entries:
        write_jsonl(args.out / "dictionary.jsonl", sample_dictionary(args.corpus, args.dictionary_entries, args.seed))
    general, dropped = self_answers(args.base, read_prompts(), args.max_tokens)
    write_jsonl(args.out / "general.jsonl", general)
    print(json.dumps({"word_chats": args.word_chats, "dictionary_entries": args.dictionary_entries,
                      "general": len(general), "general_dropped_as_cut": dropped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
