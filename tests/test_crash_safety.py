"""Crash safety of training: `hearth pretrain` killed with SIGKILL while it saves, again and again.

Every step saves a checkpoint (--save-every 1), so most of a run is spent
saving and random kill times land inside saves. After each kill the output
folder must hold a checkpoint that loads, whose training state agrees with
its weights' step, and `--resume` must continue from it. A second
test kills a save at the one instant a two-rename swap leaves no folder.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
MAX_STEPS = 100_000  # never reached: each run is killed, the last one stops with --stop-at


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    tokenizer.save(folder / "tokenizer.json")
    return folder


def pretrain_command(out: Path, cache: Path, tokenizer_dir: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "trainer", "pretrain", "--out", str(out), "--resume", "--no-progress"]
    return [sys.executable, "-m", "trainer", "pretrain", "--preset", "tiny", "--data", str(FIXTURES / "shakespeare_sample.txt"),
            "--out", str(out), "--tokenizer", str(tokenizer_dir), "--seq-len", "32", "--batch-tokens", "64",
            "--micro-batch-size", "2", "--dtype", "float32", "--cache-dir", str(cache), "--val-fraction", "0.05",
            "--max-steps", str(MAX_STEPS), "--save-every", "1", "--eval-every", "0", "--no-progress"]


def saved_step(out: Path) -> int:
    """The checkpoint's step, after checking it loads and its two records agree."""
    checkpoint = load_checkpoint(out)  # weights, config and tokenizer, or a CheckpointError
    assert checkpoint.model is not None
    state = json.loads((out / "training_state.json").read_text())
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == state["step"]
    return state["step"]


def current_step(out: Path) -> int | None:
    try:
        return json.loads((out / "training_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def run_until_killed(command: list[str], out: Path, delay: float) -> None:
    before = current_step(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while current_step(out) == before:  # this run's first save: it is training (and saving) now
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.02)
        time.sleep(delay)
        assert process.poll() is None, process.communicate()[1]
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


def test_sigkill_during_saves_always_leaves_a_checkpoint_that_resumes(tmp_path, tokenizer_dir):
    out, cache = tmp_path / "model", tmp_path / "cache"
    rng = random.Random(19)
    steps = []
    for attempt in range(4):
        run_until_killed(pretrain_command(out, cache, tokenizer_dir, resume=attempt > 0), out, rng.uniform(0.2, 1.2))
        steps.append(saved_step(out))
    assert steps == sorted(steps) and steps[-1] > steps[0], steps  # each resume went on from the last save
    finish = subprocess.run([*pretrain_command(out, cache, tokenizer_dir, resume=True), "--stop-at", str(steps[-1] + 3)],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming at step {steps[-1]}" in finish.stderr
    assert saved_step(out) == steps[-1] + 3
    assert not list(tmp_path.glob(".model.*")), list(tmp_path.glob(".*"))  # killed saves' temp folders are gone


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path

real_rename = os.rename
def rename_then_die(src, dst):
    real_rename(src, dst)
    if ".old-" in Path(dst).name:  # the previous checkpoint was moved aside, the new one not yet in
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename_then_die
from model.checkpoint import load_checkpoint, save_checkpoint
checkpoint = load_checkpoint(sys.argv[1])
save_checkpoint(sys.argv[1], checkpoint.model, checkpoint.tokenizer)
"""


def test_a_save_killed_between_its_renames_keeps_the_folder(tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(folder)], cwd=REPO, env=env, timeout=120)
    assert load_checkpoint(folder).model is not None  # the folder is there, whole, old or new
