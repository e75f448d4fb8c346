"""Per-request LoRA adapters in the serving engine: one base, any mix of adapters in one step.

    adapter = read_serving_adapter("pirate", folder, model_config, base_path, base_metadata, max_rank=64)
    engine.add_lora(adapter)
    engine.generate(GenerationRequest(request_id, prompt_ids, params, lora="pirate"))

Design choices:
- Two folder formats, told apart by adapter_config.json's content (never by names):
  Hearth's (trainer/lora.py: `"format": "hearth-lora"`, adapter.safetensors) and PEFT's
  (`"peft_type": "LORA"`, adapter_model.safetensors, Hugging Face module names). Both become
  one `ServingAdapter`: per (layer, target) an fp32 A [r, in] and B [out, r], and one scale
  (alpha / r; alpha / sqrt(r) for PEFT's use_rslora).
- Nothing is merged: the base weights stay shared. Each base matmul runs for all rows of a step,
  then, per adapter present in the step, its rows get `scale * (x[rows] @ A.T) @ B.T` on the
  columns of each target the matmul computes (q, k and v share the fused qkv matmul, gate and up
  the gate_up one).
- Where the native kernels run, the deltas are model/csrc/lora_delta.c, called by the one-call
  decoder after each of its matmuls (so a step with adapter rows keeps the one native call) and by
  the per-layer modules' hooks (`LoRAHook`), with the same tables (`native_table`: per layer and
  target an fp32 A [r, in] and scale * B.T [r, out], built at an adapter's first use), so both
  paths give the same bits. Rows are independent there (fixed-order sums per row): batch
  invariance by construction.
- Elsewhere (no native kernels, or a model whose activations are not the native dtype) the hook
  computes the same deltas in PyTorch, on one thread (a few rows by rank wide: waking the OpenMP
  team costs more than the work): one matmul pair per wrapped module and adapter (a fused
  module's targets stacked: A by rows, B block-diagonal with the scale folded in), an adapter's
  rows padded (the last row repeated) to a multiple of the fp32 matmul's row multiple
  (kv_cache.find_row_multiple), so a row's delta does not depend on how many rows share its
  adapter; padded rows' results are dropped. A step without adapter rows pays one Python call per
  wrapped module, nothing else.
- Everything is checked at load, never mid-batch (AdapterError -> 400): rank at most the
  engine's `max_lora_rank`, targets among the seven above, every tensor's shape the base's,
  finite values; for a Hearth adapter also the base's config hash and weights fingerprint
  (trainer/lora.py), so an adapter trained on another base is refused naming both. PEFT
  features the hook cannot express (DoRA, bias, modules_to_save, rank/alpha patterns,
  fan_in_fan_out) are refused by name. A PEFT folder records no fingerprint: shapes are checked.
- Prefix cache: each loaded adapter gets a fresh random `cache_key` that seeds its sequences'
  block-hash chain (scheduler), so KV is shared only between requests of the same adapter load
  (an adapter reloaded under the same name never reuses the old one's KV).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import native
from model.checkpoint import WEIGHTS_FILE, read_safetensors
from model.config import ModelConfig
from model.errors import HearthError
from trainer.lora import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    ALL_TARGETS,
    AdapterError,
    base_config_hash,
    base_weights_fingerprint,
    read_adapter_config,
)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_PEFT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight")
_HEARTH_KEY = re.compile(r"layers\.(\d+)\.(?:attn|mlp)\.(\w+)\.lora_([ab])")
_PEFT_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                     "layers_pattern", "megatron_config")

LoRAWeights = dict[tuple[int, str], tuple[Tensor, Tensor]]  # (layer, target) -> (A [r, in], B [out, r]), fp32


@dataclass(eq=False)
class ServingAdapter:
    """A loaded adapter as the engine uses it."""

    name: str  # the model name requests use
    path: Path  # its folder
    source_format: str  # "hearth" or "peft"
    rank: int
    scale: float  # the delta's factor: alpha / rank (alpha / sqrt(rank) with rsLoRA)
    weights: LoRAWeights = field(repr=False)
    cache_key: bytes = field(default_factory=lambda: os.urandom(16))  # seeds its prefix-cache hashes
    packs: dict = field(default_factory=dict, repr=False)  # LoRAHook.key -> stacked weights (LoRAHook._pack)

    @property
    def targets(self) -> list[str]:
        return sorted({target for _, target in self.weights}, key=ALL_TARGETS.index)

    def to(self, device: torch.device) -> "ServingAdapter":
        self.weights = {key: (a.to(device), b.to(device)) for key, (a, b) in self.weights.items()}
        return self


# --- reading and checking adapter folders ---------------------------------------------------


def read_serving_adapter(name: str, folder: str | Path, model_config: ModelConfig, base_path: Path | None,
                         base_metadata: dict[str, Any], max_rank: int) -> ServingAdapter:
    """Read a Hearth or PEFT adapter folder and check it against the served base; AdapterError otherwise."""
    folder = Path(folder)
    metadata, kind = check_adapter_config(folder)
    if kind == "hearth":
        adapter = _read_hearth(name, folder, metadata)
        _check_hearth_base(adapter, metadata, base_path, base_metadata)
    else:
        adapter = _read_peft(name, folder, metadata)
    _check_weights(adapter, model_config, max_rank)
    return adapter


def check_adapter_config(folder: Path) -> tuple[dict[str, Any], str]:
    """adapter_config.json and its kind ("hearth" or "peft"), told apart by content; AdapterError otherwise."""
    metadata = read_adapter_config(Path(folder))
    if metadata.get("format") == ADAPTER_FORMAT:
        return metadata, "hearth"
    if str(metadata.get("peft_type", "")).upper() == "LORA":
        return metadata, "peft"
    raise AdapterError(f"{Path(folder) / ADAPTER_CONFIG}: neither a Hearth adapter (\"format\": \"{ADAPTER_FORMAT}\") "
                       "nor a PEFT LoRA adapter (\"peft_type\": \"LORA\")")


def _positive_number(value: Any, what: str, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value > 0 or (not integer and not math.isfinite(value)):
        raise AdapterError(f"{what} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


def _read_hearth(name: str, folder: Path, metadata: dict[str, Any]) -> ServingAdapter:
    where = folder / ADAPTER_CONFIG
    rank = _positive_number(metadata.get("rank"), f"{where}: rank", integer=True)
    alpha = _positive_number(metadata.get("alpha"), f"{where}: alpha")
    weights = _pair_tensors(_read_tensors(folder / ADAPTER_WEIGHTS), _HEARTH_KEY, folder / ADAPTER_WEIGHTS,
                            {t: t for t in ALL_TARGETS}, ("a", "b"))
    return ServingAdapter(name, folder, "hearth", rank, alpha / rank, weights)


def _read_peft(name: str, folder: Path, metadata: dict[str, Any]) -> ServingAdapter:
    where = folder / ADAPTER_CONFIG
    unsupported = [key for key in _PEFT_UNSUPPORTED if metadata.get(key)]
    if metadata.get("bias", "none") not in ("none", None):
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(f"{where}: {unsupported[0]} = {metadata[unsupported[0]]!r} is not supported by the "
                           "serving engine (plain LoRA on q/k/v/o/gate/up/down only)")
    rank = _positive_number(metadata.get("r"), f"{where}: r", integer=True)
    alpha = _positive_number(metadata.get("lora_alpha", rank), f"{where}: lora_alpha")
    scale = alpha / math.sqrt(rank) if metadata.get("use_rslora") else alpha / rank
    weights = _pair_tensors(_read_tensors(folder / PEFT_WEIGHTS), _PEFT_KEY, folder / PEFT_WEIGHTS, PEFT_TARGETS, ("A", "B"))
    return ServingAdapter(name, folder, "peft", rank, scale, weights)


def _read_tensors(file: Path) -> dict[str, Tensor]:
    try:
        return read_safetensors(file)
    except HearthError as exc:
        raise AdapterError(str(exc)) from None


def _pair_tensors(state: dict[str, Tensor], pattern: re.Pattern, file: Path, names: dict[str, str],
                  sides: tuple[str, str]) -> LoRAWeights:
    """{key: tensor} -> {(layer, target): (A, B)} in fp32; keys that are not A/B of a served target are refused."""
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in state.items():
        match = pattern.fullmatch(key)
        if match is None or match[2] not in names:
            raise AdapterError(f"{file}: tensor {key} is not a LoRA A/B of a decoder layer's q, k, v, o, gate, up "
                               "or down projection (the only targets the serving engine can serve)")
        found.setdefault((int(match[1]), names[match[2]]), {})[match[3]] = tensor
    if not found:
        raise AdapterError(f"{file}: no LoRA tensors")
    pairs = {}
    for (layer, target), sides_found in found.items():
        missing = [side for side in sides if side not in sides_found]
        if missing:
            raise AdapterError(f"{file}: layer {layer} {target} has no lora_{missing[0]} tensor")
        pairs[(layer, target)] = tuple(sides_found[side].float().contiguous() for side in sides)
    return pairs


@lru_cache(maxsize=8)
def _fingerprint(weights_file: str, size: int, mtime_ns: int) -> str:
    return base_weights_fingerprint(Path(weights_file).parent)


def _check_hearth_base(adapter: ServingAdapter, metadata: dict[str, Any], base_path: Path | None,
                       base_metadata: dict[str, Any]) -> None:
    """A Hearth adapter names its base by fingerprints: refuse any other base, naming both."""
    if base_path is None:
        return  # an engine handed in without its folder: only the shapes can be checked
    trained_on = metadata.get("base", "?")
    if metadata.get("base_config_hash") != base_config_hash(base_metadata):
        raise AdapterError(f"{adapter.path}: adapter '{adapter.name}' was trained on {trained_on}, whose "
                           f"architecture or tokenizer differs from the served base {base_path}")
    if base_metadata.get("quantization"):
        raise AdapterError(f"{adapter.path}: the served base {base_path} is quantized; serve the adapter on the "
                           f"unquantized base it was trained on ({trained_on})")
    weights = base_path / WEIGHTS_FILE
    fingerprint = metadata.get("base_weights_fingerprint")
    if fingerprint and weights.is_file():
        stat = weights.stat()
        if fingerprint != _fingerprint(str(weights), stat.st_size, stat.st_mtime_ns):
            raise AdapterError(f"{adapter.path}: adapter '{adapter.name}' was trained on {trained_on}, but the "
                               f"weights of the served base {base_path} differ (same architecture, other training)")


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    dim, ffn = config.dim, config.ffn_dim
    return {"q": (dim, q), "k": (dim, kv), "v": (dim, kv), "o": (q, dim),
            "gate": (dim, ffn), "up": (dim, ffn), "down": (ffn, dim)}


def _check_weights(adapter: ServingAdapter, config: ModelConfig, max_rank: int) -> None:
    if adapter.rank > max_rank:
        raise AdapterError(f"{adapter.path}: rank {adapter.rank} is above the engine's limit of {max_rank} "
                           "(--max-lora-rank)")
    shapes = linear_shapes(config)
    for (layer, target), (a, b) in sorted(adapter.weights.items()):
        where = f"{adapter.path}: layer {layer} {target}"
        if layer >= config.n_layers:
            raise AdapterError(f"{where}: the base model has {config.n_layers} layers")
        in_features, out_features = shapes[target]
        expected = ((adapter.rank, in_features), (out_features, adapter.rank))
        if (tuple(a.shape), tuple(b.shape)) != expected:
            raise AdapterError(f"{where}: A {list(a.shape)} and B {list(b.shape)}, the base model expects "
                               f"A {list(expected[0])} and B {list(expected[1])} (an adapter for another base?)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{where}: weights hold NaN or infinity")


# --- the per-row delta ------------------------------------------------------------------------


@dataclass
class AdapterRows:
    """The rows of one adapter in a step's flattened batch."""

    adapter: ServingAdapter
    rows: Tensor  # [m] row indices
    padded_rows: Tensor  # [m rounded up to the row multiple]: rows, the last one repeated


@dataclass
class LoRAStep:
    """What the hooks read during a step: the worker sets `groups` before the forward, clears it after."""

    row_multiple: int  # padding of each adapter's rows (fp32 matmul, see module docstring)
    num_layers: int
    native: bool = False  # whether the deltas run in csrc/lora_delta.c (set by the worker)
    groups: list[AdapterRows] = field(default_factory=list)
    native_groups: ctypes.Array | None = None  # the groups as csrc/lora.h's hearth_lora_group array

    def plan(self, row_adapters: Iterable[ServingAdapter | None], device: torch.device) -> list[AdapterRows]:
        """Group the rows (one entry per row of the step, None for base rows) by adapter."""
        by_adapter: dict[int, tuple[ServingAdapter, list[int]]] = {}
        for row, adapter in enumerate(row_adapters):
            if adapter is not None:
                by_adapter.setdefault(id(adapter), (adapter, []))[1].append(row)
        groups = []
        for adapter, rows in by_adapter.values():
            padded = rows + [rows[-1]] * (-len(rows) % self.row_multiple)
            groups.append(AdapterRows(adapter, torch.tensor(rows, device=device), torch.tensor(padded, device=device)))
        self.groups = groups
        self.native_groups = self._native_groups(groups) if self.native and groups else None
        return groups

    def _native_groups(self, groups: list[AdapterRows]) -> ctypes.Array:
        return (native.LoRAGroup * len(groups))(*[
            native.LoRAGroup(ctypes.addressof(native_table(group.adapter, self.num_layers)), group.rows.data_ptr(),
                             group.rows.shape[0]) for group in groups])

    def clear(self) -> None:
        self.groups, self.native_groups = [], None


def native_table(adapter: ServingAdapter, num_layers: int) -> ctypes.Array:
    """`adapter` as csrc/lora.h's table of num_layers x 7 terms (ALL_TARGETS order), built at first use
    and kept with the adapter (with the tensors it points into)."""
    if "native" not in adapter.packs:
        tensors, terms = [], []
        for layer in range(num_layers):
            for target in ALL_TARGETS:
                if (layer, target) not in adapter.weights:
                    terms.append(native.LoRATerm())
                    continue
                a, b = adapter.weights[(layer, target)]
                bt = (b * adapter.scale).T.contiguous()  # [r, out]
                a = a.contiguous()
                tensors += [a, bt]
                terms.append(native.LoRATerm(a.data_ptr(), bt.data_ptr(), a.shape[0], a.shape[1], bt.shape[1]))
        adapter.packs["native"] = ((native.LoRATerm * len(terms))(*terms), tensors)
    return adapter.packs["native"][0]


class LoRAHook(nn.Module):
    """A base linear module (plain, fused or packed) plus the step's per-adapter deltas on its columns."""

    def __init__(self, base: nn.Module, layer: int, columns: dict[str, tuple[int, int]], step: LoRAStep):
        super().__init__()
        self.base, self.layer, self.columns, self.step = base, layer, columns, step
        self.key = (layer, next(iter(columns)))  # names this module in ServingAdapter.packs
        self.sites = (native.LoRASite * len(columns))(
            *[native.LoRASite(ALL_TARGETS.index(target), first) for target, (first, _) in columns.items()])

    def forward(self, x: Tensor) -> Tensor:
        y = self.base.forward(x)
        if self.step.groups:
            rows_in, rows_out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            if self.step.native_groups is not None and x.dtype == native.activation_dtype():
                native.lora_add(rows_in.contiguous(), rows_out, self.step.native_groups, self.layer, self.sites)
            else:
                self._add_deltas(rows_in, rows_out)
        return y

    def _add_deltas(self, x: Tensor, y: Tensor) -> None:
        """PyTorch's deltas. Per adapter: rows' x -> one matmul with its stacked A -> one with its scaled
        block-diagonal B, added into the columns its targets cover. On one thread: these matmuls are a
        few rows by rank wide, and waking the OpenMP team for each costs more than the work."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for group in self.step.groups:
                pack = self._pack(group.adapter)
                if pack is None:
                    continue
                a, b, start, end = pack
                inputs = x.index_select(0, group.padded_rows).float()
                delta = F.linear(F.linear(inputs, a), b)[:group.rows.shape[0]]
                y[:, start:end].index_put_((group.rows,), delta.to(y.dtype), accumulate=True)  # rows are unique
        finally:
            torch.set_num_threads(threads)

    def _pack(self, adapter: ServingAdapter) -> tuple[Tensor, Tensor, int, int] | None:
        """This module's targets of `adapter` as one A [T*r, in] and one scaled B [end - start, T*r], built
        at first use (engine thread) and kept with the adapter; None if it targets none of them."""
        if self.key not in adapter.packs:
            adapter.packs[self.key] = stack_targets(adapter, self.layer, self.columns)
        return adapter.packs[self.key]


def stack_targets(adapter: ServingAdapter, layer: int, columns: dict[str, tuple[int, int]]):
    """(A stacked by rows, block-diagonal scale * B over the covered columns, first column, end column)."""
    present = [(target, span) for target, span in columns.items() if (layer, target) in adapter.weights]
    if not present:
        return None
    start, end = min(span[0] for _, span in present), max(span[1] for _, span in present)
    a = torch.cat([adapter.weights[(layer, target)][0] for target, _ in present])
    b = torch.zeros(end - start, a.shape[0], dtype=a.dtype, device=a.device)
    for index, (target, (first, last)) in enumerate(present):
        rank = adapter.rank
        b[first - start:last - start, index * rank:(index + 1) * rank] = adapter.weights[(layer, target)][1] * adapter.scale
    return a.contiguous(), b, start, end


def hook_sites(block: nn.Module, config: ModelConfig) -> list[tuple[nn.Module, str, dict[str, tuple[int, int]]]]:
    """(parent, attribute, {target: output columns}) of each linear module of a layer to wrap."""
    shapes = linear_shapes(config)
    attn, mlp = block.attn, block.mlp
    q, kv, ffn = shapes["q"][1], shapes["k"][1], shapes["gate"][1]
    if hasattr(attn, "qkv"):  # cpu_fast.FusedAttention: q, k, v stacked by rows
        sites = [(attn, "qkv", {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)})]
    else:
        sites = [(attn, name, {name: (0, shapes[name][1])}) for name in ("q", "k", "v")]
    sites.append((attn, "o", {"o": (0, shapes["o"][1])}))
    if hasattr(mlp, "gate_up"):  # cpu_fast.FusedMLP
        sites.append((mlp, "gate_up", {"gate": (0, ffn), "up": (ffn, 2 * ffn)}))
    else:
        sites += [(mlp, name, {name: (0, ffn)}) for name in ("gate", "up")]
    sites.append((mlp, "down", {"down": (0, shapes["down"][1])}))
    return sites


def install_hooks(model: nn.Module, step: LoRAStep) -> int:
    """Wrap every targeted linear module of every layer (once) -> modules wrapped."""
    count = 0
    for layer, block in enumerate(model.layers):
        for parent, attribute, columns in hook_sites(block, model.config):
            module = getattr(parent, attribute)
            if not isinstance(module, LoRAHook):
                setattr(parent, attribute, LoRAHook(module, layer, columns, step))
                count += 1
    return count
