"""Memory under load: the server's allocator limits (server/memory.py) and the soak benchmark's sampling.

glibc gives each thread that allocates under contention its own arena (up to
8 per core) and keeps freed memory in it: that, not a leak, is what made the
server's RSS climb under 32 streaming clients. The first test counts glibc's
arenas (`malloc_info`) after threads hammer malloc in a process that built
the app: at most 2. bench/bench_soak.py measures the RSS itself (README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COUNT_ARENAS = """
import ctypes, os, re, sys, tempfile, threading
if sys.argv[1] == "app":
    from server.app import create_app
    create_app(engines={})          # what `hearth serve` does before its threads start
def churn():
    for _ in range(3000):
        blocks = [bytearray(200_000) for _ in range(4)]   # below the mmap threshold: from an arena
        del blocks
threads = [threading.Thread(target=churn) for _ in range(12)]
for thread in threads: thread.start()
for thread in threads: thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(len(re.findall(r'<heap nr=', open(path).read())))
os.remove(path)
"""


def arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", COUNT_ARENAS, mode], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not Path("/lib/x86_64-linux-gnu/libc.so.6").exists() and not Path("/lib64/libc.so.6").exists(),
                    reason="glibc only")
def test_the_app_limits_glibc_to_two_arenas():
    unlimited = arenas("plain")
    assert unlimited > 2, unlimited  # the churn does make glibc open arenas: the check below means something
    assert arenas("app") <= 2


def test_tune_malloc_leaves_a_users_setting_alone(monkeypatch):
    from server import memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    applied = memory.tune_malloc()
    assert "MALLOC_ARENA_MAX" not in applied
    assert applied.get("MALLOC_MMAP_THRESHOLD_") == memory.MMAP_THRESHOLD or memory._libc is None
