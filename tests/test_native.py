"""The native kernels' AVX-512 BF16 path (model/native.py, model/csrc/): bf16, int8 and int4 linears,
attention, rotary and RMSNorm against fp32 references, batch invariance, all layers in one call
against the modules; and, for every path, the shared OpenMP runtime, the compile cache and the
fallbacks. The fp32 path (AVX2, NEON) has tests/test_native_fp32.py."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import native
from model.quant_kernels import quantize_int4, quantize_int8, unpack_nibbles
from server.engine.cpu_fast import PackedInt4Linear, PackedInt8Linear, PackedLinear, is_native_int4, is_native_int8


def native_or_skip():
    """Skip unless the AVX-512 BF16 path is the one in use (these tests feed it bf16)."""
    try:
        native.check_cpu(native.ISAS["avx512bf16"])
    except native.NativeUnavailable as error:
        pytest.skip(f"the AVX-512 BF16 kernels cannot run here: {error}")
    if native.isa_name() != "avx512bf16":
        pytest.skip(f"the native path in use is {native.isa_name()}, not avx512bf16")
    if None in (native.linear_bf16_kernel(), native.linear_int8_kernel(), native.linear_int4_kernel(),
                native.paged_attention_kernel(), native.decoder_layers_kernel(),
                native.rms_norm_kernel(), native.rope_write_kv_kernel()):
        pytest.skip("the native kernels did not build here (see the warning logged)")


@pytest.fixture
def fresh_kernel_cache(monkeypatch, tmp_path):
    """An empty compile cache and a forgotten kernel; the real one comes back afterwards."""
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    native.forget_kernels()
    yield tmp_path
    native.forget_kernels()


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


@pytest.mark.parametrize("out_features,in_features", [(37, 40), (64, 64), (130, 3072), (8, 1)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_native_int8_linear_matches_an_fp32_reference(out_features, in_features, rows):
    native_or_skip()
    weight = quantize_int8(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)))
    x = bf16(rows, in_features, seed=1)
    out = native.linear_int8(x, native.pack_int8_weight(weight.data, weight.scales), out_features)
    expected = x.float() @ weight.dequantize().T
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-3 * in_features**0.5).all()


def test_native_int8_rows_do_not_depend_on_the_row_count():
    native_or_skip()
    weight = quantize_int8(torch.randn(96, 3072, generator=torch.Generator().manual_seed(0)))
    packed, x = native.pack_int8_weight(weight.data, weight.scales), bf16(70, 3072, seed=1)
    alone = torch.cat([native.linear_int8(x[i:i + 1], packed, 96) for i in range(70)])
    for rows in (2, 3, 4, 5, 8, 17, 70):
        assert torch.equal(native.linear_int8(x[:rows], packed, 96), alone[:rows])


def test_packed_int8_linear_stacks_layers_and_matches_their_kernel():
    native_or_skip()
    from model.quant import LayerQuant, QuantizedLinear

    layers = [QuantizedLinear.from_weight(quantize_int8(torch.randn(out, 96))) for out in (32, 20)]
    assert all(is_native_int8(layer) for layer in layers)
    packed, x = PackedInt8Linear(*layers), bf16(5, 96, seed=2)
    expected = torch.cat([layer(x) for layer in layers], dim=-1).float()  # _weight_int8pack_mm
    assert packed.out_features == 52
    assert ((packed(x).float() - expected).abs() <= expected.abs() * 2**-7 + 1e-2).all()
    reference_only = QuantizedLinear(96, 8, LayerQuant("int8", None))
    reference_only.kernel = "reference"  # pinned by the user: left alone
    assert not is_native_int8(reference_only)


def int4_weight(out_features, in_features, group_size, seed=0):
    return quantize_int4(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)), group_size)


def pack_int4(weight):
    return native.pack_int4_weight(unpack_nibbles(weight.data), weight.scales, weight.zeros)


# Tails in N (not a multiple of 16); every group size the int4 format has; `small`'s K = 3072.
@pytest.mark.parametrize("out_features,in_features,group_size", [(37, 64, 32), (16, 96, 32), (130, 3072, 64),
                                                                 (70, 256, 128), (48, 512, 256)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_native_int4_linear_matches_an_fp32_reference(out_features, in_features, group_size, rows):
    native_or_skip()
    weight = int4_weight(out_features, in_features, group_size)
    x = bf16(rows, in_features, seed=1)
    out = native.linear_int4(x, pack_int4(weight), out_features, group_size)
    expected = x.float() @ weight.dequantize().T  # (q - 8) * scale + zero, in fp32
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-3 * in_features**0.5).all()


def test_native_int4_stays_accurate_when_the_inputs_share_a_large_offset():
    """sum x (128 + q) - 136 * scale * sum x cancels most when x has a large common part: the
    result must still be within 4 bf16 steps of fp32."""
    native_or_skip()
    weight = int4_weight(64, 4096, 32)
    x = (10 + torch.randn(3, 4096, generator=torch.Generator().manual_seed(4))).to(torch.bfloat16)
    out = native.linear_int4(x, pack_int4(weight), 64, 32).float()
    expected = x.float() @ weight.dequantize().T
    assert ((out - expected).abs() <= expected.abs() * 2**-5 + 1e-3).all()


def test_native_int4_rows_do_not_depend_on_the_row_count():
    """One row runs a quad (4 tiles) at a time, 4 rows two tiles at a time, leftover rows one by one:
    the same sums either way."""
    native_or_skip()
    weight = int4_weight(200, 768, 32)  # 13 tiles, padded to 4 quads: a masked tail
    packed, x = pack_int4(weight), bf16(70, 768, seed=1)
    alone = torch.cat([native.linear_int4(x[i:i + 1], packed, 200, 32) for i in range(70)])
    for rows in (2, 3, 4, 5, 8, 17, 70):
        assert torch.equal(native.linear_int4(x[:rows], packed, 200, 32), alone[:rows])


def test_native_int4_refuses_a_group_size_it_cannot_take():
    native_or_skip()
    weight = int4_weight(16, 64, 32)
    with pytest.raises(ValueError, match="group size 48"):
        native.linear_int4(bf16(1, 64), pack_int4(weight), 16, 48)


def test_packed_int4_linear_stacks_layers_and_matches_their_kernel():
    native_or_skip()
    from model.quant import QuantizedLinear

    weights = [int4_weight(out, 128, 32, seed=out) for out in (32, 20)]
    layers = [QuantizedLinear.from_weight(weight) for weight in weights]
    assert all(is_native_int4(layer) for layer in layers)
    packed, x = PackedInt4Linear(*layers), bf16(5, 128, seed=2)
    expected = x.float() @ torch.cat([weight.dequantize() for weight in weights]).T
    assert packed.out_features == 52
    assert ((packed(x).float() - expected).abs() <= expected.abs() * 2**-8 + 1e-3 * 128**0.5).all()


def paged_setup(num_heads=4, num_kv_heads=2, head_dim=32, block_size=4, num_blocks=40, seed=0):
    """A layer's cache [KV, slots, hd] with random contents, and two sequences' shuffled block tables."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=generator).to(torch.bfloat16)
    values = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=generator).to(torch.bfloat16)
    order = torch.randperm(num_blocks - 1, generator=generator) + 1  # block 0: the null block
    tables = [order[:18].tolist(), order[18:36].tolist()]
    return keys, values, tables


def dense(cache, table, block_size, length):
    """The first `length` positions of a sequence, gathered: [KV, length, hd]."""
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(length)])
    return cache[:, slots]


def run_rows(q, keys, values, rows, block_size, scale):
    """rows: [(table, position)] for each query row of q [N, H, hd]."""
    block_ids, offsets = [], []
    for table, _ in rows:
        offsets.append(len(block_ids))
        block_ids += table
    return native.paged_attention(q, keys, values, torch.tensor(block_ids, dtype=torch.int32),
                                  torch.tensor(offsets), torch.tensor([p for _, p in rows], dtype=torch.int32),
                                  block_size, scale)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 32), (4, 4, 16), (2, 1, 64)])
def test_native_paged_attention_matches_dense_fp32_attention(num_heads, num_kv_heads, head_dim):
    from server.engine.kv_cache import reference_attention

    native_or_skip()
    block_size, scale = 4, head_dim ** -0.5
    keys, values, tables = paged_setup(num_heads, num_kv_heads, head_dim, block_size)
    rows = [(tables[0], 0), (tables[1], 70), (tables[0], 33), (tables[1], 5)]
    q = bf16(len(rows), num_heads, head_dim, seed=3)
    out = run_rows(q, keys, values, rows, block_size, scale)
    for row, (table, position) in enumerate(rows):
        k, v = dense(keys, table, block_size, position + 1), dense(values, table, block_size, position + 1)
        expected = reference_attention(q[row][:, None], k, v, torch.tensor([position]))[:, 0]  # [H, hd]
        assert (out[row].float() - expected).abs().max() <= 2**-7 * expected.abs().max() + 1e-3


def test_native_paged_attention_rows_are_the_same_in_a_prefill_and_a_decode():
    """A chunk of 30 rows, then each row alone (a decode step) and in other company: the same bits."""
    native_or_skip()
    keys, values, tables = paged_setup()
    q = bf16(30, 4, 32, seed=4)
    chunk = run_rows(q, keys, values, [(tables[0], p) for p in range(30)], 4, 0.2)
    for position in (0, 7, 29):
        alone = run_rows(q[position:position + 1], keys, values, [(tables[0], position)], 4, 0.2)
        assert torch.equal(alone[0], chunk[position])
    mixed_q = torch.cat([bf16(3, 4, 32, seed=5), q[12:13]])
    mixed = run_rows(mixed_q, keys, values, [(tables[1], 60), (tables[1], 2), (tables[0], 1), (tables[0], 12)], 4, 0.2)
    assert torch.equal(mixed[3], chunk[12])


def test_native_paged_attention_refuses_a_head_dim_it_cannot_take():
    native_or_skip()
    keys, values, tables = paged_setup(head_dim=24)
    with pytest.raises(ValueError, match="head_dim 24"):
        run_rows(bf16(1, 4, 24), keys, values, [(tables[0], 3)], 4, 0.2)


def test_native_rms_norm_matches_the_model_norm():
    """Same steps and roundings as model.decoder.RMSNorm: equal but for a last-bit tie now and then."""
    from model.decoder import RMSNorm
    from server.engine.cpu_fast import NativeRMSNorm, can_use_native_norm

    native_or_skip()
    norm = RMSNorm(96, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(bf16(96, seed=6))
    x = bf16(2, 5, 96, seed=7) * 3
    assert can_use_native_norm(norm)
    fast, expected = NativeRMSNorm(norm)(x), norm(x)
    assert fast.shape == expected.shape and fast.dtype == torch.bfloat16
    assert (fast != expected).float().mean() < 0.02
    assert ((fast.float() - expected.float()).abs() <= expected.float().abs() * 2**-7 + 1e-6).all()
    assert torch.equal(NativeRMSNorm(norm)(x[1, 3:4]), fast[1, 3:4])  # a row alone: the same bits
    assert not can_use_native_norm(RMSNorm(96, 1e-5))  # float32: left to the reference


def test_native_rope_gives_apply_ropes_bits_and_writes_k_and_v_to_their_slots():
    from model.config import ModelConfig
    from model.decoder import Transformer, apply_rope

    native_or_skip()
    heads, kv_heads, head_dim, rows = 4, 2, 32, 6
    config = ModelConfig(dim=heads * head_dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, ffn_dim=64, vocab_size=16)
    positions = torch.tensor([[0, 5, 6, 7, 300, 41]])
    cos, sin = Transformer(config).to(torch.bfloat16).rope(positions)  # [1, 1, rows, hd] each
    qkv = bf16(rows, (heads + 2 * kv_heads) * head_dim, seed=8)
    # the reference: [rows, H + 2 KV, hd] -> rotate the q and k heads with apply_rope's [B, H, T, hd] layout
    by_head = qkv.view(rows, heads + 2 * kv_heads, head_dim)
    expected = apply_rope(by_head[:, :heads + kv_heads].transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    keys, values = torch.zeros(2, kv_heads, 40, head_dim, dtype=torch.bfloat16)
    slots = torch.tensor([3, 9, 10, 11, 39, 0])
    rotated = qkv.clone()
    native.rope_write_kv(rotated, cos[0, 0], sin[0, 0], heads, kv_heads, keys, values, slots)
    rotated = rotated.view(rows, heads + 2 * kv_heads, head_dim)
    assert torch.equal(rotated[:, :heads + kv_heads], expected)
    assert torch.equal(rotated[:, heads + kv_heads:], by_head[:, heads + kv_heads:])  # v untouched
    assert torch.equal(keys[:, slots], rotated[:, heads:heads + kv_heads].transpose(0, 1))
    assert torch.equal(values[:, slots], by_head[:, heads + kv_heads:].transpose(0, 1))


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


def any_native_or_skip():
    if native.selected_isa() is None:
        pytest.skip(f"no native path runs here (runnable: {native.runnable_isas() or 'none'})")


def test_the_kernel_shares_torchs_openmp_runtime():
    """One libgomp in the process: the kernel's threads are torch's, not a second team on the same cores."""
    any_native_or_skip()
    native.linear_bf16(bf16(1, 64), native.pack_bf16_weight(bf16(8, 64)), 8)
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len({Path(path).resolve() for path in mapped}) == 1, mapped


def test_compiled_library_is_cached_and_reused(fresh_kernel_cache):
    any_native_or_skip()
    first = native.compile_library("linear_bf16")
    stamp = first.stat().st_mtime_ns
    assert first.parent == fresh_kernel_cache / "native" and first.suffix == ".so"
    assert f"-{native.isa_name()}-" in first.name  # a library of one path is never taken for another
    assert native.compile_library("linear_bf16") == first and first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.tmp"))  # the temporary file was renamed, not left behind
    assert first.stat().st_mode & 0o044 == 0o044  # readable by other users (the Docker image's server)


def test_switched_off_it_falls_back_to_onednn(fresh_kernel_cache, monkeypatch, caplog):
    monkeypatch.setenv("HEARTH_NATIVE_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger="hearth.native"):
        assert native.linear_bf16_kernel() is None
    assert "HEARTH_NATIVE_KERNELS=0" in caplog.text
    from server.engine.cpu_fast import has_onednn_bf16

    if has_onednn_bf16():  # oneDNN's bf16 matmul needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT
        assert PackedLinear(torch.nn.Linear(64, 8, bias=False).to(torch.bfloat16)).kernel == "onednn"


def test_a_compiler_that_fails_gives_a_one_line_reason_and_the_fallback(fresh_kernel_cache, monkeypatch, caplog):
    if not native.runnable_isas():
        pytest.skip("fails earlier here: the CPU runs no native path")
    broken = fresh_kernel_cache / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'linear_bf16.c:1: error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger="hearth.native"):
        assert native.linear_bf16_kernel() is None
    message = next(r.getMessage() for r in caplog.records if r.name == "hearth.native")
    assert "using PyTorch's kernel" in message and "error: no such thing" in message and "\n" not in message
    assert not list((fresh_kernel_cache / "native").glob("*"))  # no half-written library left


# ----------------------------------------------------------------------------- all layers in one call


def lively_tiny_model(tokenizer, seed: int):
    """The tiny bf16 model with weights large enough that silu, softmax and the norms see varied inputs."""
    from conftest import make_tiny_model

    model = make_tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(15)
    return model.to(torch.bfloat16)


# (start position, rows, block table) per sequence, step by step: two prefills, a decode, a chunk.
STEPS = [[(0, 20, [1, 2]), (0, 7, [3])], [(20, 1, [1, 2]), (7, 1, [3])], [(8, 1, [3]), (21, 3, [1, 2])]]


def run_steps(worker, seed: int) -> list[torch.Tensor]:
    """Feed STEPS through worker's layers (random tokens) -> each step's hidden states."""
    from server.engine.kv_cache import SequenceChunk

    generator, outputs = torch.Generator().manual_seed(seed), []
    worker.cache.zero_blocks([1, 2, 3])  # as the scheduler has the worker do for fresh blocks
    for step in STEPS:
        chunks = [SequenceChunk(start, rows, blocks) for start, rows, blocks in step]
        num_rows = sum(chunk.num_rows for chunk in chunks)
        tokens = torch.randint(0, worker.model.config.vocab_size, (1, num_rows), generator=generator)
        positions = torch.tensor([[c.start_position + i for c in chunks for i in range(c.num_rows)]])
        worker.cache.metadata = worker.cache.build_metadata(chunks, num_rows)
        with torch.inference_mode():
            outputs.append(worker._hidden_states(tokens, positions))
        worker.cache.metadata = None
    return outputs


def assert_native_decoder_matches_the_modules(model, seed: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """The one-call decoder and the FusedBlock modules over STEPS: the same hidden states and KV cache
    (tests/test_native_fp32.py uses it for the fp32 path)."""
    import copy

    from server.engine.worker import ModelWorker

    in_one_call, as_modules = (ModelWorker(copy.deepcopy(model), 16, 16) for _ in range(2))
    assert in_one_call.native_decoder is not None and in_one_call.cache.keys.dtype == dtype
    as_modules.native_decoder = None
    for fast, reference in zip(run_steps(in_one_call, seed), run_steps(as_modules, seed)):
        assert fast.dtype == dtype and fast.abs().max() > 1  # not vanishing activations
        # The same kernels in the same order; only silu's exp is not PyTorch's, which can move a
        # value on a bf16 rounding boundary by one step (none did for these seeds).
        assert torch.equal(fast, reference), (fast.float() - reference.float()).abs().max()
    used_slots = 4 * 16  # blocks 0 (null) to 3; the others were never handed out
    assert torch.equal(in_one_call.cache.keys[:, :, :used_slots], as_modules.cache.keys[:, :, :used_slots])
    assert torch.equal(in_one_call.cache.values[:, :, :used_slots], as_modules.cache.values[:, :, :used_slots])


@pytest.mark.parametrize("seed", [0, 1])
def test_native_decoder_gives_the_fused_blocks_bits(tokenizer, seed):
    """All layers of a step in one native call: prefills, decodes and a chunk, GQA, the KV cache too."""
    native_or_skip()
    assert_native_decoder_matches_the_modules(lively_tiny_model(tokenizer, seed), seed)


def test_native_decoder_takes_int8_and_int4_layers_and_refuses_others(tokenizer, tmp_path):
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.quant import quantize_checkpoint
    from server.engine.worker import ModelWorker

    native_or_skip()
    save_checkpoint(tmp_path / "bf16", lively_tiny_model(tokenizer, 0), tokenizer)
    for method, group_size in (("int8", None), ("int4", 32)):
        folder = quantize_checkpoint(tmp_path / "bf16", tmp_path / f"{method}-{group_size}", method, group_size).out
        assert_native_decoder_matches_the_modules(load_checkpoint(folder).model, 0)
    int8_g32 = load_checkpoint(quantize_checkpoint(tmp_path / "bf16", tmp_path / "int8-32", "int8", 32).out).model
    worker = ModelWorker(int8_g32, 16, 16)  # int8 in groups: model/quant.py's kernels, so the module path
    assert worker.num_packed_matmuls > 0 and worker.native_decoder is None


def test_native_decoder_is_off_with_the_kernels_off(tokenizer, fresh_kernel_cache, monkeypatch):
    from server.engine.worker import ModelWorker

    monkeypatch.setenv("HEARTH_NATIVE_KERNELS", "0")
    worker = ModelWorker(lively_tiny_model(tokenizer, 0), 16, 16)
    assert worker.native_decoder is None and not worker.cache.uses_native_kernel


def test_packed_weights_are_copied_to_huge_page_memory_unchanged():
    small = bf16(8, 64)
    assert native.on_huge_pages(small) is small  # under 2 MB: left as it is
    big = torch.randint(-127, 128, (3 << 20,), dtype=torch.int8).view(1024, -1)  # 3 MB
    copy = native.on_huge_pages(big)
    assert torch.equal(copy, big) and copy.is_contiguous()
    if copy is big:  # no madvise here (another OS, or a kernel without transparent huge pages): left as it is
        return
    assert copy.data_ptr() % native.HUGE_PAGE == 0  # starts on a 2 MB boundary, so its first 2 MB can be one page
    import gc

    expected = big.clone()
    del big
    gc.collect()  # the mapping is referenced by the tensor alone now
    assert torch.equal(copy, expected)


def test_the_decoders_swiglu_gives_pytorchs_bits_for_every_finite_bf16_gate():
    """silu(g) * u as the bf16 modules compute it (F.silu, then the multiply), over all 65,280 finite
    bf16 gates: the native exp is not PyTorch's, so this is where the two could part."""
    native_or_skip()
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gates = every[torch.isfinite(every)]
    gates = gates[:gates.numel() // 16 * 16]
    ups = bf16(gates.numel(), seed=3)
    gate_up, out = torch.cat([gates, ups]), torch.empty_like(gates)  # named: a temporary would be freed before the call
    native.load_kernel("hearth_silu_mul")(gate_up.data_ptr(), out.data_ptr(), 1, gates.numel(), 1)
    expected = F.silu(gates) * ups
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))  # -0 vs 0 counts too
