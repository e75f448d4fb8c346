"""The native bf16 linear (server/engine/native.py, csrc/linear_bf16.c): against an fp32
reference, batch invariance, the shared OpenMP runtime, the compile cache and the fallbacks."""

import logging
from pathlib import Path

import pytest
import torch

from server.engine import native
from server.engine.cpu_fast import PackedLinear


def native_or_skip():
    try:
        native.check_cpu()
    except native.NativeUnavailable as error:
        pytest.skip(f"the native kernel cannot run here: {error}")
    if native.linear_bf16_kernel() is None:
        pytest.skip("the native kernel did not build here (see the warning it logged)")


@pytest.fixture
def fresh_kernel_cache(monkeypatch, tmp_path):
    """An empty compile cache and a forgotten kernel; the real one comes back afterwards."""
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    native.linear_bf16_kernel.cache_clear()
    yield tmp_path
    native.linear_bf16_kernel.cache_clear()


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


# Tails in N (not a multiple of 4) and K (not a multiple of 32); `small`'s K = 3072.
@pytest.mark.parametrize("out_features,in_features", [(37, 40), (64, 64), (130, 3072), (8, 1)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_native_linear_matches_an_fp32_reference(out_features, in_features, rows):
    native_or_skip()
    weight, x = bf16(out_features, in_features), bf16(rows, in_features, seed=1)
    out = native.linear_bf16(x, native.pack_bf16_weight(weight), out_features)
    expected = x.float() @ weight.float().T
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    # round-to-nearest bf16 of an fp32 sum: half an ulp (2^-9 relative), plus the sum's own error
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-3 * in_features**0.5).all()


def test_native_linear_rows_do_not_depend_on_the_row_count():
    """Each row alone equals the same row among up to 70 others (oneDNN fails this at K = 3072)."""
    native_or_skip()
    weight, x = bf16(96, 3072), bf16(70, 3072, seed=1)
    packed = native.pack_bf16_weight(weight)
    alone = torch.cat([native.linear_bf16(x[i:i + 1], packed, 96) for i in range(70)])
    for rows in (2, 3, 4, 5, 8, 17, 70):
        assert torch.equal(native.linear_bf16(x[:rows], packed, 96), alone[:rows])


def test_native_linear_takes_any_leading_shape_and_row_stride():
    native_or_skip()
    weight, x = bf16(20, 64), bf16(2, 3, 128, seed=1)
    packed = native.pack_bf16_weight(weight)
    strided = x[..., ::2]  # last dim not contiguous
    rows_view = x[:, :, :64]  # contiguous last dim, row stride 128
    for inputs in (strided, rows_view):
        out = native.linear_bf16(inputs, packed, 20)
        assert out.shape == (2, 3, 20)
        assert torch.equal(out, native.linear_bf16(inputs.contiguous(), packed, 20))


def test_packed_linear_uses_the_native_kernel_and_matches_nn_linear():
    native_or_skip()
    linears = [torch.nn.Linear(96, out, bias=False).to(torch.bfloat16) for out in (32, 16)]
    packed = PackedLinear(*linears)
    x = bf16(5, 96, seed=2)
    expected = torch.cat([linear(x) for linear in linears], dim=-1).float()
    assert packed.kernel == "native"
    assert ((packed(x).float() - expected).abs() <= expected.abs() * 2**-7 + 1e-2).all()


def test_the_kernel_shares_torchs_openmp_runtime():
    """One libgomp in the process: the kernel's threads are torch's, not a second team on the same cores."""
    native_or_skip()
    native.linear_bf16(bf16(1, 64), native.pack_bf16_weight(bf16(8, 64)), 8)
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len({Path(path).resolve() for path in mapped}) == 1, mapped


def test_compiled_library_is_cached_and_reused(fresh_kernel_cache):
    native_or_skip()
    first = native.compile_library("linear_bf16")
    stamp = first.stat().st_mtime_ns
    assert first.parent == fresh_kernel_cache / "native" and first.suffix == ".so"
    assert native.compile_library("linear_bf16") == first and first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.tmp"))  # the temporary file was renamed, not left behind


def test_switched_off_it_falls_back_to_onednn(fresh_kernel_cache, monkeypatch, caplog):
    monkeypatch.setenv("HEARTH_NATIVE_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger="hearth.native"):
        assert native.linear_bf16_kernel() is None
    assert "HEARTH_NATIVE_KERNELS=0" in caplog.text
    if torch.backends.mkldnn.is_available():
        assert PackedLinear(torch.nn.Linear(64, 8, bias=False).to(torch.bfloat16)).kernel == "onednn"


def test_a_compiler_that_fails_gives_a_one_line_reason_and_the_fallback(fresh_kernel_cache, monkeypatch, caplog):
    try:
        native.check_cpu()
    except native.NativeUnavailable as error:
        pytest.skip(f"fails earlier here: {error}")
    broken = fresh_kernel_cache / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'linear_bf16.c:1: error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger="hearth.native"):
        assert native.linear_bf16_kernel() is None
    message = next(r.getMessage() for r in caplog.records if r.name == "hearth.native")
    assert "using oneDNN" in message and "error: no such thing" in message and "\n" not in message
    assert not list((fresh_kernel_cache / "native").glob("*"))  # no half-written library left
