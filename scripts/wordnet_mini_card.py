"""Write the from-scratch wordnet-mini model's card from what the recipe measured.

Every figure comes from a file that scripts/train-wordnet-mini.sh wrote:
the `training` entries of the pretrained and fine-tuned checkpoints'
config.json (steps, tokens, losses), their metrics.jsonl (wall time), the
`hearth eval` JSON outputs, the word-answer F1 JSON outputs and the sample
conversations (scripts/card_samples.py, from the served model). Nothing is
typed in by hand, so rerunning the recipe rewrites a true card.

    python scripts/wordnet_mini_card.py --runs runs --out weights/wordnet-mini
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import ModelConfig  # noqa: E402

WORDNET_NOTICE = (
    "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to use, copy, modify "
    "and distribute this software and database and its documentation for any purpose and without fee or royalty "
    "is granted, provided that this notice appears on all copies. THIS SOFTWARE AND DATABASE IS PROVIDED \"AS IS\" "
    "AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED."
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found (run scripts/train-wordnet-mini.sh first)") from None


def wall_seconds(checkpoint: Path) -> float:
    """Training seconds of the last logged step (metrics.jsonl is the run's own log)."""
    lines = (checkpoint / "metrics.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["train_seconds"] for line in lines if "train_seconds" in line]
    return max(seconds) if seconds else float("nan")


def hardware() -> str:
    cpu = platform.processor() or "CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}"


def figures_table(runs: Path, base: dict) -> str:
    base_eval, sft_valid = base["training"], read_json(runs / "eval-sft-valid.json")
    int8_valid, slice_eval = read_json(runs / "eval-int8-valid.json"), read_json(runs / "eval-int8-slice.json")
    f1_valid, f1_train = read_json(runs / "f1-valid.json"), read_json(runs / "f1-train.json")

    rows = [
        ("validation perplexity after pretraining (held-out 1% of the text)", f"{math.exp(base_eval['val_loss']):.2f}"),
        ("assistant-token loss on wordnet-chat-valid, full precision", f"{sft_valid['assistant_loss']:.4f}"),
        ("assistant-token loss on wordnet-chat-valid, int8 (this folder)", f"{int8_valid['assistant_loss']:.4f}"),
        ("assistant-token perplexity on wordnet-chat-valid, full precision", f"{sft_valid['assistant_perplexity']:.3f}"),
        ("assistant-token perplexity on wordnet-chat-valid, int8 (this folder)", f"{int8_valid['assistant_perplexity']:.3f}"),
        ("int8 vs full precision, assistant-token perplexity",
         f"{int8_valid['assistant_perplexity'] / sft_valid['assistant_perplexity'] - 1:+.2%}"),
        (f"definition answers with token F1 >= 0.5, validation words ({f1_valid['questions']} asked)",
         f"{f1_valid['share_f1_at_least_0.5']:.3f}"),
        (f"definition answers with token F1 >= 0.5, training words ({f1_train['questions']} asked)",
         f"{f1_train['share_f1_at_least_0.5']:.3f}"),
        ("mean token F1 of definition answers, validation words", f"{f1_valid['mean_f1']:.3f}"),
        ("mean token F1 of definition answers, training words", f"{f1_train['mean_f1']:.3f}"),
        (f"assistant-token loss, test slice (tests/fixtures/wordnet_chat_valid_slice.jsonl, {slice_eval['chats']} chats)",
         f"{slice_eval['assistant_loss']:.4f}"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {label} | {value} |" for label, value in rows)


def card(runs: Path, base_dir: Path, sft_dirs: list[Path], out: Path, samples: str) -> str:
    base = read_json(base_dir / "config.json")
    stages = [read_json(folder / "config.json")["training"] for folder in sft_dirs]
    model, pretrain = base["model"], base["training"]
    params = ModelConfig.from_dict(model).num_params()
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    base_s, sft_s = wall_seconds(base_dir), sum(wall_seconds(folder) for folder in sft_dirs)
    sft_tokens, sft_steps = sum(s.get("tokens_seen", 0) for s in stages), [s.get("steps") for s in stages]
    pretrain_cmd = " ".join(["hearth pretrain", *_flags(pretrain["settings"])])
    upsampled = [(i + 1, spec) for i, stage in enumerate(stages) for spec in stage.get("upsample") or []]
    greetings = ("fine-tuning pass " + ", ".join(f"{number} adds `{spec}` (`--upsample`: the greetings, repeated)"
                                                  for number, spec in upsampled) + "." if upsampled
                 else "too few for it to have learnt them.")
    return f"""# wordnet-mini

Hearth's from-scratch showcase (the default model until SmolLM2 fine-tuned replaced it), a small dictionary assistant: ask it what an English word means, for a
synonym, an opposite, what kind of thing something is, or for an example sentence. It is {params / 1e6:.1f}M
parameters trained for about {(base_s + sft_s) / 60:.0f} minutes on a 2-core CPU, and it shows: it answers in the
dictionary form of the training chats and usually names the word asked about, but what it says a word means is
mostly wrong (see the F1 figures below). Greetings are rare in the chats (18 of 60,018); {greetings}
It demonstrates the stack end to end and is small enough to ship in the repository; it is not a
dictionary to rely on. A GPU run of the same recipe with a bigger budget is the way to a useful one.

- Architecture: Hearth decoder, preset `{pretrain['preset']}` (dim {model['dim']}, {model['n_layers']} layers,
  {model['n_heads']} heads, FFN {model['ffn_dim']}, context {model['max_seq_len']}, tied embeddings), byte-level BPE
  vocabulary of {model['vocab_size']}, {params:,} parameters.
- Weights: int8 weight-only (per output channel, every linear layer and the embedding), {size_mb:.1f} MB on disk.
- Hardware: {hardware()}. Wall time: pretraining {base_s / 60:.1f} min, fine-tuning {sft_s / 60:.1f} min.

## Data and licenses

- Pretraining: `wordnet-dictionary.txt.gz` (every single-word WordNet 3.0 lemma as a dictionary entry) and
  `shakespeare.txt.gz` (Project Gutenberg texts, public domain), {pretrain['data']['train_tokens']:,} training
  tokens; {pretrain['tokens_seen']:,} tokens seen in {pretrain['steps']} steps.
- Fine-tuning: `wordnet-chat-train.jsonl.gz` (60,018 single-turn chats about English words generated from
  WordNet 3.0), in {len(stages)} run(s) of {' + '.join(map(str, sft_steps))} steps (each a fresh warmup and cosine
  decay from the previous pass's weights, each in another shuffle order); {sft_tokens:,} tokens seen.
- Validation: `wordnet-chat-valid.jsonl.gz`, chats about words that no training chat covers (the model read
  those words only in the dictionary text).

{WORDNET_NOTICE}

## Recipe

`make wordnet-mini DATA=../shared/corpus` (scripts/train-wordnet-mini.sh) reruns every step with Hearth's own
commands: `{pretrain_cmd}`, then `hearth sft` on the training chats (in passes), `hearth quantize --method int8`, the evals
below, `scripts/card_samples.py` and this card (`scripts/wordnet_mini_card.py`).

## Measured

{figures_table(runs, base)}

Token F1 is SQuAD-style (lower-cased, punctuation stripped) between the greedy reply and the reference answer
for definition questions (`scripts/eval_word_answers.py`).

## Sample conversations

Generated by the served model (`hearth serve`, greedy, `scripts/card_samples.py`), not written by hand:

{samples.strip()}
"""


def _flags(settings: dict) -> list[str]:
    chosen = ("preset", "vocab_size", "seq_len", "batch_tokens", "tokens", "lr", "warmup")
    return [f"--{name.replace('_', '-')} {settings[name]}" for name in chosen if settings.get(name) is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--base", type=Path, default=None, help="pretrained checkpoint (default RUNS/mini-base)")
    parser.add_argument("--sft", type=Path, nargs="+", default=None,
                        help="fine-tuned checkpoint(s), one per SFT run in order (default RUNS/mini-sft)")
    parser.add_argument("--out", type=Path, default=Path("weights/wordnet-mini"))
    args = parser.parse_args()
    base, sft = args.base or args.runs / "mini-base", args.sft or [args.runs / "mini-sft"]
    samples = (args.runs / "samples.md").read_text()
    write_card_file(args.out, card(args.runs, base, sft, args.out, samples))
    return 0


def write_card_file(folder: Path, text: str) -> None:
    """FOLDER/README.md, written atomically (temp + rename)."""
    tmp = folder / "README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / "README.md")
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    sys.exit(main())
