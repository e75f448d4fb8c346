"""`hearth import-gguf`: a llama.cpp GGUF file (general.architecture = llama) -> a Hearth checkpoint.

    hearth import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out weights/smollm2 [--dtype keep|bfloat16|float32]

Design choices:
- Read with the `gguf` package (llama.cpp's own reader, memory-mapped, and its
  numpy dequantizers): nothing here re-implements a block format that is only
  decoded; the three that map onto Hearth's formats are repacked by hand.
- `keep` (default) maps blocks onto Hearth's quantized formats without
  re-rounding the codes: Q8_0 -> int8 in groups of 32 (W = q * d), Q4_0 ->
  int4 in groups of 32 with zero 0 (W = (q - 8) * d), Q4_1 -> int4 in groups
  of 32 with zero = m + 8 d (W = q * d + m), Q4_K -> int4 in groups of 32
  with scale d * sc and zero 8 d * sc - dmin * m (its 6-bit sub-block scale
  and min). Hearth stores scales and zeros in bf16, so the fp16 d (and the
  zeros) are rounded to bf16: the one loss. Every
  other tensor is dequantized and stored in bf16 (a quantized checkpoint's
  body dtype), norms included. `float32` / `bfloat16` dequantize everything.
- Q and K rows are un-permuted from llama.cpp's interleaved rotary layout
  (convert_hf_to_gguf's `permute`) back to rotate-half, which is the
  transformers layout Hearth's decoder uses. A row permutation commutes with
  block quantization (blocks run along a row), so quantized rows move as is.
- No output.weight means a tied LM head, as in llama.cpp. rope_freqs.weight
  (Llama 3.1+) becomes the config's llama3 RoPE scaling, only if those
  parameters reproduce its factors exactly (see llama3_scaling).
- Everything is checked before anything is written (architecture, shapes,
  tensor types, tokenizer keys, vocabulary vs embedding rows); the folder is
  then written atomically (temp + rename), so a failure leaves none behind.
- Every problem is a one-line GGUFError naming the file and the key or tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import ModelConfig, RopeScaling
from model.errors import HearthError
from model.gguf_tokenizer import GGUFError, field_value, tokenizer_from_gguf

if TYPE_CHECKING:
    import torch

    from model.tokenizer import Tokenizer

DTYPE_CHOICES = ("keep", "bfloat16", "float32")
GGUF_MAGIC = b"GGUF"
GROUP = 32  # elements per Q8_0 / Q4_0 / Q4_1 block
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ RoPE scaling factors; read into the config, not a weight
KEPT_TYPES = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4"}
DEQUANTIZED_TYPES = {"F32", "F16", "BF16", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q2_K", "Q3_K"}

_LAYER_NAMES = {
    "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o",
    "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down",
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
}
_TOP_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}


# ----------------------------------------------------------------------------- names


def gguf_to_hearth_name(name: str) -> str | None:
    """Hearth tensor name of a llama.cpp one; None when llama.cpp's name is not one Hearth has."""
    stem, _, kind = name.rpartition(".")
    if kind != "weight":
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def hearth_to_gguf_name(name: str) -> str:
    stem = name.removesuffix(".weight")
    top = {v: k for k, v in _TOP_NAMES.items()}
    if stem in top:
        return f"{top[stem]}.weight"
    _, layer, suffix = stem.split(".", 2)  # layers.N.<suffix>
    return f"blk.{layer}.{ {v: k for k, v in _LAYER_NAMES.items()}[suffix] }.weight"


# ----------------------------------------------------------------------------- reading


def open_gguf(file: Path):
    """A GGUFReader on the file, every tensor's bytes inside it; one-line errors for anything else."""
    import gguf

    if not file.is_file():
        raise GGUFError(f"{file}: file not found")
    with open(file, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{file}: not a GGUF file (no GGUF magic at the start)")
    try:
        reader = gguf.GGUFReader(file, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct/numpy errors on bad files
        raise GGUFError(f"{file}: not a valid GGUF file, truncated or corrupt ({str(exc).splitlines()[0]})") from None
    for tensor in reader.tensors:
        expected = tensor.n_bytes
        if tensor.data.nbytes != expected or tensor.data_offset + expected > file.stat().st_size:
            raise GGUFError(f"{file}: tensor {tensor.name} is truncated (the file ends inside its data)")
    return reader


def is_gguf_file(path: str | Path) -> bool:
    """True for a file that starts with GGUF's magic (the content decides, never the file name)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def _int(fields: dict[str, Any], key: str, file: Path, default: int | None = None) -> int:
    value = field_value(fields, key, file, required=default is None)
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GGUFError(f"{file}: key {key} must be a non-negative integer, got {value!r}")
    return value


def _float(fields: dict[str, Any], key: str, file: Path, default: float) -> float:
    value = field_value(fields, key, file, required=False)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise GGUFError(f"{file}: key {key} must be a number, got {value!r}")
    import numpy as np

    return float(str(np.float32(value)))  # GGUF stores float32: 1e-5, not 9.999999747378752e-06


def model_config_from_gguf(fields: dict[str, Any], tensors: dict[str, Any], file: Path) -> ModelConfig:
    """ModelConfig from llama.* keys; refuses what Hearth's decoder would not compute exactly."""
    arch = field_value(fields, "general.architecture", file)
    if arch != "llama":
        raise GGUFError(f"{file}: key general.architecture: architecture {arch} is not supported, expected llama")
    if _int(fields, "llama.expert_count", file, 0):
        raise GGUFError(f"{file}: key llama.expert_count: mixture-of-experts models are not supported")
    scaling = field_value(fields, "llama.rope.scaling.type", file, required=False)
    if scaling not in (None, "none"):
        raise GGUFError(f"{file}: key llama.rope.scaling.type: RoPE scaling {scaling} is not supported")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{file}: tensor token_embd.weight is missing")
    dim, n_heads = _int(fields, "llama.embedding_length", file), _int(fields, "llama.attention.head_count", file)
    try:
        config = ModelConfig(
            dim=dim, n_layers=_int(fields, "llama.block_count", file), n_heads=n_heads,
            n_kv_heads=_int(fields, "llama.attention.head_count_kv", file, n_heads),
            ffn_dim=_int(fields, "llama.feed_forward_length", file), vocab_size=int(embed.shape[1]),
            max_seq_len=_int(fields, "llama.context_length", file),
            rope_theta=_float(fields, "llama.rope.freq_base", file, 10000.0),
            norm_eps=_float(fields, "llama.attention.layer_norm_rms_epsilon", file, 1e-5),
            tie_embeddings="output.weight" not in tensors)
    except HearthError as exc:
        raise GGUFError(f"{file}: llama.* keys: {exc}") from None
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if _int(fields, key, file, config.head_dim) != config.head_dim:
            raise GGUFError(f"{file}: key {key} = {fields[key].contents()} is not head_dim "
                            f"{config.head_dim} (embedding_length / head_count); not supported")
    if ROPE_FREQS in tensors:
        config = dataclasses.replace(config, rope_scaling=llama3_scaling(tensors[ROPE_FREQS], fields, config, file))
    return config


def rope_factors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs: what each rotary frequency is divided by (Llama 3 scaling; 1 without)."""
    from model.decoder import rope_inverse_frequencies

    return rope_inverse_frequencies(dataclasses.replace(config, rope_scaling=None)) / rope_inverse_frequencies(config)


def llama3_scaling(tensor, fields: dict[str, Any], config: ModelConfig, file: Path) -> RopeScaling:
    """Llama 3's RoPE scaling from rope_freqs.weight (convert_hf_to_gguf writes the factors, not the
    parameters): factor = the largest factor; low/high frequency factors 1 and 4 and the original
    context (llama.rope.scaling.original_context_length, else 8192) as every Llama 3.1/3.2 has them;
    accepted only if they reproduce every factor in the file."""
    import torch

    found = dequantized(tensor, None).float().flatten()
    original = _int(fields, "llama.rope.scaling.original_context_length", file, 8192)
    scaling = RopeScaling(factor=float(found.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=original)
    expected = rope_factors(dataclasses.replace(config, rope_scaling=scaling))
    if found.shape != expected.shape or not torch.allclose(found, expected, rtol=1e-4, atol=0):
        raise GGUFError(f"{file}: tensor {ROPE_FREQS} holds RoPE factors that are not Llama 3's (factor "
                        f"{scaling.factor:g}, low/high frequency factors 1 and 4, original context {original}); "
                        "not supported")
    return scaling


def check_vocabulary(fields: dict[str, Any], config: ModelConfig, file: Path) -> None:
    tokens = len(field_value(fields, "tokenizer.ggml.tokens", file))
    if tokens != config.vocab_size:
        raise GGUFError(f"{file}: key tokenizer.ggml.tokens has {tokens} tokens but token_embd.weight has "
                        f"{config.vocab_size} rows")
    declared = field_value(fields, "llama.vocab_size", file, required=False)
    if declared is not None and declared != config.vocab_size:
        raise GGUFError(f"{file}: key llama.vocab_size = {declared} but token_embd.weight has {config.vocab_size} rows")


# ----------------------------------------------------------------------------- tensors


def unpermute_rotary(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's interleaved Q/K rows -> rotate-half rows (the inverse of convert_hf_to_gguf's permute)."""
    half = rows.shape[0] // n_heads // 2
    # [n_heads * half * 2, ...] -> [n_heads, half, 2, ...] -> [n_heads, 2, half, ...]
    return rows.reshape(n_heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


def permute_rotary(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> llama.cpp's interleaved layout (convert_hf_to_gguf's permute)."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


def _rotary_heads(name: str, config: ModelConfig) -> int | None:
    if name.endswith("attn.q.weight"):
        return config.n_heads
    return config.n_kv_heads if name.endswith("attn.k.weight") else None


def _raw_rows(tensor) -> torch.Tensor:
    """The tensor's bytes as [rows, bytes per row] (a copy: the reader's mmap is read-only)."""
    import numpy as np
    import torch

    data = np.ascontiguousarray(tensor.data).view(np.uint8)
    return torch.from_numpy(data.reshape(int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1, -1).copy())


def dequantized(tensor, heads: int | None) -> torch.Tensor:
    """float32 [out, in] (or [n]) of any supported GGUF tensor, rotary rows un-permuted."""
    import gguf
    import torch

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = [int(n) for n in reversed(tensor.shape)]
    out = torch.from_numpy(values.astype("float32", copy=True).reshape(shape))
    return unpermute_rotary(out, heads) if heads else out


def kept_blocks(tensor, heads: int | None) -> dict[str, torch.Tensor]:
    """Q8_0 / Q4_0 / Q4_1 / Q4_K rows -> Hearth int8 / int4 stored tensors (group 32, bf16 scales and zeros)."""
    import torch

    from model.quant_kernels import pack_nibbles

    raw = _raw_rows(tensor)
    if heads:
        raw = unpermute_rotary(raw, heads)
    kind = tensor.tensor_type.name
    blocks = raw.view(raw.shape[0], -1, BLOCK_BYTES[kind])  # [rows, blocks, bytes per block]
    if kind == "Q8_0":  # W = q d
        return {"weight_int8": blocks[..., 2:].contiguous().view(torch.int8).reshape(raw.shape[0], -1),
                "scales": _fp16(blocks, 0).to(torch.bfloat16)}
    codes, scales, zeros = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}[kind](blocks)
    return {"weight_int4": pack_nibbles(codes.reshape(raw.shape[0], -1)),
            "scales": scales.reshape(raw.shape[0], -1).to(torch.bfloat16),
            "zeros": zeros.reshape(raw.shape[0], -1).to(torch.bfloat16)}


BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144}


def _fp16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at `offset` of every block, as float32 [rows, blocks]."""
    import torch

    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).float()[..., 0]


def _nibbles(quads: torch.Tensor) -> torch.Tensor:
    """[..., 32 bytes] -> [..., 2, 32] codes: the low nibbles are one group of 32, the high ones the next."""
    import torch

    return torch.stack((quads & 15, quads >> 4), dim=-2)


def _q4_0(blocks: torch.Tensor):
    """W = (q - 8) d: codes [rows, blocks, 32], scale d, zero 0."""
    import torch

    d = _fp16(blocks, 0)
    codes = _nibbles(blocks[..., 2:]).flatten(-2)  # element j in the low nibble of byte j, j + 16 in the high one
    return codes, d, torch.zeros_like(d)


def _q4_1(blocks: torch.Tensor):
    """W = q d + m = (q - 8) d + (m + 8 d)."""
    d, m = _fp16(blocks, 0), _fp16(blocks, 2)
    return _nibbles(blocks[..., 4:]).flatten(-2), d, m + 8 * d


def _q4_k(blocks: torch.Tensor):
    """256-element super-blocks of 8 groups of 32: W = q (d sc) - dmin mn = (q - 8) s + (8 s - dmin mn), s = d sc."""
    import gguf
    import torch

    rows, count = blocks.shape[:2]
    sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12).numpy())  # 6-bit, [rows*blocks, 8]
    scales = _fp16(blocks, 0)[..., None] * torch.from_numpy(sc.astype("float32")).view(rows, count, 8)
    minima = _fp16(blocks, 2)[..., None] * torch.from_numpy(mn.astype("float32")).view(rows, count, 8)
    # 128 bytes = 4 chunks of 32: chunk k holds group 2k in its low nibbles, group 2k + 1 in its high ones
    codes = _nibbles(blocks[..., 16:].reshape(rows, count, 4, 32)).reshape(rows, count, 256)
    return codes, scales, 8 * scales - minima


def convert_tensors(reader, config: ModelConfig, dtype: str, file: Path):
    """(Hearth state dict, quantization modules) from the reader's tensors; checks names, shapes, types."""
    import torch

    from model.decoder import Transformer

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    sources = _match_tensors(reader, expected, file)
    state: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    store = {"keep": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    for name, tensor in sources.items():
        heads, kind = _rotary_heads(name, config), tensor.tensor_type.name
        module = name.removesuffix(".weight")
        if dtype == "keep" and kind in KEPT_TYPES and len(expected[name]) == 2:
            state.update({f"{module}.{suffix}": t for suffix, t in kept_blocks(tensor, heads).items()})
            modules[module] = {"method": KEPT_TYPES[kind], "group_size": GROUP}
        else:
            state[name] = dequantized(tensor, heads).to(store)
    return state, modules


def _match_tensors(reader, expected: dict[str, tuple[int, ...]], file: Path) -> dict[str, Any]:
    """Hearth name -> GGUF tensor, each checked for type and shape; every expected tensor present."""
    sources = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # already in the config (model_config_from_gguf)
        name = gguf_to_hearth_name(tensor.name)
        if name is None or name not in expected:
            raise GGUFError(f"{file}: tensor {tensor.name} is not part of a llama model Hearth can run")
        kind = tensor.tensor_type.name
        if kind not in KEPT_TYPES and kind not in DEQUANTIZED_TYPES:
            raise GGUFError(f"{file}: tensor {tensor.name} has type {kind}, which is not supported (supported: "
                            f"{', '.join(sorted(KEPT_TYPES.keys() | DEQUANTIZED_TYPES))})")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if shape != expected[name]:
            raise GGUFError(f"{file}: tensor {tensor.name} has shape {list(shape)} but the llama.* keys "
                            f"expect {list(expected[name])}")
        sources[name] = tensor
    missing = sorted(set(expected) - set(sources))
    if missing:
        raise GGUFError(f"{file}: tensor {hearth_to_gguf_name(missing[0])} is missing")
    return sources


# ----------------------------------------------------------------------------- import-gguf


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "keep", overwrite: bool = False) -> Path:
    """Convert a llama GGUF file into a Hearth checkpoint folder (written atomically); returns its path."""
    from model.hf import check_output_folder, recognise_hearth_template

    file, out = Path(gguf_file), Path(out)
    if dtype not in DTYPE_CHOICES:
        raise GGUFError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    reader = open_gguf(file)
    fields = reader.fields
    config = model_config_from_gguf(fields, {t.name: t for t in reader.tensors}, file)
    tokenizer = recognise_hearth_template(tokenizer_from_gguf(fields, file))  # export-gguf's own template back
    check_vocabulary(fields, config, file)
    try:
        check_output_folder(out, file, overwrite)
    except HearthError as exc:
        raise GGUFError(str(exc)) from None
    state, modules = convert_tensors(reader, config, dtype, file)
    source = {"format": "gguf", "file": file.name, "file_type": field_value(fields, "general.file_type", file, False),
              "name": field_value(fields, "general.name", file, False)}
    return write_checkpoint(out, state, config, tokenizer, modules, dtype, source, _model_card(fields, file))


def write_checkpoint(out: Path, state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer,
                     modules: dict[str, dict[str, Any]], dtype: str, source: dict[str, Any], card: str | None) -> Path:
    """A Hearth checkpoint folder from a ready state dict, written atomically."""
    from model.checkpoint import CARD_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE
    from model.checkpoint import write_folder_atomically
    from model.quant import save_aligned_safetensors

    quantization = None
    if modules:
        quantization = {"method": "gguf", "group_size": GROUP, "modules": modules, "source_dtype": "gguf",
                        "kept": sorted(n.removesuffix(".weight") for n in state if n.endswith(".weight")
                                       and "norm" not in n)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "llama",
                "model": config.to_dict(), "tokenizer": tokenizer.info.to_dict(),
                "dtype": "float32" if dtype == "float32" else "bfloat16", "quantization": quantization,
                "imported_from": source}

    def write(tmp: Path) -> None:
        save_aligned_safetensors(state, tmp / WEIGHTS_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if card:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")

    return write_folder_atomically(out, write)


def _model_card(fields: dict[str, Any], file: Path) -> str:
    name = field_value(fields, "general.name", file, required=False) or file.name
    license_ = field_value(fields, "general.license", file, required=False)
    lines = [f"# {name}", "", f"Imported from the GGUF file `{file.name}` with `hearth import-gguf`."]
    if license_:
        lines += ["", f"License: {license_}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- serve --model FILE.gguf


def cache_root() -> Path:
    """Where GGUF files served directly are imported: $HEARTH_CACHE_DIR/gguf (default ~/.cache/hearth/gguf),
    beside the native kernels' cache (model/native.py)."""
    return Path(os.environ.get("HEARTH_CACHE_DIR") or Path.home() / ".cache" / "hearth") / "gguf"


def file_digest(file: Path) -> str:
    hasher = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest()


def cached_import(file: str | Path, dtype: str = "keep") -> Path:
    """The checkpoint folder of a GGUF file, imported into the cache on first use (keyed by its sha256)."""
    file = Path(file)
    folder = cache_root() / f"{file_digest(file)[:32]}-{dtype}"
    if not (folder / "config.json").is_file():
        try:
            import_gguf(file, folder, dtype, overwrite=True)
        except OSError as exc:
            raise GGUFError(f"{folder}: cannot write the import of {file} ({exc.strerror or exc}); "
                            "set HEARTH_CACHE_DIR to a writable folder") from None
    return folder


# ----------------------------------------------------------------------------- CLI


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("import-gguf", help="convert a llama.cpp GGUF file (llama architecture) into a Hearth checkpoint")
    parser.add_argument("gguf_file", metavar="FILE.gguf", help="GGUF file to import")
    parser.add_argument("--out", required=True, metavar="DIR", help="Hearth checkpoint folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                        help="keep: Q8_0 -> int8, Q4_0/Q4_1 -> int4 (groups of 32), the rest bf16; "
                        "float32/bfloat16: dequantize everything (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.set_defaults(handler=run_import)


def run_import(args: argparse.Namespace) -> int:
    from model.hf import _summary

    out = import_gguf(args.gguf_file, args.out, args.dtype, args.overwrite)
    print(f"imported {args.gguf_file} -> {out} ({_summary(out)})")
    return 0
