"""SFT: the assistant-only loss mask, packing, bad input, and short runs (full, LoRA, merge)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, make_tiny_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import HearthError
from model.tokenizer import END, Tokenizer, TokenizerInfo
from cli import main as cli
from trainer.evaluate import evaluate_chat_set
from trainer.chat_data import (
    IGNORE_INDEX,
    ChatDataError,
    ChatSet,
    PackedChatBatches,
    encode_for_training,
    pack_rows,
    read_chats,
)
from trainer.data import DataError
from trainer.sft import load_model

CHATS = FIXTURES / "chats_sample.jsonl"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Define cat."},
    {"role": "assistant", "content": "A small feline."},
    {"role": "user", "content": "And dog?"},
    {"role": "assistant", "content": "A canine."},
]


@pytest.fixture(autouse=True)
def only_sft_commands(monkeypatch):
    """The real CLI entry point, isolated from other command modules."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["trainer.sft_commands"])


def hearth(*argv) -> int:
    return cli.main([str(a) for a in argv])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- the mask -------------------------------------------------------------------------------


def test_mask_covers_assistant_replies_and_their_end_marker(tokenizer):
    ids, mask = encode_for_training(tokenizer, CONVERSATION)
    assert len(ids) == len(mask)
    end = tokenizer.token_id(END)
    # The masked tokens, split at each <|end|>, are exactly the two replies.
    masked = [token for token, bit in zip(ids, mask) if bit]
    replies, current = [], []
    for token in masked:
        current.append(token)
        if token == end:
            replies.append(tokenizer.decode(current[:-1]))
            current = []
    assert replies == ["A small feline.", "A canine."] and not current
    # Nothing from the system or user turns, nor any role marker, is learned.
    unmasked = tokenizer.decode([t for t, bit in zip(ids, mask) if not bit], skip_special=False)
    assert "Define cat." in unmasked and "Be brief." in unmasked and "feline" not in unmasked


def test_packed_targets_are_the_assistant_tokens(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 3)
    chats, report = read_chats([data], tokenizer, dedupe=False)
    assert len(chats) == 3 and read_chats([data], tokenizer)[1].duplicates == 2
    batches = PackedChatBatches(chats, seq_len=len(chats.chat(0)[0]) * 3 - 1, pad_id=tokenizer.pad_id, shuffle=False)
    inputs, targets = batches.next_batch(1)
    ids, mask = encode_for_training(tokenizer, CONVERSATION)
    row = ids * 3
    assert inputs[0].tolist() == row[:-1]
    expected = [token if bit else IGNORE_INDEX for token, bit in zip(row[1:], (mask * 3)[1:])]
    assert targets[0].tolist() == expected


def test_jinja_template_mask_by_prefix_rendering(tokenizer):
    template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    jinja = Tokenizer(tokenizer.backend, TokenizerInfo(chat_template="jinja", jinja_template=template))
    ids, mask = encode_for_training(jinja, CONVERSATION)
    masked = jinja.decode([t for t, bit in zip(ids, mask) if bit], skip_special=False)
    assert masked == "A small feline.<|end|>\nA canine.<|end|>\n"


# --- packing --------------------------------------------------------------------------------


def test_pack_rows_keeps_every_chat_whole_and_once():
    lengths = np.random.default_rng(0).integers(5, 60, 500)
    rows = pack_rows(lengths, np.random.default_rng(1).permutation(500), row_len=129)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[row]) <= 129 for row in rows)
    assert lengths.sum() / (129 * len(rows)) > 0.9  # best fit wastes little


def test_batch_source_resumes_exactly(tokenizer):
    chats, _ = read_chats([CHATS], tokenizer, max_len=65, limit=60)
    source = PackedChatBatches(chats, seq_len=64, pad_id=tokenizer.pad_id, seed=3)
    rows_per_epoch = source.rows_per_epoch()
    source.next_batch(rows_per_epoch - 2)  # the next batch crosses into epoch 2
    saved = json.loads(json.dumps(source.state_dict()))
    expected = [source.next_batch(4) for _ in range(3)]
    resumed = PackedChatBatches(chats, seq_len=64, pad_id=tokenizer.pad_id, seed=0)
    resumed.load_state_dict(saved)
    for want in expected:
        got = resumed.next_batch(4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert resumed.epoch == 1


# --- bad input ------------------------------------------------------------------------------


def test_bad_records_are_skipped_with_location_or_stop_with_strict(tokenizer, tmp_path):
    records = [
        {"messages": CONVERSATION[1:3]},
        "{not json",
        {"messages": [{"role": "wizard", "content": "hi"}, CONVERSATION[2]]},
        {"messages": [CONVERSATION[1]]},
        {"kind": "no messages"},
        {"messages": CONVERSATION},
    ]
    data = write_jsonl(tmp_path / "c.jsonl", records)
    chats, report = read_chats([data], tokenizer)
    assert len(chats) == 2 and report.skipped == 4
    assert sorted(p.split(": ")[0] for p in report.problems) == [f"{data}:{n}" for n in (2, 3, 4, 5)]
    assert f"{data}:4: chat has no assistant turn" in report.problems[-1]
    for line, reason in ((2, "not valid JSON"), (3, "unknown role 'wizard'"), (4, "no assistant turn")):
        strict_data = write_jsonl(tmp_path / f"strict{line}.jsonl", [records[0], records[line - 1]])
        with pytest.raises(HearthError, match=f"^{strict_data}:2: .*{reason}"):
            read_chats([strict_data], tokenizer, strict=True)
    with pytest.raises(DataError, match="no such file"):
        read_chats([tmp_path / "missing.jsonl"], tokenizer)
    with pytest.raises(ChatDataError, match="no usable chats"):
        read_chats([write_jsonl(tmp_path / "bad.jsonl", ["[1, 2"])], tokenizer)


def test_long_chats_truncated_or_dropped(tokenizer):
    lengths = [len(encode_for_training(tokenizer, json.loads(line)["messages"])[0])
               for line in CHATS.read_text().splitlines()[:50]]
    max_len = sorted(lengths)[40]
    truncated, report = read_chats([CHATS], tokenizer, max_len=max_len, limit=50)
    assert len(truncated) == 50 and report.truncated == sum(n > max_len for n in lengths)
    assert truncated.lengths().max() == max_len
    dropped, report = read_chats([CHATS], tokenizer, max_len=max_len, long_chats="drop", limit=50)
    assert report.dropped_long == sum(n > max_len for n in lengths)
    assert dropped.lengths().max() <= max_len


def test_cli_bad_input_is_one_line_and_leaves_no_output(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    cases = [
        (["--data", tmp_path / "missing.jsonl"], "no such file or folder"),
        (["--data", CHATS, "--merge"], "--merge needs --lora-rank"),
        (["--data", write_jsonl(tmp_path / "b.jsonl", ["{x"]), "--strict"], "b.jsonl:1: not valid JSON"),
        (["--data", CHATS, "--lora-rank", 2, "--lora-targets", "q,attn"], "unknown module 'attn'"),
        (["--data", CHATS, "--epochs", 1, "--max-steps", 3], "not both"),
        (["--data", CHATS, "--upsample", "greetings.jsonl"], "expected FILE:N"),
        (["--data", CHATS, "--upsample", "greetings.jsonl:0"], "expected FILE:N"),
    ]
    for extra, message in cases:
        assert hearth("sft", "--base", tiny_model_dir, "--out", out, *extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
        assert not out.exists()
    # A folder of unrelated files is never replaced; a model folder needs --overwrite.
    (out / "notes").mkdir(parents=True)
    assert hearth("sft", "--base", tiny_model_dir, "--data", CHATS, "--out", out, "--overwrite") == 1
    assert "holds no Hearth model" in capsys.readouterr().err and (out / "notes").is_dir()
    assert hearth("sft", "--base", tiny_model_dir, "--data", CHATS, "--out", tiny_model_dir, "--overwrite") == 1
    assert "base model's folder" in capsys.readouterr().err


# --- runs -----------------------------------------------------------------------------------

RUN = ["--data", CHATS, "--seq-len", 128, "--batch-size", 8, "--no-progress"]


def assistant_loss(model, tokenizer) -> float:
    chats, _ = read_chats([CHATS], tokenizer, max_len=129, limit=80)
    total, _ = evaluate_chat_set(model.eval(), chats, tokenizer.pad_id)
    return total.mean


def test_full_sft_lowers_assistant_loss(capsys, tmp_path, tiny_model_dir, tokenizer):
    out = tmp_path / "full"
    before = assistant_loss(load_checkpoint(tiny_model_dir).model, tokenizer)
    assert hearth("sft", "--base", tiny_model_dir, "--out", out, *RUN, "--max-steps", 6, "--lr", 3e-3) == 0
    tuned = load_checkpoint(out)
    after = assistant_loss(tuned.model, tokenizer)
    assert after < before - 0.3, (before, after)
    training = tuned.metadata["training"]
    assert training["task"] == "sft" and training["steps"] == 6 and training["lora"] is None
    assert training["chats"] == 401 and training["loss"] == "assistant tokens only"


def test_upsample_repeats_a_files_chats_past_deduplication(capsys, tmp_path, tiny_model_dir, tokenizer):
    greetings = write_jsonl(tmp_path / "greetings.jsonl", [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hello! Ask me a word."}]},
        {"messages": [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You are welcome!"}]},
    ])
    out = tmp_path / "upsampled"
    assert hearth("sft", "--base", tiny_model_dir, "--out", out, *RUN, "--max-steps", 1,
                  "--upsample", f"{greetings}:5") == 0
    training = load_checkpoint(out).metadata["training"]
    assert training["chats"] == 401 + 2 * 5 and training["upsample"] == [f"{greetings}:5"]
    # The set is the parts in order, each chat whole.
    base, _ = read_chats([CHATS], tokenizer, limit=3)
    extra, _ = read_chats([greetings], tokenizer)
    joined = ChatSet.concatenate([base, extra, extra])
    assert len(joined) == 7 and joined.num_tokens == base.num_tokens + 2 * extra.num_tokens
    for index, (part, part_index) in enumerate([(base, 0), (base, 1), (base, 2), (extra, 0), (extra, 1), (extra, 0)]):
        assert all(np.array_equal(a, b) for a, b in zip(joined.chat(index), part.chat(part_index)))


def test_text_data_joins_the_rows_with_the_loss_on_every_token(tmp_path, tiny_model_dir, tokenizer):
    """--text-data: continued pretraining mixed in. Each text is its tokens and a blank line, all of them
    learned; a chat among the texts is a bad record, skipped and counted; a text among --data chats still is."""
    entries = ["lantern (noun): a light with a transparent case", "happy (adjective): enjoying joy"]
    texts = write_jsonl(tmp_path / "dictionary.jsonl", [{"text": entry} for entry in entries] + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    read, report = read_chats([texts], tokenizer, texts=True)
    assert len(read) == 2 and report.skipped == 1
    for index, entry in enumerate(entries):
        tokens, mask = read.chat(index)
        assert list(tokens) == tokenizer.encode(entry + "\n\n", add_bos=True) and mask.all()
    out = tmp_path / "with-text"
    assert hearth("sft", "--base", tiny_model_dir, "--out", out, *RUN, "--max-steps", 1, "--text-data", texts) == 0
    training = load_checkpoint(out).metadata["training"]
    assert training["chats"] == 401 + 2 and training["text_data"] == [str(texts)]
    with pytest.raises(ChatDataError, match="no usable chats"):
        read_chats([write_jsonl(tmp_path / "only-text.jsonl", [{"text": entries[0]}])], tokenizer)


def test_lora_sft_merge_equals_adapter_and_refuses_other_base(capsys, tmp_path, tiny_model_dir, tokenizer):
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert hearth("sft", "--base", tiny_model_dir, "--out", adapter_dir, *RUN, "--max-steps", 4,
                  "--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", "q,v,down", "--lr", 1e-2) == 0
    assert sorted(p.name for p in adapter_dir.iterdir()) >= ["adapter.safetensors", "adapter_config.json"]
    assert hearth("merge-lora", tiny_model_dir, adapter_dir, "--out", merged_dir) == 0
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = load_model(adapter_dir).model(tokens)
        merged = load_checkpoint(merged_dir).model(tokens)
        base = load_checkpoint(tiny_model_dir).model(tokens)
    assert (adapted - base).abs().max() > 1e-4  # training moved the adapter off zero
    assert (merged - adapted).abs().max() <= 1e-5
    assert load_checkpoint(merged_dir).metadata["training"]["lora"]["targets"] == ["q", "v", "down"]

    other = tmp_path / "other"
    save_checkpoint(other, make_tiny_model(tokenizer, seed=5), tokenizer)
    capsys.readouterr()
    assert hearth("merge-lora", other, adapter_dir, "--out", tmp_path / "bad") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "weights of" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    assert hearth("merge-lora", tiny_model_dir, adapter_dir, "--out", merged_dir) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_sft_merge_flag_writes_a_loadable_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "merged"
    assert hearth("sft", "--base", tiny_model_dir, "--out", out, *RUN, "--max-steps", 2, "--lora-rank", 2,
                  "--merge", "--device", "auto") == 0  # auto: cuda when available, as in hearth pretrain
    checkpoint = load_checkpoint(out)
    assert checkpoint.metadata["training"]["merged"] is True
    assert not (out / "adapter_config.json").exists() and (out / "metrics.jsonl").is_file()


def test_lora_resume_is_exact(tmp_path, tiny_model_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    lora = [*RUN, "--max-steps", 3, "--lora-rank", 2, "--lora-dropout", 0.1, "--lr", 1e-2]
    assert hearth("sft", "--base", tiny_model_dir, "--out", straight, *lora) == 0
    assert hearth("sft", "--base", tiny_model_dir, "--out", resumed, *lora, "--stop-at", 1) == 0
    assert json.loads((resumed / "adapter_config.json").read_text())["training"]["steps"] == 1
    assert hearth("sft", "--base", tiny_model_dir, "--out", resumed, *lora, "--resume") == 0
    want = load_file(straight / "adapter.safetensors")
    got = load_file(resumed / "adapter.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # Resuming with other data is refused.
    assert hearth("sft", "--base", tiny_model_dir, "--out", resumed, *lora, "--resume", "--seq-len", 64) == 1


def test_fused_training_model_matches_reference(tokenizer):
    from trainer.sft import fused_training_model

    reference = make_tiny_model(tokenizer)
    fused = fused_training_model(reference)
    assert fused.lm_head.weight is fused.embed.weight
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(fused.parameters(), reference.parameters()))
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_loss_at_masked_positions_equals_full_logits_loss(tokenizer, fused):
    """The head runs only where targets carry loss; loss and gradients match the full-logits path."""
    from trainer.loop import IGNORE_INDEX, token_loss_sum
    from trainer.sft import fused_training_model

    model = make_tiny_model(tokenizer).train()
    model = fused_training_model(model) if fused else model
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=generator)
    targets = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=generator)
    targets[:, :10] = IGNORE_INDEX  # a masked prompt

    class Wrapper(torch.nn.Module):  # like DDP: only forward is visible
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            return self.inner(tokens)

    def loss_and_grads(module):
        model.zero_grad()
        loss = token_loss_sum(module, inputs, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    masked_loss, masked_grads = loss_and_grads(model)
    full_loss, full_grads = loss_and_grads(Wrapper(model))
    torch.testing.assert_close(masked_loss, full_loss, rtol=1e-5, atol=1e-5)
    for masked, full in zip(masked_grads, full_grads):
        torch.testing.assert_close(masked, full, rtol=1e-4, atol=1e-6)


def test_lora_flops_count_no_weight_gradients_for_the_frozen_base(capsys, tmp_path, tiny_model_dir):
    """The MFU a LoRA run reports: forward and input gradients over base + adapter (4 per weight),
    weight gradients for the adapter only (2 more), so 4N + 6A instead of full training's 6N."""
    def announced_mflops(out: Path, *extra) -> float:
        capsys.readouterr()
        assert hearth("sft", "--base", tiny_model_dir, "--out", out, *RUN, "--max-steps", 1, *extra) == 0
        return float(capsys.readouterr().err.split(" MFLOPs/token")[0].rsplit(", ", 1)[1])

    full = announced_mflops(tmp_path / "full")
    lora = announced_mflops(tmp_path / "lora", "--lora-rank", 4)
    config = load_checkpoint(tiny_model_dir).config
    weights = config.num_params(include_embeddings=False) + config.vocab_size * config.dim
    attention = 12 * config.n_layers * config.dim * 128
    adapter = sum(v.numel() for v in load_file(tmp_path / "lora" / "adapter.safetensors").values())
    assert full == pytest.approx((6 * weights + attention) / 1e6, abs=0.06)
    assert lora == pytest.approx((4 * weights + 6 * adapter + attention) / 1e6, abs=0.06)
