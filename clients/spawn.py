"""`hearth serve` as a child process, for scripts and benchmarks that talk to a real server.

    process, url = start_server("weights/default", "--max-num-seqs", "64")
    ...                      # requests to url
    stop_server(process)

The child is `python -m server` from this checkout on a free loopback port (or
the one given); start_server returns once /health answers 200, and fails with
a one-line SystemExit if the child exits or never gets healthy. The child's
stdout (its settings banner) goes where `stdout` says, its log to our stderr.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: str | Path, *flags: str, port: int | None = None, timeout_s: float = 300,
                 stdout: int | IO | None = subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    command = [sys.executable, "-m", "server", "--model", str(checkpoint), "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: hearth serve exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"error: hearth serve was not healthy after {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (the server's graceful shutdown), then wait for it to exit."""
    process.terminate()
    process.wait(timeout_s)
