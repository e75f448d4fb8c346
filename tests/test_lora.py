"""LoRA: zero-init equals the base, merge equals base + adapter, adapters refuse other bases."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from model.checkpoint import load_checkpoint, save_checkpoint
from trainer.lora import (
    ADAPTER_CONFIG,
    AdapterError,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    attach_adapter,
    check_base,
    lora_modules,
    merge_lora,
    read_adapter,
    save_adapter,
)


def sample_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed: int = 1) -> None:
    """Non-zero B so the adapters actually change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=generator) * 0.05)


def test_zero_initialised_adapter_equals_base(tokenizer):
    base = make_tiny_model(tokenizer)
    tokens = sample_tokens(tokenizer.vocab_size)
    expected = base(tokens)
    adapted = make_tiny_model(tokenizer)
    trainable = apply_lora(adapted, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    adapted.train()  # dropout on: with B = 0 it must still change nothing
    assert torch.equal(adapted(tokens), expected)
    # Only A and B train: 7 targets x 2 layers x (A, B).
    assert len(trainable) == 28
    assert all(p.requires_grad for p in trainable)
    assert sum(p.requires_grad for p in adapted.parameters()) == len(trainable)


def test_lora_forward_matches_explicit_formula(tokenizer):
    model = make_tiny_model(tokenizer)
    apply_lora(model, LoRAConfig(rank=2, alpha=6, targets=("q",)))
    randomize_adapters(model)
    layer = model.layers[0].attn.q
    assert isinstance(layer, LoRALinear)
    x = torch.randn(3, 64)
    expected = x @ layer.base.weight.t() + 3.0 * (x @ layer.lora_a.t() @ layer.lora_b.t())
    torch.testing.assert_close(layer(x), expected)


def test_targets_select_modules(tokenizer):
    model = make_tiny_model(tokenizer)
    apply_lora(model, LoRAConfig(rank=2, targets=("v", "down")))
    assert sorted(lora_modules(model)) == [
        "layers.0.attn.v", "layers.0.mlp.down", "layers.1.attn.v", "layers.1.mlp.down",
    ]
    with pytest.raises(AdapterError, match="unknown module 'qkv'"):
        LoRAConfig(rank=2, targets=("qkv",))
    with pytest.raises(AdapterError, match="--lora-rank"):
        LoRAConfig(rank=0)


def test_merged_model_equals_base_plus_adapter(tokenizer):
    model = make_tiny_model(tokenizer)
    apply_lora(model, LoRAConfig(rank=4, alpha=16))
    randomize_adapters(model)
    model.eval()
    tokens = sample_tokens(tokenizer.vocab_size)
    with torch.no_grad():
        adapted_logits = model(tokens)
        base_logits = make_tiny_model(tokenizer)(tokens)
        merged_logits = merge_lora(model)(tokens)
    assert not lora_modules(model)
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    assert (merged_logits - adapted_logits).abs().max() <= 1e-5


def test_adapter_round_trip_and_base_checks(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    save_checkpoint(base_dir, make_tiny_model(tokenizer), tokenizer)
    base = load_checkpoint(base_dir)
    apply_lora(base.model, LoRAConfig(rank=3, alpha=6, targets=("q", "up")))
    randomize_adapters(base.model)
    tokens = sample_tokens(tokenizer.vocab_size)
    with torch.no_grad():
        expected = base.model(tokens)
    save_adapter(tmp_path / "adapter", base.model, LoRAConfig(rank=3, alpha=6, targets=("q", "up")),
                 base_dir, base.metadata, training={"task": "sft"})
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["rank"] == 3 and saved["alpha"] == 6 and saved["targets"] == ["q", "up"]
    assert saved["base"] == str(base_dir.resolve()) and len(saved["base_config_hash"]) == 64

    adapter = read_adapter(tmp_path / "adapter")
    fresh = load_checkpoint(base_dir)
    check_base(adapter, base_dir, fresh.metadata)
    with torch.no_grad():
        assert torch.equal(attach_adapter(fresh.model, adapter)(tokens), expected)

    # Same architecture, other weights: refused unless forced.
    other_dir = tmp_path / "other"
    save_checkpoint(other_dir, make_tiny_model(tokenizer, seed=7), tokenizer)
    other = load_checkpoint(other_dir)
    with pytest.raises(AdapterError, match="weights of .* differ"):
        check_base(adapter, other_dir, other.metadata)
    check_base(adapter, other_dir, other.metadata, force=True)

    # Other architecture: always refused.
    wide_dir = tmp_path / "wide"
    save_checkpoint(wide_dir, make_tiny_model(tokenizer, n_layers=3), tokenizer)
    with pytest.raises(AdapterError, match="architecture or tokenizer differs"):
        check_base(adapter, wide_dir, load_checkpoint(wide_dir).metadata, force=True)


def test_bad_adapter_folders(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(tmp_path / "bad")
