"""Weight-only quantization: `hearth quantize` offline, quantized layers swapped in at load.

    hearth quantize weights/default --method int8 --out weights/default-int8
    hearth quantize weights/default --method int4 --group-size 32 --out weights/default-int4

Design choices:
- Offline: the full-precision state dict is quantized tensor by tensor and
  written as a new checkpoint folder (safetensors + config.json, atomically);
  no model is built. Formats are in model/quant_kernels.py.
- config.json's "quantization" entry lists every quantized module with its
  method and group size. The loader (`prepare_for_loading`, called by
  model/checkpoint.load_checkpoint on the meta-device model) swaps in layer
  types from that list alone, never from file or folder names.
- Non-quantized tensors (norms, and any skipped module) are stored in bf16,
  recorded as config.json "dtype": a quantized model runs with a bf16 body,
  which is what the CPU kernels take.
- `QuantizedLinear` replaces a bias-free nn.Linear. Its buffers are the
  stored tensors; the device kernel (and, for int4, the packed copy of the
  weight) is made at first use on a device and dropped when the module moves.
  Inputs of any shape [..., in] and dtype: the kernels see 2-D bf16, the
  output comes back in the input's dtype, so an fp32 body still works.
- The embedding table is quantized on disk like any weight but dequantized
  to the body dtype when loaded (`QuantizedEmbedding`): it is read one row
  per token, so keeping it quantized in memory would save RAM but no time,
  and callers rely on `model.embed.weight` being the body's float tensor.
  A tied LM head therefore stays tied to it.
- Quantizing a quantized checkpoint is refused; so is a group size that does
  not divide a layer's input dimension (the error names the layer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.errors import HearthError
from model.quant_kernels import QuantizedWeight, make_matmul, quantize_int4, quantize_int8

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 32}  # int8: one scale per output channel
DEFAULT_SKIP: tuple[str, ...] = ()  # quantize everything: measured no better kept in bf16 (README "Quantization")
STORE_DTYPE = torch.bfloat16  # scales, zeros and every non-quantized tensor
STORE_DTYPE_NAME = "bfloat16"


class QuantizationError(HearthError):
    """A quantize request that cannot work (already quantized, group size, unknown module)."""


@dataclass(frozen=True)
class LayerQuant:
    """How one module is quantized; what config.json records per module."""

    method: str  # "int8" or "int4"
    group_size: int | None  # input columns per scale; None: int8 per output channel

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "LayerQuant":
        if not isinstance(data, dict) or data.get("method") not in METHODS:
            raise HearthError(f"quantization.modules.{name}: method must be one of {', '.join(METHODS)}, got {data!r}")
        group_size = data.get("group_size")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
            raise HearthError(f"quantization.modules.{name}: group_size must be null or an even integer, got {group_size!r}")
        if data["method"] == "int4" and group_size is None:
            raise HearthError(f"quantization.modules.{name}: int4 needs a group_size")
        return cls(data["method"], group_size)

    def quantize(self, weight: Tensor) -> QuantizedWeight:
        if self.method == "int8":
            return quantize_int8(weight, self.group_size, STORE_DTYPE)
        return quantize_int4(weight, self.group_size, STORE_DTYPE)

    def stored_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Buffer name -> (shape, dtype) as in model.safetensors."""
        scale_shape = (out_features,) if self.group_size is None else (out_features, in_features // self.group_size)
        if self.method == "int8":
            return {"weight_int8": ((out_features, in_features), torch.int8), "scales": (scale_shape, STORE_DTYPE)}
        return {
            "weight_int4": ((out_features, in_features // 2), torch.uint8),
            "scales": (scale_shape, STORE_DTYPE),
            "zeros": (scale_shape, STORE_DTYPE),
        }


def stored_tensors(weight: QuantizedWeight) -> dict[str, Tensor]:
    """A QuantizedWeight as the named tensors a checkpoint stores (suffixes of the module name)."""
    tensors = {f"weight_{weight.method}": weight.data, "scales": weight.scales}
    if weight.zeros is not None:
        tensors["zeros"] = weight.zeros
    return tensors


class _QuantizedBuffers(nn.Module):
    """Registers the stored tensors of one quantized matrix as buffers."""

    def __init__(self, out_features: int, in_features: int, spec: LayerQuant, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        for name, (shape, dtype) in spec.stored_shapes(out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    def quantized_weight(self) -> QuantizedWeight:
        zeros = self.zeros if self.spec.method == "int4" else None
        data = getattr(self, f"weight_{self.spec.method}")
        return QuantizedWeight(self.spec.method, data, self.scales, zeros, self.in_features)

    def extra_repr(self) -> str:
        group = f"group_size={self.spec.group_size}" if self.spec.group_size else "per_channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.method}, {group}"


class QuantizedLinear(_QuantizedBuffers):
    """A bias-free nn.Linear whose weight is stored int8 or int4; forward runs the device's kernel."""

    def __init__(self, in_features: int, out_features: int, spec: LayerQuant, device: torch.device | str | None = None):
        super().__init__(out_features, in_features, spec, device)
        self.kernel = "auto"  # "auto" (packed kernel when the device has one) or "reference"
        self.kernel_name: str | None = None  # the kernel in use; None until the first forward
        self._matmul = None  # x [M, in] -> [M, out] on the weights' device; made at first use

    @classmethod
    def from_weight(cls, weight: QuantizedWeight) -> "QuantizedLinear":
        layer = cls(weight.in_features, weight.out_features, LayerQuant(weight.method, weight.group_size), weight.data.device)
        for name, tensor in stored_tensors(weight).items():
            setattr(layer, name, tensor)
        return layer

    @classmethod
    def stacked(cls, *layers: "QuantizedLinear") -> "QuantizedLinear":
        """One layer computing all of `layers` (same input, same method): their weights stacked by rows.

        Exact: each output column still reads only its own row, scales and zeros.
        Fewer, larger calls (q/k/v, gate/up) save per-call overhead when decoding.
        """
        specs = {(layer.spec, layer.in_features) for layer in layers}
        if len(specs) != 1:
            raise ValueError("stacked layers need the same input width, method and group size")
        weights = [layer.quantized_weight() for layer in layers]
        zeros = torch.cat([w.zeros for w in weights]) if weights[0].zeros is not None else None
        return cls.from_weight(QuantizedWeight(weights[0].method, torch.cat([w.data for w in weights]),
                                               torch.cat([w.scales for w in weights]), zeros, weights[0].in_features))

    def forward(self, x: Tensor) -> Tensor:
        # [..., in] -> [M, in] -> [M, out] -> [..., out]
        matmul = self._matmul or self._prepare()
        return matmul(x.reshape(-1, self.in_features)).view(x.shape[:-1] + (self.out_features,))

    def _prepare(self):
        self.kernel_name, self._matmul = make_matmul(self.quantized_weight(), self.scales.device, self.kernel)
        return self._matmul

    def _apply(self, fn, recurse=True):
        self._matmul = self.kernel_name = None  # moved or cast: repack at next use
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._matmul = self.kernel_name = None
        return super()._load_from_state_dict(*args, **kwargs)


class QuantizedEmbedding(_QuantizedBuffers):
    """An embedding stored quantized; dequantized to the stored scales' dtype when its state is loaded."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: LayerQuant, device: torch.device | str | None = None):
        super().__init__(num_embeddings, embedding_dim, spec, device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.scales.is_meta:
            return
        stored = self.quantized_weight()
        table = stored.dequantize(self.scales.dtype)
        self._buffers.clear()  # the quantized buffers go: the float table replaces them for lookups
        self.weight = nn.Parameter(table, requires_grad=False)
        # the codes, kept (not saved) for a tied LM head: the engine's native kernels read them
        # (server/engine/cpu_fast.tied_quantized_head) instead of the float table
        self.stored = stored

    def forward(self, tokens: Tensor) -> Tensor:
        return nn.functional.embedding(tokens, self.weight)

    def extra_repr(self) -> str:
        group = f"group_size={self.spec.group_size}" if self.spec.group_size else "per_channel"
        return f"{self.out_features}, {self.in_features}, stored {self.spec.method} {group}, dequantized at load"


# ---------------------------------------------------------------- loading


def read_plan(quantization: dict[str, Any]) -> dict[str, LayerQuant]:
    """config.json "quantization" -> module name -> LayerQuant."""
    modules = quantization.get("modules") if isinstance(quantization, dict) else None
    if not isinstance(modules, dict) or not modules:
        raise HearthError("quantization.modules must map module names to {method, group_size}")
    return {name: LayerQuant.from_dict(name, spec) for name, spec in modules.items()}


def prepare_for_loading(model: nn.Module, quantization: dict[str, Any]) -> None:
    """Swap the modules config.json lists for quantized ones whose buffers match the stored tensors."""
    from model.checkpoint import CONFIG_FILE
    from model.errors import CheckpointError

    try:
        plan = read_plan(quantization)
        for name, spec in plan.items():
            model.set_submodule(name, quantized_module_for(model, name, spec))
    except HearthError as exc:
        raise CheckpointError(f"{CONFIG_FILE}: {exc}") from None


def quantized_module_for(model: nn.Module, name: str, spec: LayerQuant) -> nn.Module:
    module = dict(model.named_modules()).get(name)
    tied = getattr(model, "config", None) is not None and model.config.tie_embeddings
    if name == "lm_head" and tied:
        raise HearthError("quantization.modules.lm_head: the LM head is tied to the embedding (quantize embed instead)")
    if isinstance(module, nn.Linear) and module.bias is None:
        check_group_size(name, module.in_features, spec)
        return QuantizedLinear(module.in_features, module.out_features, spec, device=module.weight.device)
    if isinstance(module, nn.Embedding):
        check_group_size(name, module.embedding_dim, spec)
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, spec, device=module.weight.device)
    raise HearthError(f"quantization.modules.{name}: not a bias-free linear layer or embedding of this model")


def check_group_size(name: str, in_features: int, spec: LayerQuant) -> None:
    if spec.group_size is not None and in_features % spec.group_size:
        raise QuantizationError(
            f"{name}: group size {spec.group_size} does not divide its input dimension {in_features}; "
            f"choose a --group-size that divides {in_features}"
        )
    if spec.method == "int4" and in_features % 2:
        raise QuantizationError(f"{name}: int4 needs an even input dimension, got {in_features}")


# ---------------------------------------------------------------- offline quantization


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every bias-free nn.Linear and nn.Embedding; a tied LM head is the embedding, so left out."""
    tied = model.config.tie_embeddings
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) and module.bias is None and not (tied and name == "lm_head"))
        or isinstance(module, nn.Embedding)
    }


def plan_quantization(config, method: str, group_size: int | None, skip: list[str]) -> dict[str, LayerQuant]:
    """Module name -> LayerQuant for every module not skipped; checks names and group sizes."""
    from model.decoder import Transformer

    if method not in METHODS:
        raise QuantizationError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "int4" and group_size is None:
        raise QuantizationError("--method int4 needs a --group-size (32, 64, 128 or 256)")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise QuantizationError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    with torch.device("meta"):
        modules = quantizable_modules(Transformer(config))
    skipped = _resolve_skip(skip, modules, config.tie_embeddings)
    spec = LayerQuant(method, group_size)
    plan = {}
    for name, module in modules.items():
        if name in skipped:
            continue
        check_group_size(name, module.weight.shape[1], spec)
        plan[name] = spec
    return plan


def _resolve_skip(skip: list[str], modules: dict[str, nn.Module], tied: bool) -> set[str]:
    """--skip entries (module names or prefixes such as layers.0) -> the module names they cover."""
    skipped = set()
    for entry in skip:
        if entry == "lm_head" and tied:
            continue  # the tied head is the embedding: it follows `embed`
        covered = {name for name in modules if name == entry or name.startswith(entry + ".")}
        if not covered:
            raise QuantizationError(
                f"--skip: no module named {entry!r} (modules: embed, lm_head, layers.N, "
                "layers.N.attn.q|k|v|o, layers.N.mlp.gate|up|down)"
            )
        skipped |= covered
    return skipped


def quantize_state(state: dict[str, Tensor], plan: dict[str, LayerQuant]) -> dict[str, Tensor]:
    """Full-precision state dict -> stored quantized one: planned weights quantized, the rest bf16."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module in plan and leaf == "weight":
            for suffix, stored in stored_tensors(plan[module].quantize(tensor)).items():
                out[f"{module}.{suffix}"] = stored.contiguous()
        elif tensor.is_floating_point():
            out[name] = tensor.to(STORE_DTYPE).clone()  # clone: never a view into the source mmap
        else:
            out[name] = tensor.clone()
    missing = sorted(m for m in plan if f"{m}.weight" not in state)
    if missing:
        raise QuantizationError(f"model.safetensors has no weight for {missing[0]}")
    return out


@dataclass
class QuantizeReport:
    """What `hearth quantize` did, for the one-screen summary."""

    out: Path  # the folder written
    num_quantized: int  # modules quantized
    kept: list[str]  # quantizable modules left in bf16
    source_bytes: int  # size of the source model.safetensors
    out_bytes: int  # size of the written model.safetensors


def quantize_checkpoint(source: str | Path, out: str | Path, method: str, group_size: int | None = None,
                        skip: list[str] | tuple[str, ...] = DEFAULT_SKIP) -> QuantizeReport:
    """Quantize checkpoint folder `source` into a new folder `out` (written atomically)."""
    from model.checkpoint import CARD_FILE, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_metadata, read_safetensors
    from model.checkpoint import write_folder_atomically
    from model.config import ModelConfig

    source, out = Path(source), Path(out)
    metadata = read_metadata(source)
    if metadata.get("quantization"):
        done = metadata["quantization"]
        raise QuantizationError(
            f"{source} is already quantized ({done.get('method', '?')}, group size {done.get('group_size')}); "
            "quantize its full-precision checkpoint instead"
        )
    if out.resolve() == source.resolve():
        raise QuantizationError(f"--out {out} is the source folder; write the quantized checkpoint to a new folder")
    config = ModelConfig.from_dict(metadata.get("model", {}))
    plan = plan_quantization(config, method, group_size, list(skip))
    state = read_safetensors(source / WEIGHTS_FILE)
    quantized = quantize_state(state, plan)
    kept = sorted(set(_all_quantizable(config)) - set(plan))
    new_metadata = {**metadata, "dtype": STORE_DTYPE_NAME, "quantization": {
        "method": method,
        "group_size": group_size,
        "modules": {name: spec.to_dict() for name, spec in plan.items()},
        "kept": kept,  # quantizable modules left in `dtype`
        "source_dtype": metadata.get("dtype"),
    }}

    def write(tmp: Path) -> None:
        save_aligned_safetensors(quantized, tmp / WEIGHTS_FILE)
        shutil.copyfile(source / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(new_metadata, indent=2) + "\n", encoding="utf-8")
        if (source / CARD_FILE).is_file():
            card = (source / CARD_FILE).read_text(encoding="utf-8")
            note = f"\n\nQuantized with `hearth quantize --method {method}` ({describe(method, group_size)}).\n"
            (tmp / CARD_FILE).write_text(card.rstrip("\n") + note, encoding="utf-8")

    write_folder_atomically(out, write)
    return QuantizeReport(out, len(plan), kept, (source / WEIGHTS_FILE).stat().st_size, (out / WEIGHTS_FILE).stat().st_size)


SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                           torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
ALIGNMENT = 64  # bytes


def save_aligned_safetensors(tensors: dict[str, Tensor], file: Path) -> None:
    """A standard safetensors file whose large tensors start 64-byte aligned.

    The int8 kernel reads weights in place from the memory-mapped file, and it
    faults on rows that are not 16-byte aligned; safetensors' own writer only
    aligns to 8. The format allows no holes, so: header padded with spaces
    (allowed by the spec) to a multiple of 64, then every tensor whose size is
    a multiple of 64 (largest first), then the rest.
    """
    def nbytes(name: str) -> int:
        return tensors[name].numel() * tensors[name].element_size()

    order = sorted(tensors, key=lambda name: (nbytes(name) % ALIGNMENT != 0, -nbytes(name), name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        tensor = tensors[name]
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes(name)]}
        offset += nbytes(name)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % ALIGNMENT)
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for name in order:
            handle.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _all_quantizable(config) -> list[str]:
    from model.decoder import Transformer

    with torch.device("meta"):
        return list(quantizable_modules(Transformer(config)))


def describe(method: str, group_size: int | None) -> str:
    return f"{method}, " + (f"groups of {group_size}" if group_size else "one scale per output channel")


# ---------------------------------------------------------------- CLI


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quantize", help="write an int8 or int4 weight-only quantized copy of a checkpoint")
    parser.add_argument("checkpoint", help="full-precision checkpoint folder")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--group-size", type=int, default=None,
                        help="input columns per scale: 32, 64, 128 or 256 (int4 default 32; int8 default: per output channel)")
    parser.add_argument("--skip", default=",".join(DEFAULT_SKIP) or "none",
                        help="comma-separated modules to keep in bf16: embed, lm_head, or prefixes such as layers.0; "
                        "'none' quantizes everything (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    parser.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    group_size = args.group_size if args.group_size is not None else DEFAULT_GROUP_SIZE[args.method]
    skip = [] if args.skip.strip().lower() in ("", "none") else [s.strip() for s in args.skip.split(",") if s.strip()]
    report = quantize_checkpoint(args.checkpoint, args.out, args.method, group_size, skip)
    ratio = report.out_bytes / report.source_bytes
    print(f"quantized {report.num_quantized} modules ({describe(args.method, group_size)}); "
          f"kept in {STORE_DTYPE_NAME}: {', '.join(report.kept) or 'none'} (and the norms)")
    print(f"model.safetensors: {report.source_bytes / 1e6:.1f} MB -> {report.out_bytes / 1e6:.1f} MB ({ratio:.1%})")
    print(f"wrote {report.out}")
    return 0
