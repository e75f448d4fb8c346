"""Native CPU kernels: C sources in csrc/, compiled on first use and called through ctypes.

Five kernels, for what a decode step spends its time on:
- csrc/linear_bf16.c, Y = X @ W.T with bf16 weights (server/engine/cpu_fast.py's packed linears);
- csrc/linear_int8.c, the same with int8 weights and a scale per output row or group (cpu_fast.py too);
- csrc/linear_int4.c, the same with int4 weights, a scale and a zero per group (cpu_fast.py too);
- csrc/paged_attention.c, causal attention over the paged KV cache, and the rotary embedding
  with the KV cache write before it (server/engine/kv_cache.py);
- csrc/rms_norm.c, RMSNorm in one call instead of nine small ops (cpu_fast.py);
and csrc/decoder_layers.c, which runs every decoder layer of a step in one call by calling
the others (linked into its library from their own files), with no Python between them.
Why they exist and why their results are batch invariant: see the files' headers.

Design choices:
- One source per kernel, two paths (ISAS below): `avx512bf16` computes with bf16 activations
  and KV cache (`vdpbf16ps`); `avx2` (x86-64-v3: AVX2 + FMA) and `neon` (ARM64) have no native
  bf16 dot product, so they keep activations and the KV cache in fp32 and widen bf16/int8/int4
  weights to fp32 in registers (csrc/vec.h: one 8-lane vector type over both ISAs, so both share
  one weight layout and one order of operations). `activation_dtype()` says which the
  callers must feed; the engine's dtype "auto" follows it.
- The ISA is found at run time from the CPU's flags, the best first; HEARTH_NATIVE_ISA=
  avx512bf16|avx2|neon|off forces one (an AVX-512 machine runs and tests the AVX2 path), and
  a forced ISA the CPU cannot run is refused with one log line, never executed (no SIGILL).
- Optional, never required: on a CPU with none of these, without a C compiler, with
  HEARTH_NATIVE_KERNELS=0, or when the start-up self-check (a small matmul against PyTorch)
  fails, `load_kernel()` returns None (the reason is logged once) and the callers keep
  PyTorch's kernels (oneDNN, `_weight_int8pack_mm`, the gather-and-matmul attention).
- Compiled with explicit ISA flags, not -march=native; the library lands in a per-user cache
  (HEARTH_CACHE_DIR, else ~/.cache/hearth) under a name that holds the ISA and a hash of the
  sources, headers and flags, so a library built for another CPU (a shared home, an image
  built elsewhere) is never picked up for this one. Written to a temporary file and renamed
  (atomic). A library already there needs no compiler: `python -m model.native` builds every
  path of the machine's architecture ahead (the Dockerfile does), and the one that runs is
  picked at run time.
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("hearth.native")

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
class NativeUnavailable(Exception):
    """Why a native kernel cannot be used here (one line, logged)."""


def cache_dir() -> Path:
    return Path(os.environ.get("HEARTH_CACHE_DIR") or Path.home() / ".cache" / "hearth") / "native"


TILE_ROWS = 4  # TILE_N of both AVX-512 linear files
BF16_CHUNK, INT8_CHUNK = 32, 32  # their CHUNK_K
F32_TILE_ROWS = 32  # TILE_ROWS of the fp32 path's linears (4 vectors of 8 lanes)


@dataclass(frozen=True)
class Isa:
    """One native path: how to compile it, what the CPU must have, what the kernels take."""
    name: str
    compile_flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags (x86) or Features (ARM) it needs
    machines: tuple[str, ...]  # platform.machine() values it runs on
    activation_dtype: torch.dtype  # of X, Y, the norms' weights and the KV cache


X86, ARM = ("x86_64", "AMD64"), ("aarch64", "arm64")
ISAS = {  # the best first
    "avx512bf16": Isa("avx512bf16", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"),
                      ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"), X86, torch.bfloat16),
    "avx2": Isa("avx2", ("-march=x86-64-v3", "-mtune=generic", "-ffp-contract=off"), ("avx2", "fma"), X86,
                torch.float32),
    "neon": Isa("neon", ("-march=armv8-a", "-ffp-contract=off"), ("asimd",), ARM, torch.float32),
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them ('flags' on x86, 'Features' on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        raise NativeUnavailable("cannot read the CPU flags from /proc/cpuinfo") from None
    lines = [line for line in text.splitlines() if line.startswith(("flags", "Features"))]
    if not lines:
        raise NativeUnavailable("cannot read the CPU flags from /proc/cpuinfo")
    return set(lines[0].split(":", 1)[1].split())


def check_cpu(isa: Isa | None = None) -> None:
    """Raise NativeUnavailable unless this machine can run `isa` (default: the AVX-512 BF16 path)."""
    isa = isa or ISAS["avx512bf16"]
    if platform.system() != "Linux" or platform.machine() not in isa.machines:
        raise NativeUnavailable(f"the {isa.name} path needs a {'/'.join(isa.machines[:1])} Linux machine, "
                                f"not {platform.system()} {platform.machine()}")
    missing = [flag for flag in isa.cpu_flags if flag not in cpu_flags()]
    if missing:
        raise NativeUnavailable(f"the CPU lacks {', '.join(missing)}")


def runnable_isas() -> list[str]:
    """Every path this machine can execute, the best first."""
    runnable = []
    for name, isa in ISAS.items():
        try:
            check_cpu(isa)
        except NativeUnavailable:
            continue
        runnable.append(name)
    return runnable


@functools.cache
def selected_isa() -> Isa | None:
    """The path the kernels run here (HEARTH_NATIVE_ISA forces one), or None (logged once, with why)."""
    forced = os.environ.get("HEARTH_NATIVE_ISA", "").strip().lower()
    if os.environ.get("HEARTH_NATIVE_KERNELS", "1") == "0" or forced == "off":
        logger.info("native kernels off (HEARTH_NATIVE_KERNELS=0 or HEARTH_NATIVE_ISA=off): PyTorch's kernels run")
        return None
    if forced and forced not in ISAS:
        logger.warning("HEARTH_NATIVE_ISA=%s is not one of %s, off: PyTorch's kernels run", forced,
                       ", ".join([*ISAS, "off"]))
        return None
    try:
        names = [forced] if forced else runnable_isas()
        if forced:
            check_cpu(ISAS[forced])
        if not names:
            raise NativeUnavailable(f"the CPU has none of {', '.join(ISAS)} (flags checked: "
                                    f"{', '.join(flag for isa in ISAS.values() for flag in isa.cpu_flags)})")
        isa = ISAS[names[0]]
        self_check(isa)
    except (NativeUnavailable, OSError) as error:
        logger.warning("native kernels unavailable, using PyTorch's kernels: %s", error)
        return None
    logger.info("native kernels: the %s path (activations and KV cache in %s)", isa.name,
                str(isa.activation_dtype).removeprefix("torch."))
    return isa


def activation_dtype() -> torch.dtype | None:
    """The dtype the native kernels take and give (bf16 on AVX-512 BF16, fp32 on AVX2 and NEON), or None."""
    isa = selected_isa()
    return isa.activation_dtype if isa else None


def isa_name() -> str:
    """The native path in use, or 'off' (for logs, /v1/models and /api/ps)."""
    isa = selected_isa()
    return isa.name if isa else "off"


def self_check(isa: Isa) -> None:
    """Compile `isa`'s bf16 linear and check a small matmul against PyTorch: a compiler or CPU that
    gets it wrong makes the path unavailable instead of giving wrong output."""
    library = ctypes.CDLL(str(compile_library("linear_bf16", isa)))
    function = library.hearth_linear_bf16
    function.argtypes, function.restype = SIGNATURES["hearth_linear_bf16"][1], None
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 70, generator=generator).to(torch.bfloat16)
    x = torch.randn(5, 70, generator=generator).to(isa.activation_dtype)
    packed = pack_bf16_weight(weight, isa)
    out = torch.empty(5, 37, dtype=isa.activation_dtype)
    function(x.data_ptr(), x.stride(0), packed.data_ptr(), out.data_ptr(), 37, 5, 37, 70, 1)
    expected = x.float() @ weight.float().T
    if not torch.allclose(out.float(), expected, rtol=2**-7, atol=1e-2):
        raise NativeUnavailable(f"the {isa.name} kernels failed their self-check (a matmul off by "
                                f"{(out.float() - expected).abs().max().item():.3g})")


# A library's C files, where it is more than csrc/<name>.c
LIBRARY_SOURCES = {"decoder_layers": ("decoder_layers", "linear_bf16", "linear_int8", "linear_int4", "paged_attention",
                                      "rms_norm", "lora_delta")}


def compile_library(name: str, isa: Isa | None = None) -> Path:
    """csrc/<name>.c (and the files LIBRARY_SOURCES adds, with csrc/*.h) for `isa` (default: the
    selected path) -> a shared library in the cache, compiled when it is not there yet."""
    isa = isa or selected_isa()
    if isa is None:
        raise NativeUnavailable("no native path selected")
    sources = [SOURCE_DIR / f"{source}.c" for source in LIBRARY_SOURCES.get(name, (name,))]
    flags = ["-O3", "-std=gnu11", *isa.compile_flags, "-fopenmp", "-fPIC", "-shared"]
    headers = b"".join(header.read_bytes() for header in sorted(SOURCE_DIR.glob("*.h")))
    code = b"".join(source.read_bytes() for source in sources)
    digest = hashlib.sha256(code + headers + " ".join(flags).encode()).hexdigest()[:16]
    library = cache_dir() / f"{name}-{isa.name}-{digest}.so"
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
            raise NativeUnavailable(f"{compiler} could not compile {sources[0].name} for {isa.name}: "
                                    f"{first_error[:200]}")
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
    # x, ldx, packed w, scales, y, ldy, M, N, K, group size (0: per row), threads -> 0, -2 (group size)
    "hearth_linear_int8": ("linear_int8", [POINTER, INT64, POINTER, POINTER, POINTER, INT64, INT64, INT64, INT64, INT64,
                                           INT], INT),
    # q, q row stride, q head stride, keys, values, kv head stride, block ids, table offsets, positions, out,
    # rows, heads, kv heads, head dim, block size, scale, threads -> 0, -1 (out of memory), -2 (head dim)
    "hearth_paged_attention": ("paged_attention", [POINTER, INT64, INT64, POINTER, POINTER, INT64, POINTER, POINTER,
                                                   POINTER, POINTER, INT64, INT, INT, INT, INT, FLOAT, INT], INT),
    # qkv, row stride, cos, sin, rows, heads, kv heads, head dim, keys, values, kv head stride, slots, threads
    "hearth_rope_write_kv": ("paged_attention", [POINTER, INT64, POINTER, POINTER, INT64, INT, INT, INT, POINTER,
                                                 POINTER, INT64, POINTER, INT], None),
    # x, ldx, weight, y, rows, dim, eps, threads -> 0, or -2 when dim is not a multiple of 16 (8 on fp32)
    "hearth_rms_norm": ("rms_norm", [POINTER, INT64, POINTER, POINTER, INT64, INT64, FLOAT, INT], INT),
    # x, rows, layers (LayerWeights array), layer count, step (StepShape), threads -> 0, -1 (out of memory), -2 (shape)
    "hearth_decoder_layers": ("decoder_layers", [POINTER, INT64, POINTER, INT64, POINTER, INT], INT),
    # gate_up, out, rows, ffn dim, threads (the decoder's SwiGLU: the fp32 path's modules, the tests)
    "hearth_silu_mul": ("decoder_layers", [POINTER, POINTER, INT64, INT64, INT], None),
    # x, ldx, in features, y, ldy, groups (LoRAGroup array), group count, layer, sites (LoRASite array), site
    # count, threads -> 0, -1 (out of memory), -2 (shape)
    "hearth_lora_add": ("decoder_layers", [POINTER, INT64, INT64, POINTER, INT64, POINTER, INT64, INT64, POINTER,
                                           INT64, INT], INT),
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
                ("block_ids", POINTER), ("table_offsets", POINTER), ("positions", POINTER),
                ("lora_groups", POINTER), ("num_lora_groups", INT64)]


class LoRATerm(ctypes.Structure):
    """csrc/lora.h's hearth_lora_term: one target of one layer of an adapter (a NULL `a`: untouched)."""
    _fields_ = [("a", POINTER), ("bt", POINTER), ("rank", INT64), ("in_features", INT64), ("out_features", INT64)]


class LoRAGroup(ctypes.Structure):
    """csrc/lora.h's hearth_lora_group: one adapter's table of terms and its rows in a step."""
    _fields_ = [("table", POINTER), ("rows", POINTER), ("num_rows", INT64)]


class LoRASite(ctypes.Structure):
    """csrc/lora.h's hearth_lora_site: a target (trainer/lora.py's ALL_TARGETS index) and its first output column."""
    _fields_ = [("target", INT64), ("first_column", INT64)]


BF16_KIND, INT8_KIND, INT4_KIND = 0, 1, 2  # hearth_linear's kinds


@functools.cache
def load_library(library_name: str) -> ctypes.CDLL | None:
    """csrc/<library_name>.c for the selected path, compiled if need be and loaded, or None (logged once)."""
    isa = selected_isa()
    if isa is None:
        return None
    try:
        return ctypes.CDLL(str(compile_library(library_name, isa)))
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
    selected_isa.cache_clear()


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


def silu_mul_kernel():
    return load_kernel("hearth_silu_mul")


def lora_add_kernel():
    return load_kernel("hearth_lora_add")


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


def is_fp32_path(isa: Isa | None = None) -> bool:
    isa = isa or selected_isa()
    return isa is not None and isa.activation_dtype == torch.float32


def pad_rows(matrix: Tensor, multiple: int) -> Tensor:
    return F.pad(matrix, (0, 0, 0, -matrix.shape[0] % multiple))


def pack_bf16_weight(weight: Tensor, isa: Isa | None = None) -> Tensor:
    """[N, K] -> the bf16 linear's layout for `isa` (default: the selected path), on huge pages where it can.

    AVX-512 BF16: tiles of 4 rows, 32 columns a chunk. fp32 path: tiles of 32 rows, each
    [ceil(K/2)][32] words, a word the bf16 pair (column 2p low, 2p + 1 high) of one row."""
    if not is_fp32_path(isa):
        return on_huge_pages(pack_tiles(weight.to(torch.bfloat16), BF16_CHUNK))
    out_features, in_features = weight.shape
    padded = pad_rows(F.pad(weight.to(torch.bfloat16), (0, in_features % 2)), F32_TILE_ROWS)
    # [N', K'] -> [tiles, 32 rows, K'/2 pairs, 2] -> [tiles, pairs, 32 rows, 2]: 32-bit words, low half first
    pairs = padded.view(torch.int16).view(-1, F32_TILE_ROWS, padded.shape[1] // 2, 2).permute(0, 2, 1, 3)
    return on_huge_pages(pairs.contiguous().view(torch.int32).view(pairs.shape[0], -1))


def pack_int8_weight(codes: Tensor, scales: Tensor, isa: Isa | None = None) -> tuple[Tensor, Tensor]:
    """int8 [N, K] with scales [N] (per row) or [N, K / group] -> the int8 linear's tiles (on huge
    pages where it can) and its fp32 scales.

    AVX-512 BF16 (per row only): 4-row tiles of 32 columns a chunk, scales padded to the tiles.
    fp32 path: 32-row tiles [K][32] (a column's 32 rows together), scales [tiles][groups][32]."""
    if not is_fp32_path(isa):
        padded_out = -(-codes.shape[0] // TILE_ROWS) * TILE_ROWS
        return on_huge_pages(pack_tiles(codes, INT8_CHUNK)), F.pad(scales.float(), (0, padded_out - codes.shape[0])).contiguous()
    in_features = codes.shape[1]
    tiles = pad_rows(codes, F32_TILE_ROWS).view(-1, F32_TILE_ROWS, in_features).transpose(1, 2)
    per_group = pad_rows(scales.float().reshape(codes.shape[0], -1), F32_TILE_ROWS)
    packed_scales = per_group.view(-1, F32_TILE_ROWS, per_group.shape[1]).transpose(1, 2)
    return on_huge_pages(tiles.contiguous()), packed_scales.contiguous()


def pack_int4_weight(codes: Tensor, scales: Tensor, zeros: Tensor, isa: Isa | None = None) -> Tensor:
    """uint8 codes [N, K] (0..15) with bf16 scales and zeros [N, K / group] -> the int4 linear's layout.

    fp32 path: 32-row tiles, group by group: group / 8 chunks of 32 words (word l of chunk c: row
    l's codes of columns 8c..8c + 7, column 8c + j in bits 4j..), then 32 scales and 32 zeros (bf16)."""
    if not is_fp32_path(isa):
        return pack_int4_avx512(codes, scales, zeros)
    num_groups = scales.shape[1]
    group_size = codes.shape[1] // num_groups
    nibbles = pad_rows(codes, F32_TILE_ROWS).to(torch.int64).view(-1, F32_TILE_ROWS, num_groups, group_size // 8, 8)
    words = (nibbles << (4 * torch.arange(8))).sum(-1).to(torch.int32)  # [tiles, 32, groups, chunks]
    words = words.permute(0, 2, 3, 1).contiguous().view(torch.uint8).view(words.shape[0], num_groups, -1)
    scale_zero = torch.stack([pad_rows(t.to(torch.bfloat16), F32_TILE_ROWS).view(-1, F32_TILE_ROWS, num_groups)
                              .transpose(1, 2) for t in (scales, zeros)], 2)  # [tiles, groups, 2, 32]
    scale_zero = scale_zero.contiguous().view(torch.uint8).view(words.shape[0], num_groups, -1)
    return on_huge_pages(torch.cat([words, scale_zero], dim=-1).contiguous())


INT4_TILE_ROWS, INT4_QUAD = 16, 4  # TILE_N and QUAD of linear_int4.c


def pack_int4_avx512(codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
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
    """[..., K] -> [M, K] in the kernels' activation dtype, with unit stride along K (any row stride)."""
    dtype = activation_dtype()
    if x.dim() == 2 and x.dtype is dtype and x.stride(1) == 1:  # the engine's usual case: as it is
        return x
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1 or rows.dtype != dtype:
        rows = rows.to(dtype).contiguous()
    return rows


def as_input_shape(out: Tensor, x: Tensor) -> Tensor:
    """[M, N] -> x's leading dimensions and N."""
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def linear_bf16(x: Tensor, packed_weight: Tensor, out_features: int) -> Tensor:
    """x [..., K] @ W.T -> [..., N] in the activation dtype, with W packed by `pack_bf16_weight`."""
    rows = as_rows(x)
    num_rows, in_features = rows.shape
    out = torch.empty(num_rows, out_features, dtype=rows.dtype)
    linear_bf16_kernel()(rows.data_ptr(), rows.stride(0), packed_weight.data_ptr(), out.data_ptr(), out_features,
                         num_rows, out_features, in_features, torch.get_num_threads())
    return as_input_shape(out, x)


def linear_int8(x: Tensor, packed: tuple[Tensor, Tensor], out_features: int, group_size: int = 0) -> Tensor:
    """x [..., K] @ (codes * scales).T -> [..., N], the weight packed by `pack_int8_weight` (group_size
    0: one scale per output row)."""
    rows = as_rows(x)
    tiles, scales = packed
    out = torch.empty(rows.shape[0], out_features, dtype=rows.dtype)
    status = linear_int8_kernel()(rows.data_ptr(), rows.stride(0), tiles.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                  out_features, rows.shape[0], out_features, rows.shape[1], group_size,
                                  torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native int8 linear ({isa_name()}): group size {group_size} does not fit {rows.shape[1]} "
                         "input columns (even, dividing them; per row only on avx512bf16)")
    return as_input_shape(out, x)


def linear_int4(x: Tensor, packed: Tensor, out_features: int, group_size: int) -> Tensor:
    """x [..., K] @ W.T -> [..., N], with the int4 weight packed by `pack_int4_weight`."""
    rows = as_rows(x)
    out = torch.empty(rows.shape[0], out_features, dtype=rows.dtype)
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
    positions 0..positions[r]. Returns [N, H, hd]. All in the activation dtype (bf16 shown).
    """
    num_rows, num_heads, head_dim = q.shape
    out = torch.empty(num_rows, num_heads, head_dim, dtype=q.dtype)
    status = paged_attention_kernel()(
        q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(), keys.stride(0),
        block_ids.data_ptr(), table_offsets.data_ptr(), positions.data_ptr(), out.data_ptr(),
        num_rows, num_heads, keys.shape[0], head_dim, block_size, scale, torch.get_num_threads())
    if status == -1:
        raise MemoryError("native paged attention: no memory for its scores")
    if status != 0:
        raise ValueError(f"native paged attention: head_dim {head_dim} is not a multiple of 16 (8 on the fp32 "
                         "path) or is over 256")
    return out


def rope_write_kv(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int,
                  keys: Tensor, values: Tensor, slots: Tensor) -> None:
    """Rotate the q and k heads of qkv in place, then store k and v at `slots` (csrc/paged_attention.c).

    qkv: [N, (H + 2 KV) * hd] bf16, unit stride along a row; cos, sin: [N, hd] bf16, contiguous;
    keys, values: one layer's [KV, slots, hd] bf16, contiguous; slots: int64 [N]. (bf16 on AVX-512
    BF16; all fp32 on the fp32 path.)
    """
    head_dim = keys.shape[-1]
    rope_write_kv_kernel()(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], num_heads,
                           num_kv_heads, head_dim, keys.data_ptr(), values.data_ptr(), keys.stride(0),
                           slots.data_ptr(), torch.get_num_threads())


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.decoder.RMSNorm's forward for x [..., dim] and a weight [dim] in the activation dtype (csrc/rms_norm.c)."""
    rows = as_rows(x)
    out = torch.empty(rows.shape, dtype=rows.dtype)
    status = rms_norm_kernel()(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), rows.shape[0],
                               rows.shape[1], eps, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native RMSNorm: dim {rows.shape[1]} is not a multiple of 16")
    return as_input_shape(out, x)


def silu_mul(gate_up: Tensor, ffn_dim: int) -> Tensor:
    """silu(gate) * up for gate_up [..., 2 * ffn_dim] (gate first) -> [..., ffn_dim]: the decoder loop's SwiGLU."""
    rows = as_rows(gate_up)
    out = torch.empty(rows.shape[0], ffn_dim, dtype=rows.dtype)
    silu_mul_kernel()(rows.data_ptr(), out.data_ptr(), rows.shape[0], ffn_dim, torch.get_num_threads())
    return as_input_shape(out, gate_up)


def lora_add(x: Tensor, y: Tensor, groups: ctypes.Array, layer: int, sites: ctypes.Array) -> None:
    """y[rows] += each group's LoRA deltas of layer `layer` on the targets `sites` name (csrc/lora_delta.c);
    x [rows, in] and y [rows, out] in the activation dtype, rows contiguous, y updated in place."""
    status = lora_add_kernel()(x.data_ptr(), x.stride(0), x.shape[1], y.data_ptr(), y.stride(0),
                               ctypes.addressof(groups), len(groups), layer, ctypes.addressof(sites), len(sites),
                               torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"native LoRA delta: no memory for the scratch of {x.shape[0]} rows")
    if status != 0:
        raise ValueError(f"native LoRA delta: input width {x.shape[1]} is not a multiple of 8 or not the adapter's")


def decoder_layers(x: Tensor, layers: ctypes.Array, step: StepShape) -> None:
    """Run every layer in `layers` over x [rows, dim] (activation dtype, contiguous, updated in place):
    csrc/decoder_layers.c."""
    status = decoder_layers_kernel()(x.data_ptr(), x.shape[0], ctypes.addressof(layers), len(layers),
                                     ctypes.addressof(step), torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"native decoder layers: no memory for the scratch of {x.shape[0]} rows")
    if status != 0:
        raise ValueError("native decoder layers: a width is not a multiple of 16, head_dim is over 256, "
                         "or an int4 group size is not a multiple of 32")


def build_all() -> list[Path]:
    """Every library of every path of this machine's architecture, into the cache (no CPU check: an
    image built here may run on another CPU; the path is picked when it runs)."""
    isas = [isa for isa in ISAS.values() if platform.machine() in isa.machines]
    names = sorted({library for library, _, _ in SIGNATURES.values()})
    return [compile_library(name, isa) for isa in isas for name in names]


if __name__ == "__main__":
    for path in build_all():
        print(path)
