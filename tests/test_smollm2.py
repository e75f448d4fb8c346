"""The real model: SmolLM2-135M-Instruct's Q4_1 GGUF file (Apache-2.0), as scripts/fetch-smollm2.sh
fetches it into weights/gguf (.ci/run does). Skipped, with the reason, where the file is absent.

A float32 import decodes greedily exactly as transformers' LlamaForCausalLM does on the same
weights dequantized with numpy (gguf.quants) and un-permuted here, independently of Hearth's
importer; and asked for the capital of France, the model says Paris.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from model.chat import encode_chat
from model.checkpoint import load_checkpoint
from model.generate import GenerationSettings, generate
from model.gguf_import import import_gguf

GGUF_FILE = Path(os.environ.get("HEARTH_SMOLLM2_GGUF", Path(__file__).parents[1] / "weights/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"))
pytestmark = pytest.mark.skipif(not GGUF_FILE.is_file(), reason=f"{GGUF_FILE} is absent: run scripts/fetch-smollm2.sh")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return load_checkpoint(import_gguf(GGUF_FILE, tmp_path_factory.mktemp("smollm2") / "f32", dtype="float32"))


def transformers_model():
    """LlamaForCausalLM (SmolLM2-135M's published config) on the file's weights, dequantized with numpy."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True)
    state = {}
    for tensor in gguf.GGUFReader(GGUF_FILE).tensors:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        stem, kind = tensor.name.rsplit(".", 1)
        parts = stem.split(".")
        if parts[0] == "blk":
            heads = {"attn_q": 9, "attn_k": 3}.get(parts[2])
            if heads:  # llama.cpp's interleaved rows back to rotate-half
                weight = weight.reshape(heads, -1, 2, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)
            name = f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{kind}"
        else:
            name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}[stem] + f".{kind}"
        state[name] = torch.from_numpy(np.ascontiguousarray(weight))
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def test_float32_import_decodes_as_transformers(smollm2):
    ids = encode_chat(smollm2.tokenizer, QUESTION).ids
    got = list(generate(smollm2.model, ids, GenerationSettings(max_tokens=4, temperature=0)))
    model, expected, tokens = transformers_model(), [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(4):
            expected.append(int(model(input_ids=tokens).logits[0, -1].argmax()))
            tokens = torch.cat([tokens, torch.tensor([[expected[-1]]])], dim=1)
    assert got == expected


def test_smollm2_says_paris(smollm2):
    tokenizer = smollm2.tokenizer
    ids = encode_chat(tokenizer, QUESTION).ids
    assert not tokenizer.info.add_bos and tokenizer.encode("Hi", add_bos=True) == tokenizer.encode("Hi")
    settings = GenerationSettings(max_tokens=10, temperature=0, stop_ids=tuple(tokenizer.stop_ids))
    answer = tokenizer.decode(generate(smollm2.model, ids, settings))
    assert "Paris" in answer, answer


def test_tokenizer_is_smollm2s(smollm2):
    """SmolLM2's tokenizer.json built with the tokenizers API (BPE from the file's vocabulary and merges,
    single digits then ByteLevel, the 17 special tokens) tokenizes exactly as the imported one."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    fields = gguf.GGUFReader(GGUF_FILE).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    reference = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    reference.decoder = decoders.ByteLevel()
    reference.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tokens[:17]])
    texts = ["Hello there, friend!", "  two spaces\n\nand lines\t tabs   ", "日本語 and emoji 🙂 café",
             "call 1234567 or 42", "def f(x):\n    return x**2  # square\n", "don't we'LL see?",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert smollm2.tokenizer.encode(text, allow_special=True) == expected, text
        assert smollm2.tokenizer.decode(expected, skip_special=False) == text
