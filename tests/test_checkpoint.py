"""Checkpoint folders: round trip, mmap loading, clear errors, atomic saves."""

import json
import shutil

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint, write_folder_atomically
from model.errors import CheckpointError
from tests.conftest import make_tiny_model


def test_round_trip_gives_identical_logits(tmp_path, tokenizer):
    for tie in (True, False):
        model = make_tiny_model(tokenizer, tie_embeddings=tie)
        save_checkpoint(tmp_path / f"m{tie}", model, tokenizer, model_card="# card\n")
        loaded = load_checkpoint(tmp_path / f"m{tie}")
        tokens = torch.randint(0, tokenizer.vocab_size, (2, 9))
        assert torch.equal(loaded.model(tokens), model(tokens))
        assert (loaded.model.lm_head.weight is loaded.model.embed.weight) == tie
        assert loaded.tokenizer.encode("hello there") == tokenizer.encode("hello there")
        assert (tmp_path / f"m{tie}" / "README.md").read_text() == "# card\n"


def test_config_json_carries_architecture_tokenizer_and_quantization(tiny_model_dir):
    metadata = json.loads((tiny_model_dir / "config.json").read_text())
    assert metadata["format"] == "hearth" and metadata["model"]["n_kv_heads"] == 2
    assert metadata["tokenizer"]["chat_template"] == "hearth"
    assert metadata["quantization"] is None and metadata["dtype"] == "float32"


def test_loaded_weights_are_memory_mapped(tiny_model_dir):
    """Parameters point into the file mapping: no eager copy of the weights."""
    model = load_checkpoint(tiny_model_dir).model
    storage = model.layers[0].attn.q.weight.untyped_storage()
    assert storage.nbytes() == (tiny_model_dir / "model.safetensors").stat().st_size


def test_load_in_bfloat16(tiny_model_dir):
    model = load_checkpoint(tiny_model_dir, dtype=torch.bfloat16).model
    assert model.embed.weight.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_missing_weights(tmp_path, tiny_model_dir):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")
    broken = copy_checkpoint(tiny_model_dir, tmp_path)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing"):
        load_checkpoint(broken)


def test_corrupt_weights_and_config(tmp_path, tiny_model_dir):
    broken = copy_checkpoint(tiny_model_dir, tmp_path)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_checkpoint(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(broken)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, tiny_model_dir):
    broken = copy_checkpoint(tiny_model_dir, tmp_path)
    metadata = json.loads((broken / "config.json").read_text())
    metadata["model"]["ffn_dim"] = 128
    (broken / "config.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"tensor layers.0.mlp.gate.weight has shape \[192, 64\] but config.json expects \[128, 64\]"):
        load_checkpoint(broken)


def test_hugging_face_folder_is_pointed_at_import_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="hearth import-hf"):
        load_checkpoint(tmp_path)


def test_save_killed_half_way_keeps_previous_checkpoint(tmp_path, tokenizer, tiny_model_dir):
    target = copy_checkpoint(tiny_model_dir, tmp_path)
    before = (target / "model.safetensors").read_bytes()

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, crash)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp folder left behind
    load_checkpoint(target)
