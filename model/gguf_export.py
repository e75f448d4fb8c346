"""`hearth export-gguf`: a Hearth checkpoint -> a llama.cpp GGUF file (general.architecture = llama).

    hearth export-gguf weights/default --out default.gguf [--type f32|f16|bf16|q8_0|q4_0]

Design choices:
- Written with the `gguf` package's GGUFWriter and quantizers (llama.cpp's
  own layouts), so llama.cpp and Ollama read what they wrote themselves.
- Keys: the llama.* architecture keys, the byte-level BPE tokenizer as
  `gpt2` tokens / token types (special added tokens CONTROL, other added
  ones USER_DEFINED) / merges, `tokenizer.ggml.pre` naming the pre-tokenizer
  that splits text exactly as the checkpoint's does (model/gguf_tokenizer.py),
  bos / eos / pad / eot (the first stop token other than EOS, Hearth's
  `<|end|>`), `add_bos_token`, and the chat template (Hearth's own rendered
  as Jinja by model/hf.py, or the imported model's).
- Q and K rows are permuted to llama.cpp's interleaved rotary layout. Llama 3
  RoPE scaling is written as llama.cpp reads it: rope_freqs.weight (the factor
  each frequency is divided by) and the original context length.
- Norms are always F32 (as llama.cpp writes them); 2-D weights take --type.
  A matrix whose rows do not split into 32-element blocks falls back to F16.
- Quantized checkpoints are dequantized and re-quantized to --type: Hearth's
  int4 zeros do not map onto Q4_0 exactly, so nothing claims otherwise.
- The file is written beside the target and renamed into place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.gguf_import import ROPE_FREQS, hearth_to_gguf_name, permute_rotary, rope_factors
from model.gguf_tokenizer import GGUFError, gguf_tokenizer_fields

if TYPE_CHECKING:
    import numpy as np
    import torch

TYPE_CHOICES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_QUANT_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType


def float_state(folder: Path, metadata: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as float32 tensors by Hearth name (quantized modules dequantized)."""
    import torch

    from model.checkpoint import WEIGHTS_FILE, read_safetensors
    from model.quant import read_plan
    from model.quant_kernels import QuantizedWeight

    stored = read_safetensors(folder / WEIGHTS_FILE)
    plan = read_plan(metadata["quantization"]) if metadata.get("quantization") else {}
    state = {name: t.float() for name, t in stored.items() if name.rpartition(".")[0] not in plan}
    for module, spec in plan.items():
        data = stored[f"{module}.weight_{spec.method}"]
        in_features = data.shape[1] * (2 if spec.method == "int4" else 1)
        weight = QuantizedWeight(spec.method, data, stored[f"{module}.scales"], stored.get(f"{module}.zeros"), in_features)
        state[f"{module}.weight"] = weight.dequantize(torch.float32)
    return state


def tensor_payload(weight: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype) for GGUFWriter.add_tensor: norms F32, matrices in --type."""
    import gguf
    import numpy as np

    if weight.ndim == 1 or kind == "f32":
        return weight.astype(np.float32), None
    if kind in ("q8_0", "q4_0") and weight.shape[1] % 32:
        kind = "f16"  # rows that do not split into 32-element blocks
    if kind == "f16":
        return weight.astype(np.float16), None
    quant = getattr(gguf.GGMLQuantizationType, _QUANT_NAMES[kind])
    return gguf.quants.quantize(weight.astype(np.float32), quant), quant


def add_model_keys(writer, config, name: str, kind: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[kind])


def add_tokenizer_keys(writer, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)


def chat_template_of(tokenizer) -> str | None:
    from model.hf import _uses_hearth_markers, hearth_chat_template_jinja

    info = tokenizer.info
    if info.chat_template == "hearth" and _uses_hearth_markers(tokenizer):
        return hearth_chat_template_jinja(tokenizer)
    return info.jinja_template if info.chat_template == "jinja" else None


def export_gguf(checkpoint_dir: str | Path, out: str | Path, kind: str = "f32", overwrite: bool = False) -> Path:
    """Write a Hearth checkpoint as a GGUF file (atomically); returns its path."""
    import gguf

    from model.checkpoint import TOKENIZER_FILE, read_metadata
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer, TokenizerInfo

    folder, out = Path(checkpoint_dir), Path(out)
    if kind not in TYPE_CHOICES:
        raise GGUFError(f"--type must be one of {', '.join(TYPE_CHOICES)}, got {kind!r}")
    metadata = read_metadata(folder)
    config = ModelConfig.from_dict(metadata.get("model", {}))
    if out.exists() and not overwrite:
        raise GGUFError(f"--out {out}: already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise GGUFError(f"--out {out}: is a folder; name a .gguf file")
    tokenizer = Tokenizer.load(folder / TOKENIZER_FILE, TokenizerInfo.from_dict(metadata.get("tokenizer", {})))
    fields = gguf_tokenizer_fields(tokenizer, config.vocab_size, chat_template_of(tokenizer))
    state = float_state(folder, metadata)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        add_model_keys(writer, config, str(metadata.get("imported_from", {}).get("name") or folder.name), kind)
        add_tokenizer_keys(writer, fields)
        if config.rope_scaling is not None:  # llama.cpp reads Llama 3 scaling as per-frequency factors
            writer.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_position_embeddings)
            writer.add_tensor(ROPE_FREQS, rope_factors(config).numpy().astype("float32"))
        for name, weight in state.items():
            heads = config.n_heads if name.endswith("attn.q.weight") else config.n_kv_heads if name.endswith("attn.k.weight") else None
            if heads:
                weight = permute_rotary(weight, heads)
            array, raw_dtype = tensor_payload(weight.numpy(), kind)
            writer.add_tensor(hearth_to_gguf_name(name), array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export-gguf", help="write a Hearth checkpoint as a llama.cpp GGUF file")
    parser.add_argument("checkpoint", metavar="DIR", help="Hearth checkpoint folder")
    parser.add_argument("--out", required=True, metavar="FILE.gguf", help="GGUF file to write")
    parser.add_argument("--type", dest="kind", choices=TYPE_CHOICES, default="f32",
                        help="matrix type (norms stay f32; default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    out = export_gguf(args.checkpoint, args.out, args.kind, args.overwrite)
    print(f"exported {args.checkpoint} -> {out} ({args.kind}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0
