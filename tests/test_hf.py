"""Hugging Face interop: logits parity with transformers in both directions, config
dialects, sharded weights, tokenizer and chat-template ids, and clear refusals."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may reach the network

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from model.chat import encode_chat
from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import HearthError
from model.hf import HFInteropError, export_hf, import_hf
from tests.conftest import make_tiny_model
from cli.main import main as hearth_main

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Meta's Llama 3 template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
HF_VOCAB = 520  # embedding rows; the tokenizer has 517 tokens (padded vocab, as real checkpoints do)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a lark?"},
    {"role": "assistant", "content": "A singing bird."},
    {"role": "user", "content": "And the  morrow,\nsweet friend?"},
]
TEXTS = ["Hello there, friend!", "  two spaces\n\nand lines\t tabs", "日本語 and emoji 🙂"]


def hf_config(**overrides) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=HF_VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=512, eos_token_id=513)
    if isinstance(overrides.get("rope_scaling"), dict):
        overrides["rope_scaling"] = dict(overrides["rope_scaling"])  # transformers adds rope_theta to it in place
    return LlamaConfig(**{**base, **overrides})


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms included (all-ones norms would hide a swapped name)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.05 * noise)


def llama3_tokenizer(hearth_tokenizer) -> HFTokenizer:
    """The fixture BPE with Llama-3-style specials and a BOS post-processor."""
    backend = HFTokenizer.from_str(hearth_tokenizer.backend.to_str())
    backend.add_special_tokens(LLAMA3_SPECIALS)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return backend


def write_hf_folder(path, hearth_tokenizer, seed=0, max_shard_size=None, **config_overrides) -> LlamaForCausalLM:
    """A transformers-written Llama folder with random weights; returns the model (eval, fp32)."""
    model = LlamaForCausalLM(hf_config(**config_overrides)).eval()
    randomize(model, seed)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    backend = llama3_tokenizer(hearth_tokenizer)
    backend.save(str(path / "tokenizer.json"))
    eot = backend.token_to_id("<|eot_id|>")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": False}))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 512, "eos_token_id": [513, eot]}))
    return model


def max_logit_difference(hearth_model, hf_model, vocab: int, seed: int = 0) -> float:
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((hearth_model(tokens) - hf_model(input_ids=tokens).logits).abs().max())


def edit_json(file, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- HF -> Hearth


@pytest.mark.parametrize("overrides", [
    dict(),  # GQA, untied
    dict(num_key_value_heads=4, tie_word_embeddings=True),  # multi-head, tied
    dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True),  # Llama 3.1 RoPE
], ids=["gqa-untied", "mha-tied", "llama3-rope"])
def test_import_gives_transformers_logits(tmp_path, tokenizer, overrides):
    hf_model = write_hf_folder(tmp_path / "hf", tokenizer, **overrides)
    import_hf(tmp_path / "hf", tmp_path / "hearth")
    checkpoint = load_checkpoint(tmp_path / "hearth")
    assert checkpoint.config.tie_embeddings == overrides.get("tie_word_embeddings", False)
    assert checkpoint.config.n_kv_heads == overrides.get("num_key_value_heads", 2)
    assert (checkpoint.config.rope_scaling is not None) == ("rope_scaling" in overrides)
    assert max_logit_difference(checkpoint.model, hf_model, HF_VOCAB) <= 1e-4


@pytest.mark.parametrize("dialect", ["transformers4", "transformers5"])
def test_both_config_dialects_import_the_same_model(tmp_path, tokenizer, dialect):
    hf_model = write_hf_folder(tmp_path / "hf", tokenizer, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    theta, scaling = 500000.0, dict(LLAMA3_SCALING)
    if dialect == "transformers4":  # top-level rope_theta, rope_scaling, torch_dtype
        changes = dict(rope_parameters=None, dtype=None, rope_theta=theta, rope_scaling=scaling, torch_dtype="float32")
    else:  # rope_parameters (theta inside), dtype
        changes = dict(rope_theta=None, rope_scaling=None, torch_dtype=None, dtype="float32",
                       rope_parameters={**scaling, "rope_theta": theta})
    edit_json(tmp_path / "hf" / "config.json", **changes)
    import_hf(tmp_path / "hf", tmp_path / "hearth")
    checkpoint = load_checkpoint(tmp_path / "hearth")
    assert checkpoint.config.rope_theta == theta and checkpoint.config.rope_scaling.factor == 8.0
    assert checkpoint.config.rope_scaling.original_max_position_embeddings == 32
    assert max_logit_difference(checkpoint.model, hf_model, HF_VOCAB) <= 1e-4


def test_sharded_import(tmp_path, tokenizer):
    hf_model = write_hf_folder(tmp_path / "hf", tokenizer, max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    import_hf(tmp_path / "hf", tmp_path / "hearth")
    assert max_logit_difference(load_checkpoint(tmp_path / "hearth").model, hf_model, HF_VOCAB) <= 1e-4


def test_import_bfloat16_and_tokenizer_metadata(tmp_path, tokenizer):
    write_hf_folder(tmp_path / "hf", tokenizer)
    import_hf(tmp_path / "hf", tmp_path / "hearth", dtype="bfloat16")
    metadata = json.loads((tmp_path / "hearth" / "config.json").read_text())
    assert metadata["dtype"] == "bfloat16" and metadata["imported_from"]["architecture"] == "LlamaForCausalLM"
    info = metadata["tokenizer"]
    assert info["bos_token"] == "<|begin_of_text|>" and info["eos_token"] == "<|end_of_text|>"
    assert info["stop_tokens"] == ["<|end_of_text|>", "<|eot_id|>"]  # eos + generation_config's eos list
    assert info["chat_template"] == "jinja" and info["jinja_template"] == LLAMA3_TEMPLATE
    assert load_checkpoint(tmp_path / "hearth").model.embed.weight.dtype == torch.bfloat16


def test_imported_tokenizer_and_chat_template_give_transformers_ids(tmp_path, tokenizer):
    write_hf_folder(tmp_path / "hf", tokenizer)
    (tmp_path / "hf" / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)  # the file wins over tokenizer_config
    edit_json(tmp_path / "hf" / "tokenizer_config.json", chat_template="{{ 'not this one' }}")
    import_hf(tmp_path / "hf", tmp_path / "hearth")
    hearth_tokenizer = load_checkpoint(tmp_path / "hearth").tokenizer
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hearth_tokenizer.encode(text, add_bos=True) == hf_tokenizer(text)["input_ids"]
    # transformers matches special tokens inside any text; Hearth only when asked (chat templates).
    marked = "<|start_header_id|>user<|end_header_id|> hi<|eot_id|>"
    hf_ids = hf_tokenizer(marked, add_special_tokens=False)["input_ids"]
    assert hearth_tokenizer.encode(marked, allow_special=True) == hf_ids
    for prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=prompt, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert encode_chat(hearth_tokenizer, MESSAGES, add_generation_prompt=prompt).ids == expected


# ----------------------------------------------------------------------------- Hearth -> HF


def hearth_model(tokenizer, seed: int, **overrides):
    model = make_tiny_model(tokenizer, seed=seed, **overrides)
    randomize(model, seed)
    return model


@pytest.mark.parametrize("overrides", [
    dict(),  # tiny preset: GQA, tied
    dict(tie_embeddings=False, n_kv_heads=4),
    dict(rope_theta=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=32)),
], ids=["gqa-tied", "mha-untied", "llama3-rope"])
def test_export_gives_hearth_logits_in_transformers(tmp_path, tokenizer, overrides):
    model = hearth_model(tokenizer, seed=1, **overrides)
    save_checkpoint(tmp_path / "hearth", model, tokenizer)
    export_hf(tmp_path / "hearth", tmp_path / "hf")
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf_model.config.tie_word_embeddings == model.config.tie_embeddings
    assert max_logit_difference(model, hf_model, tokenizer.vocab_size) <= 1e-4


def test_exported_tokenizer_and_chat_template_give_hearth_ids(tmp_path, tokenizer, tiny_model_dir):
    export_hf(tiny_model_dir, tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for text in TEXTS:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, add_bos=True)
        assert hf_tokenizer.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    parts = [{"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}]
    for messages in (MESSAGES, MESSAGES[1:2], parts):
        for prompt in (True, False):
            expected = encode_chat(tokenizer, messages, add_generation_prompt=prompt).ids
            got = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert (got["input_ids"] if hasattr(got, "keys") else got) == expected
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == set(tokenizer.stop_ids)


def test_export_bfloat16_then_import_round_trips_weights(tmp_path, tokenizer):
    model = hearth_model(tokenizer, seed=2, tie_embeddings=False)
    save_checkpoint(tmp_path / "hearth", model, tokenizer)
    export_hf(tmp_path / "hearth", tmp_path / "hf", dtype="bfloat16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.model.embed.weight.dtype == torch.bfloat16  # the declared dtype is kept by default
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], tensor.to(torch.bfloat16)), name


# ----------------------------------------------------------------------------- refusals


def test_unsupported_architecture_and_biases(tmp_path, tokenizer):
    write_hf_folder(tmp_path / "hf", tokenizer)
    config = tmp_path / "hf" / "config.json"
    edit_json(config, architectures=["MistralForCausalLM"], model_type="mistral")
    expected = "architecture MistralForCausalLM is not supported, expected LlamaForCausalLM"
    with pytest.raises(HFInteropError, match=expected):
        import_hf(tmp_path / "hf", tmp_path / "out")
    edit_json(config, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True)
    with pytest.raises(HFInteropError, match="attention_bias=true is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    edit_json(config, attention_bias=False, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(HFInteropError, match="rope_type 'yarn' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_files_are_named(tmp_path, tokenizer, missing):
    write_hf_folder(tmp_path / "hf", tokenizer)
    (tmp_path / "hf" / missing).unlink()
    with pytest.raises(HearthError, match=rf"{missing}: (missing|tokenizer file not found)"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_missing_shard_is_named(tmp_path, tokenizer):
    write_hf_folder(tmp_path / "hf", tokenizer, max_shard_size="40KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFInteropError, match=rf"{shard.name}: missing \(named by model.safetensors.index.json\)"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_output_folder_is_protected(tmp_path, tokenizer, tiny_model_dir):
    write_hf_folder(tmp_path / "hf", tokenizer)
    import_hf(tmp_path / "hf", tmp_path / "hearth")
    with pytest.raises(HFInteropError, match="already holds a model; pass --overwrite"):
        import_hf(tmp_path / "hf", tmp_path / "hearth")
    import_hf(tmp_path / "hf", tmp_path / "hearth", overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(HFInteropError, match="is not a model folder"):
        import_hf(tmp_path / "hf", tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(HFInteropError, match="is the input folder"):
        export_hf(tiny_model_dir, tiny_model_dir, overwrite=True)


def test_export_refuses_quantized_checkpoint(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "q", make_tiny_model(tokenizer), tokenizer,
                    quantization={"method": "int8", "group_size": 64})
    with pytest.raises(HFInteropError, match="quantized"):
        export_hf(tmp_path / "q", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_reports_one_line_errors_and_succeeds(tmp_path, tokenizer, tiny_model_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert hearth_main(["import-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "config.json: missing" in err
    assert hearth_main(["export-hf", str(tiny_model_dir), "--out", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert hearth_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "chat template: hearth" in capsys.readouterr().out  # Hearth's own template recognised on the way back


# ----------------------------------------------------------------------------- BOS fidelity


@pytest.mark.parametrize("setup", ["no-post-processor", "add_bos_token-ignored", "bos-post-processor"])
def test_prompts_get_bos_exactly_where_transformers_adds_it(tmp_path, tokenizer, setup):
    """A byte-level BPE with no post-processor adds no BOS in transformers, so Hearth adds none either:
    greedy tokens are transformers' own. A post-processor that adds BOS makes both add it."""
    from model.generate import GenerationSettings, generate

    folder = tmp_path / "hf"
    bos = tokenizer.backend.token_to_id("<|bos|>")
    hf_model = LlamaForCausalLM(hf_config(bos_token_id=bos)).eval()
    randomize(hf_model, seed=5)
    hf_model.save_pretrained(folder)
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())  # ByteLevel BPE, post_processor null
    if setup == "bos-post-processor":
        backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
    if setup == "add_bos_token-ignored":  # transformers 5 does not add BOS for it on a post-processor-less file
        config["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    prompt = "Good morrow, sweet friend"
    hf_ids = AutoTokenizer.from_pretrained(folder)(prompt).input_ids
    assert (hf_ids[0] == bos) is (setup == "bos-post-processor")
    expected, ids = [], torch.tensor([hf_ids])
    with torch.no_grad():
        for _ in range(8):  # transformers' greedy decoding, one full forward per token
            expected.append(int(hf_model(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    checkpoint = load_checkpoint(import_hf(folder, tmp_path / "hearth", dtype="float32"))
    prompt_ids = checkpoint.tokenizer.encode(prompt, add_bos=True)
    assert prompt_ids == hf_ids
    assert list(generate(checkpoint.model, prompt_ids, GenerationSettings(max_tokens=8, temperature=0))) == expected
