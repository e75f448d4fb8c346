"""Quantized weight formats and the matmuls that read them.

Storage formats (what model.safetensors holds: portable, the same on every device):

    int8   weight_int8  int8  [out, in]         w ~= q * scale            (symmetric, q in [-127, 127])
           scales       bf16  [out] per output channel, or [out, in/group]
    int4   weight_int4  uint8 [out, in/2]       two 4-bit codes per byte, low nibble = even input column
           scales       bf16  [out, in/group]   w ~= (q - 8) * scale + zero   (asymmetric, q in [0, 15])
           zeros        bf16  [out, in/group]   the value code 8 stands for (tinygemm's convention)

Design choices:
- Codes are computed against the *stored* (bf16-rounded) scales and zeros, so
  the only error left is the rounding of each weight to its grid.
- int4 zeros are the group's mid-range value, not its minimum: near zero, so
  their bf16 rounding costs little, and the CPU and CUDA int4 kernels take
  them as they are.
- One reference path, `reference_matmul`: dequantize to the activation dtype,
  then `F.linear`. It is correct on every device and what the packed kernels
  are tested against; layers the kernels cannot take run through it.
- Packed kernels, chosen per device by `make_matmul`:
  CPU int8 per channel: `torch._weight_int8pack_mm` (bf16 activations, the
  int8 weight used as stored, no copy). CPU int4: packed once at first use
  with `_convert_weight_to_int4pack_for_cpu` (N % 16 == 0, group 32..256,
  in % group == 0), then `_weight_int4pack_mm_for_cpu`. CUDA int4: tinygemm
  (`_convert_weight_to_int4pack` from uint8 with the even column in the HIGH
  nibble, `_weight_int4pack_mm`); CUDA int8: dequantize on the fly (PyTorch's
  CUDA int8 kernel is fp32-only and naive). Packed kernels take bf16: fp32
  activations go 20x slower on CPU, fp16 matmul ~1000x.
- A kernel that was not exercised on this kind of device (CUDA here) is
  checked once against the reference when packed; a mismatch falls back to
  the reference with a warning instead of producing wrong text.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
Matmul = Callable[[Tensor], Tensor]  # x [M, in] -> y [M, out], y in x's dtype


@dataclass
class QuantizedWeight:
    """One quantized [out, in] matrix in its storage format."""

    method: str  # "int8" or "int4"
    data: Tensor  # int8 [out, in] or uint8 [out, in/2]
    scales: Tensor  # [out] (int8 per channel) or [out, in/group]
    zeros: Tensor | None  # int4 only: [out, in/group]
    in_features: int

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def group_size(self) -> int | None:
        """Input columns per scale; None for int8 per output channel."""
        return None if self.scales.dim() == 1 else self.in_features // self.scales.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out, in] matrix this stands for (computed in fp32, then cast)."""
        if self.method == "int8":
            codes = self.data.float()
        else:
            codes = unpack_nibbles(self.data).float() - 8
        scales = self.scales.float()
        if self.group_size is None:
            return (codes * scales[:, None]).to(dtype)
        # [out, in] -> [out, groups, group_size] so each group takes its scale (and zero)
        grouped = codes.view(self.out_features, -1, self.group_size) * scales[..., None]
        if self.zeros is not None:
            grouped = grouped + self.zeros.float()[..., None]
        return grouped.reshape(self.out_features, self.in_features).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.zeros) if t is not None)


# ---------------------------------------------------------------- quantizers


def quantize_int8(weight: Tensor, group_size: int | None = None, scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Symmetric int8 per output channel (group_size None) or per group of input columns."""
    out_features, in_features = weight.shape
    w = weight.detach().float()
    # [out, in] -> [out, groups, group] (one group per row when per channel)
    grouped = w.view(out_features, -1, group_size or in_features)
    absmax = grouped.abs().amax(-1)
    scales = (absmax.clamp(min=1e-12) / 127).to(scale_dtype)
    codes = torch.round(grouped / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    if group_size is None:
        scales = scales[:, 0]
    return QuantizedWeight("int8", codes.view(out_features, in_features), scales.contiguous(), None, in_features)


def quantize_int4(weight: Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Asymmetric int4 per group of input columns: 16 levels spanning each group's [min, max]."""
    out_features, in_features = weight.shape
    # [out, in] -> [out, groups, group]
    grouped = weight.detach().float().view(out_features, -1, group_size)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scales = ((high - low).clamp(min=1e-12) / 15).to(scale_dtype)
    zeros = (low + 8 * scales.float()).to(scale_dtype)
    codes = torch.round((grouped - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    packed = pack_nibbles(codes.to(torch.uint8).view(out_features, in_features))
    return QuantizedWeight("int4", packed, scales.contiguous(), zeros.contiguous(), in_features)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15], [out, in] -> [out, in/2]: even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """[out, in/2] -> uint8 codes [out, in]."""
    # [out, in/2, 2] -> [out, in]: low nibble first, so columns come back in order
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


# ---------------------------------------------------------------- kernels


def reference_matmul(weight: QuantizedWeight) -> Matmul:
    """Dequantize per call, then F.linear in the activation dtype: correct everywhere, slow."""

    def matmul(x: Tensor) -> Tensor:
        return F.linear(x, weight.dequantize(x.dtype))

    return matmul


def int8_cpu_matmul(weight: QuantizedWeight) -> Matmul:
    """torch._weight_int8pack_mm: weight [out, in] int8 as stored, bf16 scales [out], bf16 x."""
    scales = weight.scales.to(torch.bfloat16).contiguous()
    data = weight.data.contiguous()
    if data.data_ptr() % 64:
        data = data.clone()  # the kernel faults on rows that are not 16-byte aligned (mmap of a foreign file)

    def matmul(x: Tensor) -> Tensor:
        if x.dtype is torch.bfloat16:  # the bf16 body of a quantized model: no casts on the hot path
            return torch._weight_int8pack_mm(x.contiguous(), data, scales)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), data, scales).to(x.dtype)

    return matmul


def int4_cpu_matmul(weight: QuantizedWeight) -> Matmul:
    """Pack once for `_weight_int4pack_mm_for_cpu` ([N/64, K, 32] nibble tiles), bf16 x."""
    codes = unpack_nibbles(weight.data).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # innerKTiles: unused on CPU
    scales_and_zeros = tinygemm_scales_and_zeros(weight)
    group_size = weight.group_size

    def matmul(x: Tensor) -> Tensor:
        if x.dtype is torch.bfloat16:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_and_zeros)
        x_bf16 = x.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, packed, group_size, scales_and_zeros).to(x.dtype)

    return matmul


def int4_cuda_matmul(weight: QuantizedWeight) -> Matmul:
    """tinygemm on CUDA: uint8 [N, K/2] with the even column in the HIGH nibble, packed per device."""
    codes = unpack_nibbles(weight.data)
    high_first = (codes[:, 0::2] << 4) | codes[:, 1::2]
    inner_k_tiles = 8 if weight.in_features % 128 == 0 else 4 if weight.in_features % 64 == 0 else 2
    packed = torch.ops.aten._convert_weight_to_int4pack(high_first.contiguous(), inner_k_tiles)
    scales_and_zeros = tinygemm_scales_and_zeros(weight)
    group_size = weight.group_size

    def matmul(x: Tensor) -> Tensor:
        x_bf16 = x.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int4pack_mm(x_bf16, packed, group_size, scales_and_zeros).to(x.dtype)

    return matmul


def int8_cuda_matmul(weight: QuantizedWeight) -> Matmul:
    """Per-channel int8 on CUDA: the int8 -> bf16 cast and the matmul, scales applied to the output."""
    scales = weight.scales.to(torch.bfloat16)
    data = weight.data

    def matmul(x: Tensor) -> Tensor:
        return (F.linear(x.to(torch.bfloat16), data.to(torch.bfloat16)) * scales).to(x.dtype)

    return matmul


def tinygemm_scales_and_zeros(weight: QuantizedWeight) -> Tensor:
    """[out, groups] scales and zeros -> [groups, out, 2] bf16, the layout both tinygemms read."""
    return torch.stack((weight.scales, weight.zeros), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def packed_kernel_name(weight: QuantizedWeight, device: torch.device) -> str | None:
    """The packed kernel that can take this weight on this device, or None (use the reference)."""
    out_features, in_features, group = weight.out_features, weight.in_features, weight.group_size
    if device.type == "cpu":
        if weight.method == "int8" and group is None:
            return "int8_cpu"
        if weight.method == "int4" and group in INT4_KERNEL_GROUP_SIZES and out_features % 16 == 0:
            return "int4_cpu"
    if device.type == "cuda":
        if weight.method == "int8" and group is None:
            return "int8_cuda"
        cuda_int4_ok = out_features % 8 == 0 and in_features % 32 == 0 and torch.cuda.get_device_capability(device)[0] >= 8
        if weight.method == "int4" and group in INT4_KERNEL_GROUP_SIZES and cuda_int4_ok:
            return "int4_cuda"
    return None


KERNELS: dict[str, Callable[[QuantizedWeight], Matmul]] = {
    "int8_cpu": int8_cpu_matmul,
    "int4_cpu": int4_cpu_matmul,
    "int8_cuda": int8_cuda_matmul,
    "int4_cuda": int4_cuda_matmul,
    "reference": reference_matmul,
}
VERIFIED_DEVICE_TYPES = {"cpu"}  # packed kernels whose layouts the test suite checks on this kind of device


def make_matmul(weight: QuantizedWeight, device: torch.device, kernel: str = "auto") -> tuple[str, Matmul]:
    """(kernel name, matmul) for a weight already on `device`. kernel: "auto", "reference" or a KERNELS name."""
    name = (packed_kernel_name(weight, device) or "reference") if kernel == "auto" else kernel
    matmul = KERNELS[name](weight)
    if name != "reference" and device.type not in VERIFIED_DEVICE_TYPES and not _agrees_with_reference(weight, matmul, device):
        warnings.warn(f"quantized {name} kernel disagrees with the dequantized reference on {device}; using the reference")
        return "reference", reference_matmul(weight)
    return name, matmul


def _agrees_with_reference(weight: QuantizedWeight, matmul: Matmul, device: torch.device) -> bool:
    probe = torch.randn(2, weight.in_features, device=device, dtype=torch.bfloat16)
    expected = reference_matmul(weight)(probe.float())
    got = matmul(probe).float()
    return bool(F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999)
