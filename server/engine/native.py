"""Native CPU kernels: C sources in csrc/, compiled on first use and called through ctypes.

One kernel so far, the bf16 linear of csrc/linear_bf16.c (why it exists and why its
results are batch invariant: see that file's header).

Design choices:
- Optional, never required: on another CPU, without a C compiler, or with
  HEARTH_NATIVE_KERNELS=0, `linear_bf16_kernel()` returns None (the reason is
  logged once) and the caller keeps oneDNN.
- Compiled with explicit ISA flags (AVX-512 F/BW/VL/BF16), not -march=native, and
  only after /proc/cpuinfo shows those flags; the library lands in a per-user cache
  (HEARTH_CACHE_DIR, else ~/.cache/hearth) under a name hashed from the source and
  the flags, written to a temporary file and renamed (atomic: two processes
  compiling at once both end with a whole library). A library already there needs
  no compiler: `python -m server.engine.native` builds it ahead (the Dockerfile does).
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
TILE_ROWS, CHUNK = 4, 32  # csrc/linear_bf16.c's TILE_N and CHUNK_K


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


def compile_library(name: str) -> Path:
    """csrc/<name>.c -> a shared library in the cache, compiled when it is not there yet."""
    source = SOURCE_DIR / f"{name}.c"
    flags = ["-O3", "-std=gnu11", *ISA_FLAGS, "-fopenmp", "-fPIC", "-shared"]
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
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
        result = subprocess.run([compiler, *flags, str(source), "-o", temporary], capture_output=True, text=True)
        if result.returncode != 0:
            first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise NativeUnavailable(f"{compiler} could not compile {source.name}: {first_error[:200]}")
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return library


@functools.cache
def linear_bf16_kernel():
    """The loaded `hearth_linear_bf16` C function, or None when it cannot run here."""
    if os.environ.get("HEARTH_NATIVE_KERNELS", "1") == "0":
        logger.info("native kernels off (HEARTH_NATIVE_KERNELS=0): bf16 linears use oneDNN")
        return None
    try:
        check_cpu()
        library = ctypes.CDLL(str(compile_library("linear_bf16")))
    except (NativeUnavailable, OSError) as error:
        logger.warning("native bf16 linear unavailable, using oneDNN: %s", error)
        return None
    function = library.hearth_linear_bf16
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    function.restype = None
    return function


def pack_bf16_weight(weight: Tensor) -> Tensor:
    """[N, K] bf16 -> the kernel's tiles [ceil(N/4), ceil(K/32), 4, 32], zero padded (a plain tensor)."""
    out_features, in_features = weight.shape
    padded_out = -(-out_features // TILE_ROWS) * TILE_ROWS
    padded_in = -(-in_features // CHUNK) * CHUNK
    padded = F.pad(weight.to(torch.bfloat16), (0, padded_in - in_features, 0, padded_out - out_features))
    # [N', K'] -> [N'/4, 4, K'/32, 32] -> [N'/4, K'/32, 4, 32]: a tile's 4 rows chunk by chunk, front to back
    tiles = padded.view(padded_out // TILE_ROWS, TILE_ROWS, padded_in // CHUNK, CHUNK).transpose(1, 2)
    return tiles.contiguous()


def linear_bf16(x: Tensor, packed_weight: Tensor, out_features: int) -> Tensor:
    """x [..., K] bf16 @ W.T -> [..., N] bf16, with W packed by `pack_bf16_weight`."""
    kernel = linear_bf16_kernel()
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1 or rows.dtype != torch.bfloat16:  # the kernel takes any row stride
        rows = rows.to(torch.bfloat16).contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    kernel(rows.data_ptr(), rows.stride(0), packed_weight.data_ptr(), out.data_ptr(), out_features,
           rows.shape[0], out_features, in_features, torch.get_num_threads())
    return out.view(*x.shape[:-1], out_features)


if __name__ == "__main__":  # build the libraries into the cache now (no CPU check: the image may run elsewhere)
    print(compile_library("linear_bf16"))
