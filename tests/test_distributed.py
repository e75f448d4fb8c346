"""Scale-out on CPU: `torchrun --nproc_per_node=2` (gloo) gives the single-process result.

The global batch is the same (8 sequences per step: 2 per micro-batch x 2
accumulation steps x 2 ranks, against 2 x 4 x 1), so losses and weights agree
to float rounding. FSDP is also checked across a stop and a resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import read_safetensors
from cli.main import main

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("dist")
    tokenizer.save(folder / "tokenizer.json")

    def args(out: str, *extra: str) -> list[str]:
        return ["pretrain", "--preset", "tiny", "--data", str(FIXTURES / "shakespeare_sample.txt"),
                str(FIXTURES / "dictionary_sample.txt"), "--out", str(folder / out), "--tokenizer", str(folder),
                "--seq-len", "32", "--batch-tokens", "256", "--micro-batch-size", "2", "--dtype", "float32",
                "--cache-dir", str(folder / "cache"), "--val-fraction", "0.05", "--eval-batches", "2",
                "--max-steps", "3", "--no-progress", *extra]

    assert main(args("single")) == 0  # also builds the token cache the ranks reuse
    return folder, args


def torchrun(argv: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "trainer", *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("done: step") == 1  # only rank 0 reports


def assert_same_run(folder: Path, name: str) -> None:
    single = json.loads((folder / "single" / "config.json").read_text())["training"]
    other = json.loads((folder / name / "config.json").read_text())["training"]
    assert other["steps"] == single["steps"] and other["tokens_seen"] == single["tokens_seen"]
    assert other["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    assert other["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    single_weights = read_safetensors(folder / "single" / "model.safetensors")
    other_weights = read_safetensors(folder / name / "model.safetensors")
    assert max((single_weights[k] - other_weights[k]).abs().max().item() for k in single_weights) < 1e-4


def test_ddp_two_processes_match_one(runs):
    folder, args = runs
    torchrun(args("ddp"))
    assert_same_run(folder, "ddp")


def test_fsdp_with_a_resume_matches_one_process(runs):
    folder, args = runs
    torchrun(args("fsdp", "--fsdp", "--stop-at", "2"))
    assert json.loads((folder / "fsdp" / "training_state.json").read_text())["step"] == 2
    torchrun(["pretrain", "--out", str(folder / "fsdp"), "--resume", "--no-progress"])
    assert_same_run(folder, "fsdp")
