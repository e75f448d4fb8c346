"""Native CPU kernels: C sources in csrc/, compiled on first use and called through ctypes.

Five kernels, bf16 in and out, for what a decode step spends its time on:
- csrc/linear_bf16.c, Y = X @ W.T with bf16 weights (server/engine/cpu_fast.py's packed linears);
- csrc/linear_int8.c, the same with int8 weights and a scale per output row (cpu_fast.py too);
- csrc/linear_int4.c, the same with int4 weights, a scale and a zero per group (cpu_fast.py too);
- csrc/paged_attention.c, causal attention over the paged KV cache, and the rotary embedding
  with the KV cache write before it (server/engine/kv_cache.py);
- csrc/rms_norm.c, RMSNorm in one call instead of nine small ops (cpu_fast.py);
and csrc/decoder_layers.c, which runs every decoder layer of a step in one call by calling
the others (linked into its library from their own files), with no Python between them.
Why they exist and why their results are batch invariant: see the files' headers.

Design choices:
- Optional, never required: on another CPU, without a C compiler, or with
  HEARTH_NATIVE_KERNELS=0, `load_kernel()` returns None (the reason is logged
  once) and the callers keep PyTorch's kernels (oneDNN, `_weight_int8pack_mm`,
  the gather-and-matmul attention).
- Compiled with explicit ISA flags (AVX-512 F/BW/VL/BF16), not -march=native, and
  only after /proc/cpuinfo shows those flags; the library lands in a per-user cache
  (HEARTH_CACHE_DIR, else ~/.cache/hearth) under a name hashed from the source and
  the flags, written to a temporary file and renamed (atomic: two processes
  compiling at once both end with a whole library). A library already there needs
  no compiler: `python -m model.native` builds it ahead (the Dockerfile does).
- OpenMP: the library is linked against libgomp.so.1, and torch has already loaded
  its own libgomp.so.1, so the loader hands the kernel that same runtime: its
  parallel loops run on the calling thread's existing team, with the thread count
  torch uses on that thread. A second OpenMP runtime would spin its own threads
  against torch's on the same cores.
- ctypes rather than a torch C++ extension: the C file compiles in under a second
  with no torch headers, and a call costs a few microseconds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("hearth.native")

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
CPU_FLAGS_NEEDED = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
TILE_ROWS = 4  # TILE_N of both C files
BF16_CHUNK, INT8_CHUNK = 32, 32  # CHUNK_K of linear_bf16.c and linear_int8.c


class NativeUnavailable(Exception):
    """Why a native kernel cannot be used here (one line, logged)."""


def cache_dir() -> Path:
    return Path(os.environ.get("HEARTH_CACHE_DIR") or Path.home() / ".cache" / "hearth") / "native"


def check_cpu() -> None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise NativeUnavailable(f"not an x86-64 Linux machine ({platform.system()} {platform.machine()})")
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        raise NativeUnavailable("cannot read the CPU flags from /proc/cpuinfo") from None
    missing = [flag for flag in CPU_FLAGS_NEEDED if flag not in flags]
    if missing:
        raise NativeUnavailable(f"the CPU lacks {', '.join(missing)}")


# A library's C files, where it is more than csrc/<name>.c
LIBRARY_SOURCES = {"decoder_layers": ("decoder_layers", "linear_bf16", "linear_int8", "linear_int4", "paged_attention",
                                      "rms_norm")}


def compile_library(name: str) -> Path:
    """csrc/<name>.c (and the files LIBRARY_SOURCES adds, with csrc/*.h) -> a shared library in the
    cache, compiled when it is not there yet."""
    sources = [SOURCE_DIR / f"{source}.c" for source in LIBRARY_SOURCES.get(name, (name,))]
    flags = ["-O3", "-std=gnu11", *ISA_FLAGS, "-fopenmp", "-fPIC", "-shared"]
    headers = b"".join(header.read_bytes() for header in sorted(SOURCE_DIR.glob("*.h")))
    code = b"".join(source.read_bytes() for source in sources)
    digest = hashlib.sha256(code + headers + " ".join(flags).encode()).hexdigest()[:16]
    library = cache_dir() / f"{name}-{digest}.so"
    if library.is_file():  # built before (or at `docker build`): no compiler needed
        return library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise NativeUnavailable("no C compiler (set CC, or install gcc)")
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=library.parent, suffix=".so.tmp")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, *map(str, sources), "-o", temporary], capture_output=True, text=True)
        if result.returncode != 0:
            first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise NativeUnavailable(f"{compiler} could not compile {sources[0].name}: {first_error[:200]}")
        os.chmod(temporary, 0o755)  # mkstemp makes it 0600: other users (the image's server) must load it too
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return library


POINTER, INT64, INT, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # C function -> (library, argument types, result type)
    # x, ldx, packed w, y, ldy, M, N, K, threads
    "hearth_linear_bf16": ("linear_bf16", [POINTER, INT64, POINTER, POINTER, INT64, INT64, INT64, INT64, INT], None),
    # x, ldx, packed w, y, ldy, M, N, K, group size, threads -> 0, -1 (out of memory), -2 (group size)
    "hearth_linear_int4": ("linear_int4", [POINTER, INT64, POINTER, POINTER, INT64, INT64, INT64, INT64, INT64, INT], INT),
    # x, ldx, packed w, scales, y, ldy, M, N, K, threads
    "hearth_linear_int8": ("linear_int8", [POINTER, INT64, POINTER, POINTER, POINTER, INT64, INT64, INT64, INT64, INT], None),
    # q, q row stride, q head stride, keys, values, kv head stride, block ids, table offsets, positions, out,
    # rows, heads, kv heads, head dim, block size, scale, threads -> 0, -1 (out of memory), -2 (head dim)
    "hearth_paged_attention": ("paged_attention", [POINTER, INT64, INT64, POINTER, POINTER, INT64, POINTER, POINTER,
                                                   POINTER, POINTER, INT64, INT, INT, INT, INT, FLOAT, INT], INT),
    # qkv, row stride, cos, sin, rows, heads, kv heads, head dim, keys, values, kv head stride, slots, threads
    "hearth_rope_write_kv": ("paged_attention", [POINTER, INT64, POINTER, POINTER, INT64, INT, INT, INT, POINTER,
                                                 POINTER, INT64, POINTER, INT], None),
    # x, ldx, weight, y, rows, dim, eps, threads -> 0, or -2 when dim is not a multiple of 16
    "hearth_rms_norm": ("rms_norm", [POINTER, INT64, POINTER, POINTER, INT64, INT64, FLOAT, INT], INT),
    # x, rows, layers (LayerWeights array), layer count, step (StepShape), threads -> 0, -1 (out of memory), -2 (shape)
    "hearth_decoder_layers": ("decoder_layers", [POINTER, INT64, POINTER, INT64, POINTER, INT], INT),
    # gate_up, out, rows, ffn dim, threads (the decoder's SwiGLU, for the tests)
    "hearth_silu_mul": ("decoder_layers", [POINTER, POINTER, INT64, INT64, INT], None),
}


class LinearWeights(ctypes.Structure):
    """csrc/decoder_layers.c's hearth_linear: one packed matmul."""
    _fields_ = [("kind", INT64), ("out_features", INT64), ("in_features", INT64), ("tiles", POINTER),
                ("scales", POINTER), ("group_size", INT64)]


class LayerWeights(ctypes.Structure):
    """csrc/decoder_layers.c's hearth_layer: a decoder layer's norms, matmuls and KV cache."""
    _fields_ = [("attn_norm", POINTER), ("mlp_norm", POINTER), ("qkv", LinearWeights), ("o", LinearWeights),
                ("gate_up", LinearWeights), ("down", LinearWeights), ("keys", POINTER), ("values", POINTER)]


class StepShape(ctypes.Structure):
    """csrc/decoder_layers.c's hearth_step: the model's shape and one step's rows."""
    _fields_ = [("dim", INT64), ("ffn_dim", INT64), ("kv_head_stride", INT64), ("n_heads", INT64),
                ("n_kv_heads", INT64), ("head_dim", INT64), ("block_size", INT64), ("norm_eps", FLOAT),
                ("attention_scale", FLOAT), ("cos", POINTER), ("sin", POINTER), ("slots", POINTER),
                ("block_ids", POINTER), ("table_offsets", POINTER), ("positions", POINTER)]


BF16_KIND, INT8_KIND, INT4_KIND = 0, 1, 2  # hearth_linear's kinds


@functools.cache
def load_library(library_name: str) -> ctypes.CDLL | None:
    """csrc/<library_name>.c, compiled if need be and loaded, or None (the reason logged once)."""
    if os.environ.get("HEARTH_NATIVE_KERNELS", "1") == "0":
        logger.info("native kernels off (HEARTH_NATIVE_KERNELS=0): %s falls back to PyTorch's kernel", library_name)
        return None
    try:
        check_cpu()
        return ctypes.CDLL(str(compile_library(library_name)))
    except (NativeUnavailable, OSError) as error:
        logger.warning("native %s unavailable, using PyTorch's kernel: %s", library_name, error)
        return None


@functools.cache
def load_kernel(function_name: str):
    """The C function, with its argument types set, or None when its library cannot run here."""
    library_name, argtypes, restype = SIGNATURES[function_name]
    library = load_library(library_name)
    if library is None:
        return None
    function = getattr(library, function_name)
    function.argtypes, function.restype = argtypes, restype
    return function


def forget_kernels() -> None:
    """Drop what was loaded (or refused), so the next call looks again (tests, benchmarks)."""
    load_kernel.cache_clear()
    load_library.cache_clear()


def linear_bf16_kernel():
    return load_kernel("hearth_linear_bf16")


def linear_int8_kernel():
    return load_kernel("hearth_linear_int8")


def linear_int4_kernel():
    return load_kernel("hearth_linear_int4")


def paged_attention_kernel():
    return load_kernel("hearth_paged_attention")


def rope_write_kv_kernel():
    return load_kernel("hearth_rope_write_kv")


def rms_norm_kernel():
    return load_kernel("hearth_rms_norm")


def decoder_layers_kernel():
    return load_kernel("hearth_decoder_layers")


def pack_tiles(matrix: Tensor, chunk: int) -> Tensor:
    """[N, K] -> [ceil(N/4), ceil(K/chunk), 4, chunk], zero padded: the layout both linear kernels read.

    A tile's 4 rows go chunk by chunk, front to back, so a thread streams its weights in order."""
    out_features, in_features = matrix.shape
    padded_out = -(-out_features // TILE_ROWS) * TILE_ROWS
    padded_in = -(-in_features // chunk) * chunk
    padded = F.pad(matrix, (0, padded_in - in_features, 0, padded_out - out_features))
    # [N', K'] -> [N'/4, 4, K'/chunk, chunk] -> [N'/4, K'/chunk, 4, chunk]
    tiles = padded.view(padded_out // TILE_ROWS, TILE_ROWS, padded_in // chunk, chunk).transpose(1, 2)
    return tiles.contiguous()


HUGE_PAGE = 2 << 20


def on_huge_pages(tensor: Tensor) -> Tensor:
    """A copy of contiguous `tensor` whose whole 2 MB stretches the OS backs with huge pages, where it can.

    Why: the linear kernels stream their weights, and the CPU's prefetchers stop at page
    boundaries; on the EPYC here a read over 2 MB pages ran 31.7 -> 34.0 GB/s
    (bench/bench_decode_step.py --part kernels). Transparent huge
    pages are `madvise` on most distributions, so the memory must ask for them: an anonymous
    private mapping, its 2 MB-aligned whole pages advised. The tail under 2 MB keeps small
    pages (no memory wasted). A tensor under 2 MB, or a refused madvise, stays as it is.
    """
    num_bytes = tensor.numel() * tensor.element_size()
    if num_bytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or not tensor.is_contiguous():
        return tensor
    region = mmap.mmap(-1, num_bytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE  # offset of the first 2 MB boundary
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, num_bytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:
        return tensor
    # the tensor keeps the mapping alive (torch.frombuffer holds a reference to it)
    copy = torch.frombuffer(region, dtype=tensor.dtype, count=tensor.numel(), offset=start).view(tensor.shape)
    return copy.copy_(tensor)


def pack_bf16_weight(weight: Tensor) -> Tensor:
    """[N, K] bf16 -> csrc/linear_bf16.c's tiles (32 columns a chunk), on huge pages where it can."""
    return on_huge_pages(pack_tiles(weight.to(torch.bfloat16), BF16_CHUNK))


def pack_int8_weight(codes: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """int8 [N, K] and [N] scales -> csrc/linear_int8.c's tiles (32 columns a chunk, on huge pages
    where it can) and fp32 scales padded to the tiles' rows."""
    padded_out = -(-codes.shape[0] // TILE_ROWS) * TILE_ROWS
    return on_huge_pages(pack_tiles(codes, INT8_CHUNK)), F.pad(scales.float(), (0, padded_out - codes.shape[0])).contiguous()


INT4_TILE_ROWS, INT4_QUAD = 16, 4  # TILE_N and QUAD of linear_int4.c


def pack_int4_weight(codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """uint8 codes [N, K] (0..15) with bf16 scales and zeros [N, K / group] -> csrc/linear_int4.c's
    quads of 4 tiles of 16 rows, uint8 [ceil(N/64), groups, group * 32 + 256], on huge pages where it can.

    A quad's group: for each 4 input columns, 32 bytes per tile, the 4 tiles side by side (byte 2l + h
    of a tile's 32 in chunk c holds its row l's column 4c + h in the low nibble, 4c + 2 + h in the high one);
    then each tile's 16 scales and 16 zeros."""
    out_features, in_features = codes.shape
    num_groups = scales.shape[1]
    group_size = in_features // num_groups
    quad_rows = INT4_QUAD * INT4_TILE_ROWS
    padding = -out_features % quad_rows
    codes = F.pad(codes.to(torch.uint8), (0, 0, 0, padding))
    scales, zeros = (F.pad(t.to(torch.bfloat16), (0, 0, 0, padding)) for t in (scales, zeros))
    num_quads = codes.shape[0] // quad_rows
    # [N', K] -> [quads, 4 tiles, 16 rows, groups, 4-column chunks, 4]; columns 4c + h | 4c + 2 + h -> one byte
    quads = codes.view(num_quads, INT4_QUAD, INT4_TILE_ROWS, num_groups, group_size // 4, 4)
    packed = quads[..., :2] | (quads[..., 2:] << 4)  # [quads, 4, 16, groups, chunks, 2]
    # -> [quads, groups, chunks, 4 tiles, 16 rows, 2]: 128 bytes a chunk, byte 2l + h of each tile's 32
    packed = packed.permute(0, 3, 4, 1, 2, 5).reshape(num_quads, num_groups, group_size * quad_rows // 2)
    # [N', groups] -> [quads, groups, 4 tiles, 16] each -> [quads, groups, 4, 2, 16] bf16 -> 256 bytes a group
    scale_zero = torch.stack([t.view(num_quads, INT4_QUAD, INT4_TILE_ROWS, num_groups).permute(0, 3, 1, 2)
                              for t in (scales, zeros)], 3)
    scale_zero = scale_zero.contiguous().view(torch.uint8).view(num_quads, num_groups, -1)
    return on_huge_pages(torch.cat([packed, scale_zero], dim=-1).contiguous())


def as_rows(x: Tensor) -> Tensor:
    """[..., K] -> [M, K] bf16 with unit stride along K (the kernels take any row stride)."""
    if x.dim() == 2 and x.dtype is torch.bfloat16 and x.stride(1) == 1:  # the engine's usual case: as it is
        return x
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1 or rows.dtype != torch.bfloat16:
        rows = rows.to(torch.bfloat16).contiguous()
    return rows


def as_input_shape(out: Tensor, x: Tensor) -> Tensor:
    """[M, N] -> x's leading dimensions and N."""
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def linear_bf16(x: Tensor, packed_weight: Tensor, out_features: int) -> Tensor:
    """x [..., K] @ W.T -> [..., N] bf16, with W packed by `pack_bf16_weight`."""
    rows = as_rows(x)
    num_rows, in_features = rows.shape
    out = torch.empty(num_rows, out_features, dtype=torch.bfloat16)
    linear_bf16_kernel()(rows.data_ptr(), rows.stride(0), packed_weight.data_ptr(), out.data_ptr(), out_features,
                         num_rows, out_features, in_features, torch.get_num_threads())
    return as_input_shape(out, x)


def linear_int8(x: Tensor, packed: tuple[Tensor, Tensor], out_features: int) -> Tensor:
    """x [..., K] @ (codes * scales).T -> [..., N] bf16, with the weight packed by `pack_int8_weight`."""
    rows = as_rows(x)
    tiles, scales = packed
    out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    linear_int8_kernel()(rows.data_ptr(), rows.stride(0), tiles.data_ptr(), scales.data_ptr(), out.data_ptr(),
                         out_features, rows.shape[0], out_features, rows.shape[1], torch.get_num_threads())
    return as_input_shape(out, x)


def linear_int4(x: Tensor, packed: Tensor, out_features: int, group_size: int) -> Tensor:
    """x [..., K] @ W.T -> [..., N] bf16, with the int4 weight packed by `pack_int4_weight`."""
    rows = as_rows(x)
    out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    status = linear_int4_kernel()(rows.data_ptr(), rows.stride(0), packed.data_ptr(), out.data_ptr(), out_features,
                                  rows.shape[0], out_features, rows.shape[1], group_size, torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"native int4 linear: no memory for the group sums of {rows.shape[0]} rows")
    if status != 0:
        raise ValueError(f"native int4 linear: group size {group_size} is not a multiple of 32 dividing {rows.shape[1]}")
    return as_input_shape(out, x)


def paged_attention(q: Tensor, keys: Tensor, values: Tensor, block_ids: Tensor, table_offsets: Tensor,
                    positions: Tensor, block_size: int, scale: float) -> Tensor:
    """Causal attention of each query row over its own sequence's cached keys (csrc/paged_attention.c).

    q: [N, H, hd] bf16, head_dim contiguous (any row and head strides); keys, values: one layer's
    [KV, slots, hd] bf16, contiguous; block_ids: int32, every row's block table end to end;
    table_offsets: int64 [N], where row r's table starts; positions: int32 [N], row r sees
    positions 0..positions[r]. Returns [N, H, hd] bf16.
    """
    num_rows, num_heads, head_dim = q.shape
    out = torch.empty(num_rows, num_heads, head_dim, dtype=torch.bfloat16)
    status = paged_attention_kernel()(
        q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(), keys.stride(0),
        block_ids.data_ptr(), table_offsets.data_ptr(), positions.data_ptr(), out.data_ptr(),
        num_rows, num_heads, keys.shape[0], head_dim, block_size, scale, torch.get_num_threads())
    if status == -1:
        raise MemoryError("native paged attention: no memory for its scores")
    if status != 0:
        raise ValueError(f"native paged attention: head_dim {head_dim} is not a multiple of 16 (or over 256)")
    return out


def rope_write_kv(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int,
                  keys: Tensor, values: Tensor, slots: Tensor) -> None:
    """Rotate the q and k heads of qkv in place, then store k and v at `slots` (csrc/paged_attention.c).

    qkv: [N, (H + 2 KV) * hd] bf16, unit stride along a row; cos, sin: [N, hd] bf16, contiguous;
    keys, values: one layer's [KV, slots, hd] bf16, contiguous; slots: int64 [N].
    """
    head_dim = keys.shape[-1]
    rope_write_kv_kernel()(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], num_heads,
                           num_kv_heads, head_dim, keys.data_ptr(), values.data_ptr(), keys.stride(0),
                           slots.data_ptr(), torch.get_num_threads())


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.decoder.RMSNorm's forward for bf16 x [..., dim] and a bf16 weight [dim] (csrc/rms_norm.c)."""
    rows = as_rows(x)
    out = torch.empty(rows.shape, dtype=torch.bfloat16)
    status = rms_norm_kernel()(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), rows.shape[0],
                               rows.shape[1], eps, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native RMSNorm: dim {rows.shape[1]} is not a multiple of 16")
    return as_input_shape(out, x)


def decoder_layers(x: Tensor, layers: ctypes.Array, step: StepShape) -> None:
    """Run every layer in `layers` over x [rows, dim] bf16 (contiguous, updated in place): csrc/decoder_layers.c."""
    status = decoder_layers_kernel()(x.data_ptr(), x.shape[0], ctypes.addressof(layers), len(layers),
                                     ctypes.addressof(step), torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"native decoder layers: no memory for the scratch of {x.shape[0]} rows")
    if status != 0:
        raise ValueError("native decoder layers: a width is not a multiple of 16, head_dim is over 256, "
                         "or an int4 group size is not a multiple of 32")


if __name__ == "__main__":  # build the libraries into the cache now (no CPU check: the image may run elsewhere)
    for library_name in sorted({library for library, _, _ in SIGNATURES.values()}):
        print(compile_library(library_name))
