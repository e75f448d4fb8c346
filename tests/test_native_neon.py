"""The ARM64 NEON side of the fp32 path, checked on an x86 machine: the kernels cross-compiled with
Debian's gcc-aarch64-linux-gnu into tests/native_harness.c, run under qemu-user on inputs (and
weights packed) by model/native.py, against an fp64 reference, and bit for bit against the x86
AVX2 build where this CPU runs it (csrc/vec.h gives both ISAs one order of operations).

Skipped, saying why, where the cross compiler or qemu is missing (.ci/run installs both); on an
ARM64 machine tests/test_native_fp32.py runs the NEON path natively instead."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import native
from model.quant_kernels import quantize_int4, quantize_int8, unpack_nibbles

CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
KERNEL_FILES = ("linear_bf16", "linear_int8", "linear_int4", "paged_attention", "rms_norm", "decoder_layers",
                "lora_delta")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    binary = tmp_path_factory.mktemp("neon") / "native_harness"
    sources = [str(native.SOURCE_DIR / f"{name}.c") for name in KERNEL_FILES]
    command = [CROSS_CC, "-O3", "-std=gnu11", *native.ISAS["neon"].compile_flags, "-fopenmp",
               str(Path(__file__).with_name("native_harness.c")), *sources, "-o", str(binary), "-lm"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return binary


def run_neon(harness: Path, folder: Path, kernel: str, numbers: list, inputs: list[torch.Tensor],
             outputs: list[tuple]) -> list[torch.Tensor]:
    """Write `inputs`, run the harness on them under qemu, read `outputs` ((shape, dtype) each) back."""
    paths = []
    for index, tensor in enumerate(inputs):
        path = folder / f"{kernel}-in{index}.bin"
        path.write_bytes(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        paths.append(str(path))
    out_paths = [str(folder / f"{kernel}-out{index}.bin") for index in range(len(outputs))]
    command = [QEMU, "-L", str(SYSROOT), str(harness), kernel, *map(str, numbers), *paths, *out_paths]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=dtype).view(shape)
            for path, (shape, dtype) in zip(out_paths, outputs)]


@pytest.fixture
def on_avx2(monkeypatch):
    """A function running the in-process AVX2 kernels, or None where this CPU has no AVX2."""
    if "avx2" not in native.runnable_isas():
        yield None
        return
    monkeypatch.setenv("HEARTH_NATIVE_ISA", "avx2")
    native.forget_kernels()
    yield lambda run: run()
    native.forget_kernels()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


NEON = native.ISAS["neon"]


@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-g32", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("rows", [1, 5])
def test_neon_linears_match_fp64_and_the_avx2_bits(harness, tmp_path, on_avx2, kind, rows):
    out_features, in_features = 70, 192
    x = randn(rows, in_features, seed=1)
    weight = randn(out_features, in_features, seed=2).to(torch.bfloat16).float()
    method, _, group = kind.partition("-g")
    group_size = int(group) if group else 0
    if method == "bf16":
        inputs, numbers = [x, native.pack_bf16_weight(weight, NEON)], [rows, out_features, in_features, 2]
        dense = weight
        local = lambda: native.linear_bf16(x, native.pack_bf16_weight(weight), out_features)  # noqa: E731
    elif method == "int8":
        quantized = quantize_int8(weight, group_size or None)
        inputs = [x, *native.pack_int8_weight(quantized.data, quantized.scales, NEON)]
        numbers, dense = [rows, out_features, in_features, group_size, 2], quantized.dequantize(torch.float64)
        local = lambda: native.linear_int8(x, native.pack_int8_weight(quantized.data, quantized.scales),  # noqa: E731
                                           out_features, group_size)
    else:
        quantized = quantize_int4(weight, group_size)
        codes = unpack_nibbles(quantized.data)
        inputs = [x, native.pack_int4_weight(codes, quantized.scales, quantized.zeros, NEON)]
        numbers, dense = [rows, out_features, in_features, group_size, 2], quantized.dequantize(torch.float64)
        local = lambda: native.linear_int4(x, native.pack_int4_weight(codes, quantized.scales,  # noqa: E731
                                                                      quantized.zeros), out_features, group_size)
    [out] = run_neon(harness, tmp_path, f"linear_{method}", numbers, inputs, [((rows, out_features), torch.float32)])
    expected = x.double() @ dense.double().T
    assert (out.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    if on_avx2:
        assert torch.equal(out, on_avx2(local))


def test_neon_attention_rope_norm_and_swiglu_match_the_avx2_bits(harness, tmp_path, on_avx2):
    heads, kv_heads, head_dim, block, num_blocks = 4, 2, 32, 4, 20
    slots = num_blocks * block
    keys, values = randn(kv_heads, slots, head_dim, seed=3), randn(kv_heads, slots, head_dim, seed=4)
    table = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(5)) + 1).to(torch.int32)
    positions = torch.tensor([0, 9, 40, 75], dtype=torch.int32)
    offsets = torch.zeros(4, dtype=torch.int64)  # every row reads the same table
    q = randn(4, heads, head_dim, seed=6)
    numbers = [4, heads, kv_heads, head_dim, block, slots, 0.125, 2]
    [attended] = run_neon(harness, tmp_path, "attention", numbers, [q, keys, values, table, offsets, positions],
                          [((4, heads, head_dim), torch.float32)])
    x, weight, gate_up = randn(3, 64, seed=7) * 3, randn(64, seed=8), randn(3, 2 * 48, seed=9) * 10
    [normed] = run_neon(harness, tmp_path, "rms_norm", [3, 64, 1e-5, 2], [x, weight], [((3, 64), torch.float32)])
    [swiglu] = run_neon(harness, tmp_path, "silu_mul", [3, 48, 2], [gate_up], [((3, 48), torch.float32)])
    cos, sin = randn(4, head_dim, seed=10), randn(4, head_dim, seed=11)
    qkv, rope_slots = randn(4, (heads + 2 * kv_heads) * head_dim, seed=12), torch.tensor([3, 7, 8, 60])
    rotated, cached_keys, cached_values = run_neon(
        harness, tmp_path, "rope", [4, heads, kv_heads, head_dim, slots, 2], [qkv, cos, sin, rope_slots],
        [(qkv.shape, torch.float32), (keys.shape, torch.float32), (values.shape, torch.float32)])
    gate, up = gate_up.split(48, dim=-1)
    assert torch.allclose(swiglu, F.silu(gate) * up, rtol=1e-5, atol=1e-30)
    reference_norm = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.allclose(normed, reference_norm, rtol=1e-5)
    assert torch.equal(cached_keys[:, rope_slots], rotated.view(4, -1, head_dim)[:, heads:heads + kv_heads].transpose(0, 1))
    if on_avx2:
        def local():
            local_keys, local_values, local_qkv = torch.zeros_like(keys), torch.zeros_like(values), qkv.clone()
            native.rope_write_kv(local_qkv, cos, sin, heads, kv_heads, local_keys, local_values, rope_slots)
            return (native.paged_attention(q, keys, values, table, offsets, positions, block, 0.125),
                    native.rms_norm(x, weight, 1e-5), native.silu_mul(gate_up, 48), local_qkv, local_keys, local_values)

        for neon_result, avx2_result in zip((attended, normed, swiglu, rotated, cached_keys, cached_values),
                                            on_avx2(local)):
            assert torch.equal(neon_result, avx2_result)


def test_neon_lora_delta_matches_fp64_and_the_avx2_bits(harness, tmp_path, on_avx2):
    """csrc/lora_delta.c: rank 5 and 20 output columns (a partial last chunk), rows 0, 2 and 3 of 4."""
    rows, fan_in, fan_out, rank = 4, 48, 20, 5
    x, y = randn(rows, fan_in, seed=13), randn(rows, fan_out, seed=14)
    a, bt = randn(rank, fan_in, seed=15), randn(rank, fan_out, seed=16)
    group_rows = torch.tensor([0, 2, 3, -1])
    [out] = run_neon(harness, tmp_path, "lora", [rows, fan_in, fan_out, rank, 2], [x, y, a, bt, group_rows],
                     [((rows, fan_out), torch.float32)])
    expected = y.double().clone()
    expected[[0, 2, 3]] += (x[[0, 2, 3]].double() @ a.double().T) @ bt.double()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], y[1])
    if on_avx2:
        def local():
            term = native.LoRATerm(a.data_ptr(), bt.data_ptr(), rank, fan_in, fan_out)
            table = (native.LoRATerm * 7)(term)
            kept = group_rows[:3].contiguous()
            groups = (native.LoRAGroup * 1)(native.LoRAGroup(ctypes.addressof(table), kept.data_ptr(), 3))
            result = y.clone()
            native.lora_add(x, result, groups, 0, (native.LoRASite * 1)(native.LoRASite(0, 0)))
            return result

        assert torch.equal(out, on_avx2(local))
