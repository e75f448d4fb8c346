"""LoRA: low-rank adapters on the decoder's linear layers, saved apart from the base.

    y = W x + (alpha / rank) * B (A dropout(x))      A: [rank, in], B: [out, rank]

Design choices:
- `LoRALinear` wraps the frozen base `nn.Linear` instead of copying it, so the
  base weight stays a view of the memory-mapped checkpoint (no extra copy) and
  merging is `W += scale * B @ A` on that one tensor.
- B starts at zero (A at Kaiming-uniform, as in the LoRA paper), so a freshly
  wrapped model computes exactly the base model's logits.
- Targets are the decoder's own module names (q, k, v, o of attention; gate,
  up, down of the MLP), applied in every layer.
- An adapter folder is `adapter.safetensors` (keys `layers.{i}.{attn|mlp}.{name}.lora_a|lora_b`)
  plus `adapter_config.json`: rank, alpha, dropout, targets, the base folder,
  and two fingerprints of the base, so an adapter is never merged onto a model
  it was not trained on:
    * `base_config_hash`: sha256 of the base's architecture and tokenizer
      entries of config.json. A mismatch is always refused (shapes or token
      ids would not line up).
    * `base_weights_fingerprint`: sha256 of the safetensors header plus 64
      evenly spaced 64 KiB samples of the weights file: constant cost whatever
      the model size, and any other training run differs in every sample.
      A mismatch is refused unless the caller forces it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_safetensors, write_folder_atomically
from model.decoder import Transformer
from model.errors import HearthError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION = "hearth-lora", 1
ATTENTION_TARGETS, MLP_TARGETS = ("q", "k", "v", "o"), ("gate", "up", "down")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class AdapterError(HearthError):
    """An adapter that cannot be used: missing files, bad config, or trained on another base."""


@dataclass
class LoRAConfig:
    rank: int  # inner dimension r of B @ A
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    targets: tuple[str, ...] = ALL_TARGETS  # module names, applied in every layer

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets:
            raise AdapterError(
                f"--lora-targets: unknown module {unknown[0] if unknown else '(none)'!r}; "
                f"choose from {','.join(ALL_TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def parse_targets(cls, text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters train in fp32 even on a bf16 base: their updates are tiny next to W.
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        # Two skinny matmuls ([.., in] -> [.., r] -> [.., out]); never form B @ A while training.
        update = (self.dropout(x) @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + self.scale * update

    def merged_weight(self) -> Tensor:
        """W + scale * B @ A, computed in fp32 and cast back to W's dtype."""
        weight = self.base.weight
        delta = self.scale * (self.lora_b.float() @ self.lora_a.float())
        return (weight.float() + delta).to(weight.dtype)


def _target_parents(model: Transformer, targets: tuple[str, ...]):
    """(qualified name, parent module, attribute) of every targeted linear layer."""
    for index, block in enumerate(model.layers):
        for parent_name, parent, names in (("attn", block.attn, ATTENTION_TARGETS), ("mlp", block.mlp, MLP_TARGETS)):
            for name in names:
                if name in targets:
                    yield f"layers.{index}.{parent_name}.{name}", parent, name


def apply_lora(model: Transformer, config: LoRAConfig, seed: int | None = None) -> list[nn.Parameter]:
    """Freeze the model, wrap the targeted linears; returns the trainable adapter parameters."""
    if seed is not None:
        torch.manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for qualified, parent, name in _target_parents(model, config.targets):
        base = getattr(parent, name)
        if not isinstance(base, nn.Linear):
            raise AdapterError(
                f"{qualified} is a {type(base).__name__}, not a plain linear layer: "
                "LoRA needs the unquantized base checkpoint"
            )
        wrapped = LoRALinear(base, config.rank, config.alpha, config.dropout)
        setattr(parent, name, wrapped)
        trainable += [wrapped.lora_a, wrapped.lora_b]
    return trainable


def lora_modules(model: Transformer) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_state_dict(model: Transformer) -> dict[str, Tensor]:
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_a"] = module.lora_a.detach().contiguous()
        state[f"{name}.lora_b"] = module.lora_b.detach().contiguous()
    return state


def load_adapter_state(model: Transformer, state: dict[str, Tensor], source: str) -> None:
    """Copy saved A/B matrices into a model already wrapped by `apply_lora` (same targets)."""
    modules = lora_modules(model)
    expected = {f"{n}.{p}": getattr(m, p) for n, m in modules.items() for p in ("lora_a", "lora_b")}
    for key, param in expected.items():
        if key not in state:
            raise AdapterError(f"{source}: missing tensor {key}")
        if tuple(state[key].shape) != tuple(param.shape):
            raise AdapterError(
                f"{source}: tensor {key} has shape {list(state[key].shape)}, the base model expects {list(param.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise AdapterError(f"{source}: unexpected tensor {unexpected[0]} (not one of the adapter's targets)")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and unwrap it (in place)."""
    for qualified, module in lora_modules(model).items():
        parent_name, _, attribute = qualified.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = module.base
        with torch.no_grad():
            base.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
        setattr(parent, attribute, base)
    return model


# --- fingerprints of the base model -------------------------------------------------


def base_config_hash(metadata: dict[str, Any]) -> str:
    """sha256 of the architecture and tokenizer entries of a base's config.json."""
    identity = {"model": metadata.get("model"), "tokenizer": metadata.get("tokenizer")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def base_weights_fingerprint(folder: Path, num_samples: int = 64, sample_bytes: int = 65536) -> str:
    """sha256 of the weights file's size, header, and evenly spaced samples of its data."""
    file = Path(folder) / WEIGHTS_FILE
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(min(header_size, size)))
        stride = max(size // num_samples, 1)
        for offset in range(0, size, stride):
            handle.seek(offset)
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


# --- adapter folders ------------------------------------------------------------------


def save_adapter(folder: str | Path, model: Transformer, config: LoRAConfig, base: Path,
                 base_metadata: dict[str, Any], training: dict[str, Any] | None = None,
                 extra_files: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """Write adapter.safetensors + adapter_config.json (+ extra files: name -> writer(path)) atomically."""
    state = adapter_state_dict(model)
    adapter_config = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "base": str(Path(base).resolve()),
        "base_config_hash": base_config_hash(base_metadata),
        "base_weights_fingerprint": base_weights_fingerprint(base),
        **{k: v for k, v in asdict(config).items() if k != "targets"},
        "targets": list(config.targets),
        "training": training,
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    return write_folder_atomically(Path(folder), write)


@dataclass
class Adapter:
    config: LoRAConfig
    metadata: dict[str, Any]  # the whole adapter_config.json
    state: dict[str, Tensor] = field(repr=False)  # lora_a / lora_b tensors by qualified name
    path: Path = Path(".")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """FOLDER/adapter_config.json as a dict (Hearth or PEFT); a one-line AdapterError naming the file otherwise."""
    config_file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found")
    if not config_file.is_file():
        raise AdapterError(f"{config_file}: missing (not a LoRA adapter folder)")
    try:
        metadata = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise AdapterError(f"{config_file}: not a JSON object")
    return metadata


def read_adapter(path: str | Path) -> Adapter:
    folder = Path(path)
    config_file = folder / ADAPTER_CONFIG
    metadata = read_adapter_config(folder)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{config_file}: not a Hearth LoRA adapter (no \"format\": \"{ADAPTER_FORMAT}\")")
    try:
        config = LoRAConfig(metadata["rank"], metadata["alpha"], metadata.get("dropout", 0.0), metadata["targets"])
    except (KeyError, TypeError) as exc:
        raise AdapterError(f"{config_file}: missing or invalid field {exc}") from None
    try:
        state = read_safetensors(folder / ADAPTER_WEIGHTS)
    except HearthError as exc:
        raise AdapterError(str(exc)) from None
    return Adapter(config, metadata, state, folder)


def check_base(adapter: Adapter, base: Path, base_metadata: dict[str, Any], force: bool = False) -> None:
    """Refuse a base that is not the one the adapter was trained on."""
    trained_on = adapter.metadata.get("base", "?")
    if adapter.metadata.get("base_config_hash") != base_config_hash(base_metadata):
        raise AdapterError(
            f"{adapter.path}: adapter was trained on {trained_on}, whose architecture or tokenizer differs from "
            f"{base / CONFIG_FILE}; merge it onto that base"
        )
    if base_metadata.get("quantization"):
        raise AdapterError(f"{base}: base is quantized; apply the adapter to the unquantized base, then quantize")
    fingerprint = adapter.metadata.get("base_weights_fingerprint")
    if not force and fingerprint and fingerprint != base_weights_fingerprint(base):
        raise AdapterError(
            f"{adapter.path}: adapter was trained on {trained_on}, but the weights of {base} differ "
            "(same architecture, other training); pass --force to apply it anyway"
        )


def attach_adapter(model: Transformer, adapter: Adapter) -> Transformer:
    """Wrap `model` with the adapter's targets and load its weights (dropout off)."""
    config = LoRAConfig(adapter.config.rank, adapter.config.alpha, 0.0, adapter.config.targets)
    apply_lora(model, config)
    load_adapter_state(model, adapter.state, str(adapter.path / ADAPTER_WEIGHTS))
    return model
