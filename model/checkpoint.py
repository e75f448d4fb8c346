"""Checkpoint folders: the one on-disk format the trainer writes and the server reads.

    NAME/
      config.json        format tag, architecture (`model`), tokenizer info and
                         chat template, dtype, quantization metadata, extras
      model.safetensors  weights (tied lm_head stored once, as embed.weight)
      tokenizer.json     Hugging Face `tokenizers` file
      README.md          model card, when one is known

Design choices:
- No pickles anywhere. Behaviour comes from config.json, never from names.
- Loading builds the model on the meta device and points its parameters at a
  copy-on-write mmap of model.safetensors (`UntypedStorage.from_file`), so a
  `large` model loads without reading, let alone copying, the whole file up
  front; pages come in as they are touched.
- Every problem is a `CheckpointError` naming the file: missing, not JSON,
  truncated safetensors, a tensor missing, or a shape that disagrees with
  config.json (expected vs found).
- Saves write a temp folder beside the target and swap it into place
  (model/folder_swap.py: one atomic exchange on Linux), so a save killed at
  any instant leaves a complete checkpoint, the previous one or the new.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.decoder import Transformer, rope_inverse_frequencies
from model.errors import CheckpointError, HearthError
from model.folder_swap import write_folder_atomically  # noqa: F401  (re-exported: trainer/lora.py)
from model.tokenizer import Tokenizer, TokenizerInfo

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, CARD_FILE = "config.json", "model.safetensors", "tokenizer.json", "README.md"
FORMAT, FORMAT_VERSION = "hearth", 1

_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    metadata: dict[str, Any]  # the whole config.json
    path: Path
    quantization: dict[str, Any] | None = field(default=None)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Parse and check NAME/config.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (not a Hearth checkpoint folder)")
    try:
        metadata = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{config_file}: not a Hearth checkpoint (no \"format\": \"hearth\"); "
            "for a Hugging Face model run `hearth import-hf` first"
        )
    return metadata


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a checkpoint folder: model (eval mode), tokenizer, config, metadata."""
    folder = Path(path)
    metadata = read_metadata(folder)
    try:
        config = ModelConfig.from_dict(metadata.get("model", {}))
    except HearthError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None
    tokenizer = Tokenizer.load(folder / TOKENIZER_FILE, TokenizerInfo.from_dict(metadata.get("tokenizer", {})))
    quantization = metadata.get("quantization")
    with torch.device("meta"):
        model = Transformer(config)
    if quantization:
        from model.quant import prepare_for_loading  # quantized layer types come from metadata only

        prepare_for_loading(model, quantization)
    state = read_safetensors(folder / WEIGHTS_FILE)
    _check_tensors(folder / WEIGHTS_FILE, model, state, config.tie_embeddings)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inverse_frequencies(config)
    model = model.to(device).eval()
    return Checkpoint(model, tokenizer, config, metadata, folder, quantization)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file as views into a copy-on-write mmap of it."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the checkpoint has no weights)")
    file_size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > file_size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(handle.read(header_size))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=file_size)
    data_start = 8 + header_size
    tensors = {}
    for name, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        start, end = entry["data_offsets"]
        if dtype is None or data_start + end > file_size:
            raise CheckpointError(f"{file}: corrupt safetensors file (tensor {name} is truncated or of unknown dtype)")
        tensor = torch.empty(0, dtype=dtype)
        count = (end - start) // tensor.element_size()
        tensor.set_(storage, (data_start + start) // tensor.element_size(), (count,))
        tensors[name] = tensor.view(entry["shape"])
    return tensors


def _check_tensors(file: Path, model: Transformer, state: dict[str, torch.Tensor], tied: bool) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{file}: missing tensor {name}")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{file}: tensor {name} has shape {list(state[name].shape)} but config.json expects {list(shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{file}: unexpected tensor {unexpected[0]} (config.json does not describe it)")


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict as saved: tied lm_head dropped, every tensor contiguous and unshared."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    quantization: dict[str, Any] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    model_card: str | None = None,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write a checkpoint folder atomically. `extra_files` maps a file name to a writer(path)."""
    folder = Path(path)
    state = model_state_dict(model)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "llama",
        "model": model.config.to_dict(),
        "tokenizer": tokenizer.info.to_dict(),
        "dtype": _dtype_name(model.embed.weight.dtype if float_dtypes else torch.float32),
        "quantization": quantization,
        **(extra_metadata or {}),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save(tmp / TOKENIZER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if model_card:
            (tmp / CARD_FILE).write_text(model_card, encoding="utf-8")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    return write_folder_atomically(folder, write)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in DTYPES.items() if value == dtype), str(dtype).removeprefix("torch."))
