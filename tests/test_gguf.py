"""GGUF import and export: tiny GGUF files written here with gguf.GGUFWriter.

Every tensor type import-gguf takes gives the logits of a model built from a
numpy dequantization of the same bytes (gguf.quants.dequantize); `keep` maps
Q8_0 / Q4_0 / Q4_1 onto int8 / int4 with bf16 scales; both tokenizer kinds
tokenize as a tokenizer built the standard way for that family; bad files give
one-line errors and write nothing; export-gguf then import-gguf gives the
checkpoint's logits back.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from cli.main import main as hearth_main
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.decoder import Transformer
from model.gguf_export import export_gguf
from model.gguf_import import hearth_to_gguf_name, import_gguf
from model.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX, GGUFError, tokenizer_from_gguf
from model.quant_kernels import QuantizedWeight
from tests.conftest import fixture_texts, make_tiny_model

CONFIG = dict(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=64, rope_theta=10000.0,
              norm_eps=1e-5)
ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]
K_QUANT_SCALES = {T.Q4_K: [(0, 2), (2, 4)], T.Q5_K: [(0, 2), (2, 4)], T.Q6_K: [(208, 210)]}  # fp16 fields per block
TEXTS = ["Hello there, friend!", "  two spaces\n\nand lines\t tabs   ", "日本語 and emoji 🙂 café", "call 1234567 or 42",
         "def f(x):\n    return x**2  # square\n", "don't we'LL see?", "e\u0301t\u00e9 naïve ÅNGSTRÖM"]
SPECIAL_TEXT = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- writing GGUF files


def llama_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute, verbatim in numpy: rotate-half rows -> llama.cpp's interleaved rows."""
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def random_blocks(kind: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a K-quant [rows, cols] tensor, with sane fp16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
    for start, end in K_QUANT_SCALES[kind]:
        blocks[..., start:end] = rng.uniform(2e-4, 8e-4, blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def encode_tensor(weight: np.ndarray, kind: T, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or float array) of a tensor of type `kind` standing for roughly `weight`."""
    if kind in K_QUANT_SCALES:
        return random_blocks(kind, *weight.shape, rng)
    if kind == T.F32:
        return weight.astype(np.float32)
    if kind == T.F16:
        return weight.astype(np.float16)
    return gguf.quants.quantize(weight.astype(np.float32), kind)


def tiny_tensors(vocab: int, kinds: dict[str, T], tied: bool = True, seed: int = 0):
    """(GGUF name -> (payload in transformers row order, type), reference float32 Hearth state dict)."""
    config = ModelConfig(vocab_size=vocab, tie_embeddings=tied, **CONFIG)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    if tied:
        shapes.pop("lm_head.weight")
    rng = np.random.default_rng(seed)
    payloads, reference = {}, {}
    for name, shape in shapes.items():
        kind = T.F32 if len(shape) == 1 else kinds.get(name, kinds["default"])
        weight = (1 + 0.2 * rng.standard_normal(shape)) if len(shape) == 1 else 0.05 * rng.standard_normal(shape)
        payload = encode_tensor(weight, kind, rng)
        payloads[hearth_to_gguf_name(name)] = (payload, kind)
        reference[name] = torch.from_numpy(gguf.quants.dequantize(payload, kind).astype(np.float32).reshape(shape))
    return config, payloads, reference


def bpe_tokenizer_fields(backend: HFTokenizer, pre: str, add_bos: bool | None = False, **ids) -> dict:
    """tokenizer.ggml.* for a byte-level BPE, as convert_hf_to_gguf.py writes them."""
    spec = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    added = {t["content"]: t["special"] for t in spec["added_tokens"]}
    types = [3 if added.get(t) else 4 if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    if add_bos is not None:
        fields["tokenizer.ggml.add_bos_token"] = add_bos
    fields.update({f"tokenizer.ggml.{key}": value for key, value in ids.items()})
    return fields


def write_gguf(path: Path, config: ModelConfig | None, payloads: dict, fields: dict, arch: str = "llama",
               permute: bool = True) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    if config is not None:
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.dim)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.ffn_dim)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_dimension_count(config.head_dim)
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    for name, (payload, kind) in payloads.items():
        heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(name.split(".")[-2]) if permute else None
        data = llama_permute(payload, heads) if heads else payload
        raw = None if kind in (T.F32, T.F16) else kind
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer) -> HFTokenizer:
    """The fixture BPE plus ChatML specials (a SmolLM2-like vocabulary)."""
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return backend


def tiny_gguf(path: Path, backend: HFTokenizer, kinds: dict, tied: bool = True, **field_overrides):
    vocab = backend.get_vocab_size(with_added_tokens=True)
    config, payloads, reference = tiny_tensors(vocab, kinds, tied)
    eos = backend.token_to_id("<|im_end|>")
    fields = bpe_tokenizer_fields(backend, "gpt-2", bos_token_id=backend.token_to_id("<|bos|>"), eos_token_id=eos)
    fields["tokenizer.chat_template"] = CHATML
    fields.update(field_overrides)
    fields = {k: v for k, v in fields.items() if v is not None}
    return write_gguf(path, config, payloads, fields), config, reference


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def reference_logits(config: ModelConfig, reference: dict, tokens: torch.Tensor) -> torch.Tensor:
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(reference, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    from model.decoder import rope_inverse_frequencies

    model.inv_freq = rope_inverse_frequencies(config)
    with torch.no_grad():
        return model.eval()(tokens)


def random_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("kind", ALL_TYPES, ids=lambda k: k.name)
def test_every_tensor_type_gives_the_numpy_dequantized_logits(tmp_path, chat_tokenizer, kind):
    file, config, reference = tiny_gguf(tmp_path / "m.gguf", chat_tokenizer, {"default": kind}, tied=False)
    checkpoint = load_checkpoint(import_gguf(file, tmp_path / "out", dtype="float32"))
    tokens = random_tokens(config.vocab_size)
    with torch.no_grad():
        got = checkpoint.model(tokens)
    expected = reference_logits(config, reference, tokens)
    assert checkpoint.config == config
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,method", [(T.Q8_0, "int8"), (T.Q4_0, "int4"), (T.Q4_1, "int4"), (T.Q4_K, "int4")],
                         ids=["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_keep_maps_blocks_onto_hearth_int8_and_int4(tmp_path, chat_tokenizer, kind, method):
    file, config, reference = tiny_gguf(tmp_path / "m.gguf", chat_tokenizer, {"default": kind, "layers.0.mlp.up.weight": T.Q6_K})
    out = import_gguf(file, tmp_path / "out")  # keep is the default
    metadata = json.loads((out / "config.json").read_text())
    modules = metadata["quantization"]["modules"]
    assert modules["layers.0.attn.q"] == {"method": method, "group_size": 32}
    assert "layers.0.mlp.up" not in modules  # Q6_K is dequantized to bf16
    from model.checkpoint import read_safetensors

    stored = read_safetensors(out / "model.safetensors")
    assert stored["layers.0.mlp.up.weight"].dtype == torch.bfloat16
    for module in ("layers.0.attn.q", "layers.0.attn.k", "layers.0.mlp.down", "embed"):
        data = stored[f"{module}.weight_{method}"]
        weight = QuantizedWeight(method, data, stored[f"{module}.scales"], stored.get(f"{module}.zeros"),
                                 data.shape[1] * (2 if method == "int4" else 1)).dequantize()
        expected = reference[f"{module}.weight"]
        # the only loss: fp16 scales (and Q4_1's m + 8d) rounded to bf16, 2^-9 relative each
        assert (weight - expected).abs().max() <= 2 ** -8 * expected.abs().max() * 2
    checkpoint = load_checkpoint(out)
    tokens = random_tokens(config.vocab_size)
    with torch.no_grad():
        got = checkpoint.model(tokens).float()
    expected = reference_logits(config, reference, tokens)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999


def test_gguf_keep_import_runs_in_the_engine(tmp_path, chat_tokenizer):
    """int8 in groups of 32 and int4 load and decode in the serving engine as in the reference generator."""
    import asyncio

    from model.generate import GenerationSettings, generate
    from server.engine import Engine, EngineConfig
    from server.engine.types import GenerationRequest, SamplingParams

    file, _, _ = tiny_gguf(tmp_path / "m.gguf", chat_tokenizer,
                           {"default": T.Q8_0, "layers.0.mlp.gate.weight": T.Q4_1, "layers.0.attn.v.weight": T.Q4_0},
                           tied=False)
    out = import_gguf(file, tmp_path / "out")
    checkpoint = load_checkpoint(out)
    prompt = checkpoint.tokenizer.encode("Good morrow, sweet friend", add_bos=True)
    expected = list(generate(checkpoint.model, prompt, GenerationSettings(max_tokens=6, temperature=0)))

    async def engine_tokens() -> list[int]:
        engine = Engine.from_checkpoint(str(out), EngineConfig(dtype="bfloat16"))
        engine.start()
        try:
            request = GenerationRequest("r", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            return [t async for output in engine.generate(request) for d in output.deltas for t in d.token_ids]
        finally:
            engine.shutdown()

    assert asyncio.run(engine_tokens()) == expected


def test_untied_output_and_rotary_unpermutation(tmp_path, chat_tokenizer):
    """Without the un-permutation Q/K would be wrong: a file written without llama.cpp's permute disagrees."""
    vocab = chat_tokenizer.get_vocab_size(with_added_tokens=True)
    config, payloads, reference = tiny_tensors(vocab, {"default": T.F32}, tied=False)
    fields = bpe_tokenizer_fields(chat_tokenizer, "gpt-2")
    unpermuted = write_gguf(tmp_path / "wrong.gguf", config, payloads, fields, permute=False)
    checkpoint = load_checkpoint(import_gguf(unpermuted, tmp_path / "out", dtype="float32"))
    tokens = random_tokens(vocab)
    with torch.no_grad():
        assert (checkpoint.model(tokens) - reference_logits(config, reference, tokens)).abs().max() > 1e-3
    assert not checkpoint.config.tie_embeddings


def test_llama3_rope_scaling_from_rope_freqs(tmp_path, chat_tokenizer, capsys):
    """rope_freqs.weight, as convert_hf_to_gguf writes it for Llama 3.1, becomes the llama3 RoPE scaling."""
    import math

    from model.config import RopeScaling

    vocab = chat_tokenizer.get_vocab_size(with_added_tokens=True)
    config, payloads, reference = tiny_tensors(vocab, {"default": T.F32})
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    factors = []  # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, in plain Python
    for i in range(0, config.head_dim, 2):
        wavelen = 2 * math.pi * config.rope_theta ** (i / config.head_dim)
        if wavelen < 32 / 4:
            factors.append(1.0)
        elif wavelen > 32 / 1:
            factors.append(8.0)
        else:
            smooth = (32 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    assert 1.0 in factors and 8.0 in factors and len(set(factors)) > 3  # all three regions exercised
    fields = dict(bpe_tokenizer_fields(chat_tokenizer, "gpt-2"), **{"llama.rope.scaling.original_context_length": 32})
    rope = {"rope_freqs.weight": (np.array(factors, dtype=np.float32), T.F32)}
    file = write_gguf(tmp_path / "m.gguf", config, {**payloads, **rope}, fields)
    checkpoint = load_checkpoint(import_gguf(file, tmp_path / "out", dtype="float32"))
    assert checkpoint.config.rope_scaling == scaling
    scaled = ModelConfig(**{**CONFIG, "vocab_size": vocab, "tie_embeddings": True, "rope_scaling": scaling})
    tokens = random_tokens(vocab)
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(tokens), reference_logits(scaled, reference, tokens),
                                   rtol=1e-4, atol=1e-4)
    odd = {"rope_freqs.weight": (np.array(factors, dtype=np.float32) * 1.01, T.F32)}
    (tmp_path / "bad").mkdir()
    expect_refusal(capsys, tmp_path / "bad", write_gguf(tmp_path / "odd.gguf", config, {**payloads, **odd}, fields),
                   "rope_freqs.weight", "not Llama 3's")


# ----------------------------------------------------------------------------- tokenizers


def trained_bpe(pre: str) -> HFTokenizer:
    """A byte-level BPE built the way that family's tokenizer.json is (trained on the fixture texts)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend = HFTokenizer(models.BPE())
    if pre == "gpt-2":
        backend.pre_tokenizer = byte_level
    elif pre == "smollm":  # SmolLM2's tokenizer.json
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:  # Llama 3 / Qwen2: a split regex, then bytes without GPT-2's regex
        regex = LLAMA3_REGEX if pre == "llama-bpe" else QWEN2_REGEX
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(fixture_texts() + TEXTS, trainer=trainer)
    if pre == "llama-bpe":  # Llama 3's tokenizer.json sets ignore_merges
        spec = json.loads(backend.to_str())
        spec["model"]["ignore_merges"] = True
        backend = HFTokenizer.from_str(json.dumps(spec))
    return backend


def read_fields(path: Path) -> dict:
    return gguf.GGUFReader(path).fields


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_gpt2_tokenizer_tokenizes_as_the_family_tokenizer(tmp_path, pre):
    reference = trained_bpe(pre)
    eos = reference.token_to_id("<|im_end|>")
    fields = bpe_tokenizer_fields(reference, pre, add_bos=None, eos_token_id=eos, eot_token_id=0)
    file = write_gguf(tmp_path / "t.gguf", None, {}, {"general.architecture": "llama", **fields})
    tokenizer = tokenizer_from_gguf(read_fields(file), file)
    for text in TEXTS + [SPECIAL_TEXT]:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text, allow_special=True) == expected, text
        assert tokenizer.decode(expected, skip_special=False) == reference.decode(expected, skip_special_tokens=False)
    plain = tokenizer.encode(SPECIAL_TEXT)  # user text never forges a control token
    assert eos not in plain and tokenizer.decode(plain) == SPECIAL_TEXT
    assert tokenizer.stop_ids == [eos, 0]
    assert tokenizer.info.add_bos is (pre == "llama-bpe")  # llama.cpp's default where the key is absent


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_gpt2_tokenizer_agrees_with_transformers_gguf_loader(tmp_path, pre):
    """A second, independent reading of the same keys: transformers' GGUF tokenizer."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    reference = trained_bpe(pre)
    fields = bpe_tokenizer_fields(reference, pre, eos_token_id=reference.token_to_id("<|im_end|>"))
    config, payloads, _ = tiny_tensors(reference.get_vocab_size(with_added_tokens=True), {"default": T.F16})
    file = write_gguf(tmp_path / "m.gguf", config, payloads, fields)
    ours = tokenizer_from_gguf(read_fields(file), file)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS + [SPECIAL_TEXT]:
        assert ours.encode(text, allow_special=True) == theirs(text, add_special_tokens=False).input_ids, text


def spm_fields(add_space_prefix: bool | None = None) -> dict:
    """A tiny SentencePiece vocabulary: specials, 256 byte pieces, a few words with scores."""
    words = ["▁", "t", "h", "e", "c", "a", "▁t", "he", "▁the", "at", "▁c", "▁cat", "s", "▁s", "at s"[0:2]]
    words = list(dict.fromkeys(words))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + words
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(words))]
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.scores": scores, "tokenizer.ggml.unknown_token_id": 0,
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    if add_space_prefix is not None:
        fields["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    return fields


def test_llama_tokenizer_is_sentencepiece_with_byte_fallback(tmp_path):
    file = write_gguf(tmp_path / "t.gguf", None, {}, {"general.architecture": "llama", **spm_fields()})
    tokenizer = tokenizer_from_gguf(read_fields(file), file)
    pieces = [tokenizer.backend.id_to_token(i) for i in tokenizer.encode("the cats é", allow_special=True)]
    # SentencePiece: a prefix space, spaces as ▁, merges by score, bytes for what the vocabulary lacks
    assert pieces == ["▁the", "▁cat", "s", "▁", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(tokenizer.encode("the cats é")) == "the cats é"
    assert tokenizer.info.add_bos and tokenizer.encode("the", add_bos=True)[0] == 1
    assert tokenizer.encode("<s>the", allow_special=True)[:2] == [1, tokenizer.backend.token_to_id("▁the")]
    file = write_gguf(tmp_path / "u.gguf", None, {}, {"general.architecture": "llama", **spm_fields(False)})
    no_prefix = tokenizer_from_gguf(read_fields(file), file)
    assert [no_prefix.backend.id_to_token(i) for i in no_prefix.encode("the")] == ["t", "he"]


def trained_sentencepiece_fields() -> dict:
    """A SentencePiece-style vocabulary learned from the fixture texts: specials, 256 byte pieces,
    then ▁-words ranked by score, as llama.cpp's converter writes a Llama 2 tokenizer.model."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False)
    backend.train_from_iterator(fixture_texts(), trainer=trainer)
    words = [t for t, _ in sorted(backend.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + words
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(words),
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(words))],
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def test_llama_tokenizer_tokenizes_as_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF tokenizer (LlamaTokenizer from the same tokens and scores) gives the same ids.
    Texts start with a non-space: there transformers' Metaspace and llama.cpp's prefix space agree."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    fields = trained_sentencepiece_fields()
    config, payloads, _ = tiny_tensors(len(fields["tokenizer.ggml.tokens"]), {"default": T.F16})
    file = write_gguf(tmp_path / "m.gguf", config, payloads, fields)
    ours = tokenizer_from_gguf(read_fields(file), file)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [t.lstrip() for t in TEXTS] + fixture_texts()[:40]:
        assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids, text
    assert ours.encode("Hello", add_bos=True) == reference("Hello").input_ids  # BOS: llama's default


def test_chat_template_bos_and_stop_tokens_from_metadata(tmp_path, chat_tokenizer):
    from model.chat import encode_chat

    file, _, _ = tiny_gguf(tmp_path / "m.gguf", chat_tokenizer, {"default": T.F16}, **{"tokenizer.ggml.add_bos_token": False})
    checkpoint = load_checkpoint(import_gguf(file, tmp_path / "out", dtype="bfloat16"))
    tokenizer = checkpoint.tokenizer
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}]).ids
    assert tokenizer.decode(ids, skip_special=False) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.bos_id is not None and tokenizer.bos_id not in tokenizer.encode("Hi", add_bos=True)
    assert tokenizer.stop_ids == [chat_tokenizer.token_to_id("<|im_end|>")]


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind,tolerance", [("f32", 1e-5), ("f16", 2e-2), ("bf16", 0.1), ("q8_0", 0.1), ("q4_0", None)])
def test_export_then_import_gives_the_checkpoint_logits(tmp_path, tokenizer, kind, tolerance):
    from model.config import RopeScaling

    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=64) if kind == "f32" else None
    model = make_tiny_model(tokenizer, seed=3, dim=64, ffn_dim=96, rope_scaling=scaling)
    folder = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    file = export_gguf(folder, tmp_path / "m.gguf", kind)
    fields = read_fields(file)
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # Hearth's ByteLevel regex is GPT-2's
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    back = load_checkpoint(import_gguf(file, tmp_path / "back", dtype="float32"))
    assert back.config == model.config and back.tokenizer.info.chat_template == "hearth"
    assert back.tokenizer.encode(TEXTS[2], add_bos=True) == tokenizer.encode(TEXTS[2], add_bos=True)
    tokens = random_tokens(tokenizer.vocab_size)
    with torch.no_grad():
        expected, got = model(tokens), back.model(tokens)
    if tolerance is not None:
        assert (got - expected).abs().max() < tolerance
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def test_exported_file_is_read_by_transformers_as_hearth_runs_it(tmp_path, tokenizer):
    """A second GGUF reader (transformers' from_pretrained(gguf_file=...), which undoes llama.cpp's Q/K
    permutation itself) gets Hearth's logits, token ids, BOS and chat-template ids from the exported file."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.chat import encode_chat

    model = make_tiny_model(tokenizer, seed=6, dim=64, ffn_dim=96)
    export_gguf(save_checkpoint(tmp_path / "ckpt", model, tokenizer), tmp_path / "m.gguf", "f32")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    tokens = random_tokens(tokenizer.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(input_ids=tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
    for text in TEXTS:
        assert hf_tokenizer(text).input_ids == tokenizer.encode(text, add_bos=True), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a lark?"}]
    hf_chat = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_chat = hf_chat["input_ids"] if isinstance(hf_chat, dict) or hasattr(hf_chat, "keys") else hf_chat
    assert list(hf_chat) == encode_chat(tokenizer, messages).ids


# ----------------------------------------------------------------------------- bad input


def run_cli(capsys, *argv) -> tuple[int, str]:
    status = hearth_main(list(argv))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return status, err


def expect_refusal(capsys, tmp_path, file: Path, *needles: str) -> None:
    out = tmp_path / "out"
    status, err = run_cli(capsys, "import-gguf", str(file), "--out", str(out))
    assert status == 1 and str(file) in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_not_gguf_and_truncated_files(tmp_path, chat_tokenizer, capsys):
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    expect_refusal(capsys, tmp_path, text, "not a GGUF file")
    file, _, _ = tiny_gguf(tmp_path / "m.gguf", chat_tokenizer, {"default": T.Q8_0})
    data = file.read_bytes()
    for size in (len(data) // 2, len(data) - 100, 100):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        expect_refusal(capsys, tmp_path, cut)


def test_other_architecture_type_and_keys_are_refused(tmp_path, chat_tokenizer, capsys):
    vocab = chat_tokenizer.get_vocab_size(with_added_tokens=True)
    config, payloads, _ = tiny_tensors(vocab, {"default": T.F16})
    fields = bpe_tokenizer_fields(chat_tokenizer, "gpt-2")
    qwen = write_gguf(tmp_path / "q.gguf", config, payloads, fields, arch="qwen2")
    expect_refusal(capsys, tmp_path, qwen, "general.architecture", "architecture qwen2 is not supported, expected llama")

    odd = dict(payloads)
    odd["blk.0.ffn_up.weight"] = (np.random.default_rng(0).integers(0, 255, (256, 144), dtype=np.uint8), T.IQ4_NL)
    expect_refusal(capsys, tmp_path, write_gguf(tmp_path / "t.gguf", config, odd, fields),
                   "tensor blk.0.ffn_up.weight", "IQ4_NL")

    no_tokens = {k: v for k, v in fields.items() if k != "tokenizer.ggml.tokens"}
    expect_refusal(capsys, tmp_path, write_gguf(tmp_path / "k.gguf", config, payloads, no_tokens), "tokenizer.ggml.tokens")
    no_model = {k: v for k, v in fields.items() if k != "tokenizer.ggml.model"}
    expect_refusal(capsys, tmp_path, write_gguf(tmp_path / "m.gguf", config, payloads, no_model), "tokenizer.ggml.model")

    short = dict(fields, **{"tokenizer.ggml.tokens": fields["tokenizer.ggml.tokens"][:-1],
                            "tokenizer.ggml.token_type": fields["tokenizer.ggml.token_type"][:-1]})
    expect_refusal(capsys, tmp_path, write_gguf(tmp_path / "v.gguf", config, payloads, short),
                   "tokenizer.ggml.tokens", "token_embd.weight")


def test_cli_import_export_and_overwrite(tmp_path, chat_tokenizer, tiny_model_dir, capsys):
    file, _, _ = tiny_gguf(tmp_path / "m.gguf", chat_tokenizer, {"default": T.Q4_1})
    out = tmp_path / "model"
    assert run_cli(capsys, "import-gguf", str(file), "--out", str(out))[0] == 0
    status, err = run_cli(capsys, "import-gguf", str(file), "--out", str(out))
    assert status == 1 and "--overwrite" in err
    assert run_cli(capsys, "import-gguf", str(file), "--out", str(out), "--overwrite", "--dtype", "float32")[0] == 0
    exported = tmp_path / "x.gguf"
    assert run_cli(capsys, "export-gguf", str(tiny_model_dir), "--out", str(exported), "--type", "q8_0")[0] == 0
    status, err = run_cli(capsys, "export-gguf", str(tiny_model_dir), "--out", str(exported))
    assert status == 1 and "--overwrite" in err


def test_serve_entry_imports_a_gguf_file_once_into_the_cache(tmp_path, chat_tokenizer, monkeypatch):
    from server.cli import gguf_entry

    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path / "cache"))
    file, _, _ = tiny_gguf(tmp_path / "tiny.gguf", chat_tokenizer, {"default": T.Q8_0})
    name, _, folder = gguf_entry(str(file)).partition("=")
    assert name == "tiny" and load_checkpoint(folder).config.dim == CONFIG["dim"]
    stamp = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert gguf_entry(f"smol={file}") == f"smol={folder}"  # cached: keyed by the file's hash, not imported again
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == stamp
    assert gguf_entry(str(tmp_path)) == str(tmp_path)  # a folder is left alone
    assert (tmp_path / "cache" / "gguf" / Path(folder).name).is_dir()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(blocker))  # a cache that cannot be written: one line, no traceback
    with pytest.raises(GGUFError, match="HEARTH_CACHE_DIR"):
        gguf_entry(str(file))


def test_quantized_checkpoint_exports_dequantized_then_requantized(tmp_path, tokenizer):
    from model.quant import quantize_checkpoint

    model = make_tiny_model(tokenizer, seed=4, dim=64, ffn_dim=96)
    folder = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    quantize_checkpoint(folder, tmp_path / "int4", "int4", 32)
    quantized = load_checkpoint(tmp_path / "int4", dtype=torch.float32)
    file = export_gguf(tmp_path / "int4", tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(file).tensors}
    assert types["blk.0.attn_q.weight"] == T.Q8_0 and types["blk.0.attn_norm.weight"] == T.F32
    back = load_checkpoint(import_gguf(file, tmp_path / "back", dtype="float32"))
    tokens = random_tokens(tokenizer.vocab_size)
    with torch.no_grad():
        expected, got = quantized.model(tokens).float(), back.model(tokens)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999


def test_export_refuses_what_gguf_cannot_name(tmp_path, capsys):
    fields = spm_fields()
    config, payloads, _ = tiny_tensors(len(fields["tokenizer.ggml.tokens"]), {"default": T.F16})
    spm = import_gguf(write_gguf(tmp_path / "spm.gguf", config, payloads, fields), tmp_path / "spm")
    status, err = run_cli(capsys, "export-gguf", str(spm), "--out", str(tmp_path / "x.gguf"))
    assert status == 1 and "byte-level BPE tokenizers only" in err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
