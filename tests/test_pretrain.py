"""Pretraining: the loop's maths, exact resume, the command's outputs and its errors, SIGINT."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import read_safetensors
from model.decoder import Transformer
from cli.main import main
from trainer.fast_model import TrainingTransformer
from trainer.loop import TrainConfig, train
from trainer.optim import Schedule, build_optimizer

from conftest import make_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


class RandomRows:
    """In-memory BatchSource: seeded rows, a stream position, optional masked targets."""

    def __init__(self, vocab_size: int, seq_len: int = 16, mask_every: int = 0, seed: int = 0):
        self.vocab_size, self.seq_len, self.mask_every, self.seed = vocab_size, seq_len, mask_every, seed
        self.position = 0

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=generator)
        targets = tokens[1:].clone()
        if self.mask_every:
            targets[: (index % self.mask_every) * 3] = -100  # rows carry different numbers of loss tokens
        return tokens[:-1], targets

    def next_batch(self, batch_size: int):
        rows = [self.row(self.position + i) for i in range(batch_size)]
        self.position += batch_size
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def quick_config(**overrides) -> TrainConfig:
    settings = dict(max_steps=3, batch_size=4, micro_batch_size=4, lr=1e-2, warmup_steps=1, dtype="float32",
                    progress=False, log_every=1, peak_flops=1e12)
    return TrainConfig(**{**settings, **overrides})


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    schedule = Schedule(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert schedule.lr_at(0) == pytest.approx(1e-4) and schedule.lr_at(9) == pytest.approx(1e-3)
    assert schedule.lr_at(60) == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the cosine
    assert schedule.lr_at(110) == pytest.approx(1e-4) and schedule.lr_at(500) == pytest.approx(1e-4)
    decay = [schedule.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_weight_decay_only_on_matrices(tokenizer):
    model = make_tiny_model(tokenizer)
    optimizer = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_accumulation_equals_one_big_batch_with_masked_targets(tmp_path, tokenizer):
    """micro 4 x 1 == micro 2 x 2 == micro 1 x 4, and the loss is a mean over all loss tokens of the step.

    Only summation order differs, so weights agree to float rounding (amplified a little by Adam)."""
    weights, losses = [], []
    for micro in (4, 2, 1):
        model = make_tiny_model(tokenizer)
        result = train(model, RandomRows(tokenizer.vocab_size, mask_every=3), None,
                       quick_config(micro_batch_size=micro), tmp_path / f"m{micro}", tokenizer)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        losses.append(result.train_loss)
        if micro == 4:
            first_loss = json.loads((tmp_path / "m4" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == pytest.approx(losses[0], abs=1e-5)
    assert (weights[0] - weights[1]).abs().max() < 1e-4 and (weights[0] - weights[2]).abs().max() < 1e-4
    inputs, targets = RandomRows(tokenizer.vocab_size, mask_every=3).next_batch(4)
    logits = make_tiny_model(tokenizer)(inputs)
    naive = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert first_loss == pytest.approx(naive.item(), abs=1e-4)
    assert result.steps == 3


def test_fused_training_forward_matches_the_reference(tokenizer):
    """TrainingTransformer (fused qkv / gate-up, cached rope) == Transformer: logits and gradients."""
    reference = make_tiny_model(tokenizer)
    fused = TrainingTransformer(reference.config)
    fused.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    logits = [model(tokens) for model in (reference, fused)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    for model, out in zip((reference, fused), logits):
        (out.square().mean()).backward()
    for (name, param), other in zip(reference.named_parameters(), fused.parameters()):
        assert torch.allclose(param.grad, other.grad, atol=1e-6), name
    positions = torch.arange(5)[None] + 7  # anything but the training case takes the reference path
    assert torch.equal(fused(tokens[:1, :5], positions), Transformer.forward(fused, tokens[:1, :5], positions))


def test_bf16_autocast_tracks_fp32(tmp_path, tokenizer):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = make_tiny_model(tokenizer)
        losses[dtype] = train(model, RandomRows(tokenizer.vocab_size), None, quick_config(dtype=dtype),
                              tmp_path / dtype, tokenizer).train_loss
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
    assert read_safetensors(tmp_path / "bfloat16" / "model.safetensors")["embed.weight"].dtype == torch.float32


# -- the command -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    tokenizer.save(folder / "tokenizer.json")
    return folder


def pretrain_args(out: Path, cache: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", "--preset", "tiny", "--data", str(FIXTURES / "shakespeare_sample.txt"),
            str(FIXTURES / "dictionary_sample.txt"), "--out", str(out), "--tokenizer", str(tokenizer_dir),
            "--seq-len", "32", "--batch-tokens", "128", "--micro-batch-size", "2", "--dtype", "float32",
            "--cache-dir", str(cache), "--val-fraction", "0.05", "--eval-batches", "2", "--no-progress", *extra]


def test_resume_continues_exactly(tmp_path, tokenizer_dir, capsys):
    """6 steps straight == 3 steps, stop, resume (no other flags), 3 more: same weights (fp32 CPU)."""
    cache = tmp_path / "cache"
    assert main(pretrain_args(tmp_path / "straight", cache, tokenizer_dir, "--max-steps", "6", "--save-every", "3",
                              "--eval-every", "2")) == 0
    assert main(pretrain_args(tmp_path / "split", cache, tokenizer_dir, "--max-steps", "6", "--save-every", "3",
                              "--eval-every", "2", "--stop-at", "3")) == 0
    assert json.loads((tmp_path / "split" / "training_state.json").read_text())["step"] == 3
    assert main(["pretrain", "--out", str(tmp_path / "split"), "--resume", "--no-progress"]) == 0
    assert "resuming at step 3" in capsys.readouterr().err
    straight = read_safetensors(tmp_path / "straight" / "model.safetensors")
    resumed = read_safetensors(tmp_path / "split" / "model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, open(folder / "metrics.jsonl"))]
              for folder in (tmp_path / "straight", tmp_path / "split")]
    assert losses[0] == losses[1]


def test_checkpoint_records_training_and_feedback(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "model"
    log_file = tmp_path / "live.jsonl"
    assert main(pretrain_args(out, tmp_path / "cache", tokenizer_dir, "--max-steps", "4",
                              "--log-file", str(log_file))) == 0
    err = capsys.readouterr().err
    assert "parameters" in err and "MFLOPs/token" in err and "kept: 2 documents" in err
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["preset"] == "tiny" and training["steps"] == 4 and training["tokens_seen"] == 4 * 4 * 32
    assert training["train_loss"] > 0 and training["val_loss"] > 0
    assert len(training["data"]["sources"]) == 2 and training["data"]["tokens"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tokens_per_s"} <= set(records[0]) and any("val_ppl" in r for r in records)
    assert log_file.read_text() == (out / "metrics.jsonl").read_text()
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".model.*"))  # no temp folders left behind


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def test_command_errors_are_one_line(tmp_path, tokenizer_dir, tiny_model_dir, capsys):
    cache = tmp_path / "cache"
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a good line of training text"}\n{"text": oops}\n')
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "tiny"}\n')
    other_model = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other_model)
    before = _folder_digest(other_model)
    resumable = tmp_path / "resumable"
    assert main(pretrain_args(resumable, cache, tokenizer_dir, "--max-steps", "1")) == 0
    capsys.readouterr()

    def data_args(path: Path, *extra: str) -> list[str]:
        args = pretrain_args(tmp_path / "new", cache, tokenizer_dir, "--max-steps", "1", *extra)
        index = args.index("--data")
        return args[:index + 1] + [str(path)] + args[index + 3:]

    cases = [
        (data_args(tmp_path / "missing.txt"), "missing.txt: no such file or folder"),
        (data_args(short), "empty after cleaning"),
        (data_args(bad_json, "--strict"), f"{bad_json}:2: not valid JSON"),
        (pretrain_args(tmp_path / "new", cache, tokenizer_dir, "--max-steps", "1", "--seq-len", "1000"),
         "--seq-len 1000: must be between 1 and the tiny preset's context of 256"),
        (pretrain_args(other_model, cache, tokenizer_dir, "--max-steps", "1"), "already holds another model"),
        (["pretrain", "--out", str(resumable), "--resume", "--preset", "mini"], "cannot resume"),
        (["pretrain", "--out", str(other_model), "--resume"], "nothing to resume"),
        (pretrain_args(tmp_path / "new", cache, tokenizer_dir), "give --max-steps or --tokens"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, message
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], err
        assert "Traceback" not in err and sum(line.startswith("error") for line in lines) == 1, err
    assert _folder_digest(other_model) == before
    assert not (tmp_path / "new").exists()


def test_sigint_saves_a_checkpoint_then_exits(tmp_path, tokenizer_dir):
    out, log_file = tmp_path / "model", tmp_path / "live.jsonl"
    args = pretrain_args(out, tmp_path / "cache", tokenizer_dir, "--max-steps", "100000", "--log-file",
                         str(log_file), "--save-every", "0", "--eval-every", "0")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (log_file.exists() and log_file.read_text()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "continue with: hearth pretrain" in err
    state = json.loads((out / "training_state.json").read_text())
    assert state["step"] >= 1
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == state["step"]
    assert math.isfinite(state["train_loss"])
