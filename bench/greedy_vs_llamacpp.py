"""Does llama.cpp decode Hearth's exported GGUF as Hearth does? Greedy text from both servers, side by side.

    hearth export-gguf weights/smollm2 --out smol-f32.gguf --type f32
    python bench/greedy_vs_llamacpp.py --llama-server ~/llama.cpp/build/bin/llama-server \
        weights/smollm2 smol-f32.gguf

Starts `llama-server` on the GGUF file, then `hearth serve` on the checkpoint folder (one at a
time, ports 8093 and 8094), asks each for `--max-tokens` greedy tokens after each prompt over
`/v1/completions` (temperature 0), and prints SAME or DIFFERENT per prompt with both texts. A
check that needs a llama.cpp build, so not a test; exit status 1 when any prompt differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 2, 3, 4,"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="the Hearth checkpoint folder the GGUF was exported from")
    parser.add_argument("gguf", type=Path, help="the exported GGUF file")
    parser.add_argument("--llama-server", type=Path, required=True, help="llama.cpp's llama-server binary")
    parser.add_argument("--max-tokens", type=int, default=24)
    return parser.parse_args()


def wait_healthy(url: str, process: subprocess.Popen) -> None:
    for _ in range(180):
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url}/health never answered 200")


def completions(command: list[str], url: str, model: str, max_tokens: int) -> list[str]:
    """Start the server, ask every prompt greedily, stop it."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, process)
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        return [httpx.post(url + "/v1/completions", json={**body, "prompt": prompt}, timeout=300).json()
                ["choices"][0]["text"] for prompt in PROMPTS]
    finally:
        process.terminate()
        process.wait()


def main() -> int:
    args = parse_args()
    llama = completions([str(args.llama_server), "-m", str(args.gguf), "--port", "8093", "-t", "2", "-c", "2048"],
                        "http://127.0.0.1:8093", "gguf", args.max_tokens)
    hearth = completions([sys.executable, "-m", "cli", "serve", "--model", str(args.checkpoint), "--port", "8094"],
                         "http://127.0.0.1:8094", args.checkpoint.name, args.max_tokens)
    for prompt, theirs, ours in zip(PROMPTS, llama, hearth):
        print(json.dumps(prompt), "SAME" if theirs == ours else "DIFFERENT")
        print("  llama.cpp:", json.dumps(theirs))
        print("  hearth:   ", json.dumps(ours))
    return int(llama != hearth)


if __name__ == "__main__":
    sys.exit(main())
