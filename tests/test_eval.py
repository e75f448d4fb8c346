"""`hearth eval`: JSON on text and chats, checked against naive token-by-token loops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FIXTURES
from model.chat import encode_chat
from model.checkpoint import load_checkpoint
from cli import main as cli

CHATS = FIXTURES / "chats_sample.jsonl"
TEXT = FIXTURES / "shakespeare_sample.txt"


@pytest.fixture(autouse=True)
def only_sft_commands(monkeypatch):
    """The real CLI entry point, isolated from other command modules."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["trainer.sft_commands"])


def main(argv: list[str]) -> int:
    return cli.main(argv)


def run_eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def naive_text_loss(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Sum of -log p(token | window so far), one window and one position at a time."""
    total, count = 0.0, 0
    start = 0
    while start < len(ids) - 1:
        window = ids[start : start + seq_len + 1]
        with torch.no_grad():
            logits = model(torch.tensor([window[:-1]]))[0].double()
        for position in range(len(window) - 1):
            total -= float(torch.log_softmax(logits[position], -1)[window[position + 1]])
            count += 1
        start += seq_len
    return total, count


def test_eval_text_matches_naive_loop(capsys, tiny_model_dir, tokenizer):
    result = run_eval(capsys, tiny_model_dir, "--data", TEXT, "--max-tokens", 300, "--seq-len", 64)
    assert set(result) >= {"checkpoint", "data", "tokens", "loss", "perplexity"}
    assert result["tokens"] == 300
    model = load_checkpoint(tiny_model_dir).model
    ids = tokenizer.encode(TEXT.read_text(), add_bos=True)[:301]
    total, count = naive_text_loss(model, ids, seq_len=64)
    assert count == 300
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # An untrained model is near-uniform over the vocabulary.
    assert 0.5 * tokenizer.vocab_size < result["perplexity"] < 2 * tokenizer.vocab_size


def test_eval_chats_scores_assistant_tokens_only(capsys, tiny_model_dir, tokenizer):
    result = run_eval(capsys, tiny_model_dir, "--data", CHATS, "--limit", 12, "--batch-tokens", 300)
    assert result["chats"] == 12
    model = load_checkpoint(tiny_model_dir).model
    total, count = 0.0, 0
    for line in CHATS.read_text().splitlines()[:12]:
        chat = encode_chat(tokenizer, json.loads(line)["messages"], add_generation_prompt=False)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([chat.ids[:-1]]))[0].double(), -1)
        for position in range(len(chat.ids) - 1):
            if chat.loss_mask[position + 1]:
                total -= float(log_probs[position, chat.ids[position + 1]])
                count += 1
    assert result["assistant_tokens"] == count
    assert result["assistant_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["assistant_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_bf16_close_to_fp32(capsys, tiny_model_dir):
    exact = run_eval(capsys, tiny_model_dir, "--data", CHATS, "--limit", 20)
    fast = run_eval(capsys, tiny_model_dir, "--data", CHATS, "--limit", 20, "--bf16")
    assert fast["assistant_loss"] == pytest.approx(exact["assistant_loss"], rel=2e-2)


def test_eval_jsonl_text_records(capsys, tmp_path, tiny_model_dir):
    lines = TEXT.read_text().split("\n\n")[:5]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    result = run_eval(capsys, tiny_model_dir, "--data", data)
    assert "perplexity" in result and result["tokens"] > 100


def test_eval_bad_input_is_one_line_error(capsys, tmp_path, tiny_model_dir):
    assert main(["eval", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl")]) == 1
    assert capsys.readouterr().err.strip() == f"error: --data {tmp_path / 'nope.jsonl'}: no such file or folder"
    assert main(["eval", str(tmp_path), "--data", str(CHATS)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(CHATS.read_text().splitlines()[0] + "\n{oops\n")
    assert main(["eval", str(tiny_model_dir), "--data", str(bad), "--strict"]) == 1
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_eval_on_quantized_checkpoint(capsys, tmp_path, tiny_model_dir):
    from model.quant import quantize_checkpoint

    quantize_checkpoint(tiny_model_dir, tmp_path / "int8", "int8")
    exact = run_eval(capsys, tiny_model_dir, "--data", CHATS, "--limit", 30)
    quantized = run_eval(capsys, tmp_path / "int8", "--data", CHATS, "--limit", 30, "--bf16")
    assert quantized["assistant_tokens"] == exact["assistant_tokens"]
    assert quantized["assistant_loss"] == pytest.approx(exact["assistant_loss"], rel=2e-2)
