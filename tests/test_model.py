"""Decoder: presets, config validation, cache equivalence, positions."""

import pytest
import torch

from model.config import PRESETS, ModelConfig
from model.decoder import DenseKVCache, Transformer, rope_inverse_frequencies
from model.errors import ConfigError
from tests.conftest import make_tiny_model


def test_preset_sizes_match_the_design_table():
    assert ModelConfig.from_preset("tiny", vocab_size=512).num_params() < 1_000_000
    assert 10e6 <= ModelConfig.from_preset("mini", vocab_size=8192).num_params() <= 20e6
    small = ModelConfig.from_preset("small", vocab_size=32000)
    assert (small.dim, small.n_layers, small.n_heads, small.ffn_dim, small.max_seq_len) == (768, 12, 12, 3072, 512)
    assert small.num_params() == 162_417_408  # the llama.cpp anchor's "small" shape
    medium, large = ModelConfig.from_preset("medium"), ModelConfig.from_preset("large")
    assert (medium.dim, medium.n_layers, medium.n_heads, medium.ffn_dim, medium.max_seq_len) == (1024, 24, 16, 4096, 1024)
    assert (large.dim, large.n_layers, large.n_heads, large.ffn_dim, large.max_seq_len) == (2048, 32, 32, 8192, 2048)


def test_num_params_counts_the_real_module(tokenizer):
    for tie in (True, False):
        model = make_tiny_model(tokenizer, tie_embeddings=tie)
        assert sum(p.numel() for p in model.parameters()) == model.config.num_params()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=64, n_heads=5), "n_heads=5 does not divide dim=64"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
        (dict(dim=0), "dim must be a positive integer"),
    ],
)
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny, mini, small, medium, large"):
        ModelConfig.from_preset("huge")
    assert set(PRESETS) == {"tiny", "mini", "small", "medium", "large"}


def test_config_json_round_trip_with_rope_scaling():
    config = ModelConfig(dim=64, n_heads=4, rope_scaling=dict(factor=8.0, original_max_position_embeddings=64))
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_llama3_rope_scaling_divides_low_frequencies_only():
    base = ModelConfig(dim=128, n_heads=2)
    scaled = ModelConfig(dim=128, n_heads=2, rope_scaling=dict(factor=8.0, original_max_position_embeddings=64))
    plain, stretched = rope_inverse_frequencies(base), rope_inverse_frequencies(scaled)
    assert torch.equal(plain[:4], stretched[:4])  # highest frequencies untouched
    assert torch.allclose(stretched[-1], plain[-1] / 8)  # lowest divided by factor


def test_incremental_decoding_with_cache_equals_full_forward(tokenizer):
    model = make_tiny_model(tokenizer)
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 12))
    full = model(tokens)
    cache = DenseKVCache(model.config, batch_size=3, max_len=32)
    pieces = [model(tokens[:, :5], torch.arange(5).expand(3, 5), cache)]
    for pos in range(5, 12):
        pieces.append(model(tokens[:, pos : pos + 1], torch.full((3, 1), pos), cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_at_different_positions_in_one_batch(tokenizer):
    """Row 0 decodes at position 7 while row 1 decodes at position 3 in the same forward."""
    model = make_tiny_model(tokenizer)
    seq_a, seq_b = torch.randint(0, 500, (1, 8)), torch.randint(0, 500, (1, 4))
    cache = DenseKVCache(model.config, batch_size=2, max_len=16)
    prefix = torch.zeros(2, 7, dtype=torch.long)
    prefix[0], prefix[1, :3] = seq_a[0, :7], seq_b[0, :3]
    model(prefix, torch.arange(7).expand(2, 7), cache)  # row 1's tail (pos 3..6) is garbage, overwritten next
    step = torch.tensor([[seq_a[0, 7]], [seq_b[0, 3]]])
    logits = model(step, torch.tensor([[7], [3]]), cache)[:, 0]
    torch.testing.assert_close(logits[0], model(seq_a)[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(seq_b)[0, -1], atol=1e-5, rtol=1e-5)


def test_hidden_states_then_lm_head_equals_forward(tokenizer):
    model = make_tiny_model(tokenizer, tie_embeddings=False)
    tokens = torch.randint(0, 500, (2, 6))
    torch.testing.assert_close(model.lm_head(model.hidden_states(tokens)), model(tokens))


def test_bf16_forward_runs_and_is_close_to_fp32(tokenizer):
    model = make_tiny_model(tokenizer)
    tokens = torch.randint(0, 500, (1, 16))
    reference = model(tokens)
    low = Transformer(model.config)
    low.load_state_dict(model.state_dict())
    logits = low.to(torch.bfloat16)(tokens)
    assert logits.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(logits.float().flatten(), reference.flatten(), dim=0) > 0.99
