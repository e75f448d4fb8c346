"""SIGTERM with streams still running when --shutdown-timeout passes: each ends in its protocol's words.

A real `hearth serve` process whose engine steps are slowed (a stand-in for a
big model on a slow CPU), so the streams outlive a 1 s shutdown timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

# `hearth serve` with every engine step STEP_SLEEP seconds longer (30 ms: 200 tokens take > 6 s), and no
# stop tokens: the Ollama routes have no ignore_eos, and a random model's EOS (sampled at Ollama's default
# temperature) would end their streams before the shutdown timeout does.
SLOW_SERVE = """
import os, sys, time
from model import tokenizer
init = tokenizer.Tokenizer.__init__
def init_without_stops(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.stop_ids = []
tokenizer.Tokenizer.__init__ = init_without_stops
from server.engine import worker
execute = worker.ModelWorker.execute
def slow_execute(self, output):
    time.sleep(float(os.environ["STEP_SLEEP"]))
    return execute(self, output)
worker.ModelWorker.execute = slow_execute
from cli.main import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_slow_server(model_dir: Path, port: int, step_sleep: float, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEARTH_KV_CACHE_BLOCKS": "80", "HEARTH_DTYPE": "float32",
           "STEP_SLEEP": str(step_sleep)}
    return subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "--model", str(model_dir), "--port", str(port), *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"hearth serve exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.ConnectError:
            pass
        time.sleep(0.1)
    raise AssertionError("hearth serve never became healthy")


def stream_body(route: str, model: str, max_tokens: int) -> dict:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    if route.startswith("/api/"):
        prompt = {"prompt": "once upon", "raw": True} if route == "/api/generate" else chat
        return {"model": model, **prompt, "options": {"num_predict": max_tokens}}
    prompt = {"prompt": "once upon"} if route == "/v1/completions" else chat
    return {"model": model, **prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}


ROUTES = ("/v1/completions", "/v1/chat/completions", "/api/generate", "/api/chat")


def read_stream(url: str, route: str, body: dict, lines: list[str], errors: list[BaseException],
                started: threading.Event) -> None:
    try:
        with httpx.stream("POST", url + route, json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except BaseException as exc:  # noqa: BLE001 -- reported by the test
        errors.append(exc)


def run_streams_then_sigterm(model_dir: Path, step_sleep: float, max_tokens: int, *flags: str
                             ) -> tuple[dict[str, list[str]], list, str, int]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_slow_server(model_dir, port, step_sleep, *flags)
    lines: dict[str, list[str]] = {route: [] for route in ROUTES}
    errors: list[BaseException] = []
    try:
        wait_healthy(url, process)
        events = {route: threading.Event() for route in ROUTES}
        threads = [threading.Thread(target=read_stream, args=(url, route, stream_body(route, model_dir.name, max_tokens),
                                                              lines[route], errors, events[route]))
                   for route in ROUTES]
        for thread in threads:
            thread.start()
        assert all(event.wait(30) for event in events.values())
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return lines, errors, output, process.returncode


def test_streams_cut_by_the_shutdown_timeout_end_in_protocol(tiny_model_dir):
    lines, errors, output, status = run_streams_then_sigterm(tiny_model_dir, 0.03, 200, "--shutdown-timeout", "1")
    assert not errors, errors  # before: RemoteProtocolError (peer closed connection mid-body)
    assert status == 0, output
    for route in ("/v1/completions", "/v1/chat/completions"):
        *_, error_event, done = lines[route]
        assert done == "data: [DONE]", lines[route][-3:]
        error = json.loads(error_event.removeprefix("data: "))["error"]
        assert error["message"] == "server shutting down" and error["code"] == "server_shutting_down"
    for route in ("/api/generate", "/api/chat"):
        assert json.loads(lines[route][-1]) == {"error": "server shutting down", "done": True}
        assert len(lines[route]) > 1  # some tokens came first: the stream was cut, not refused
    assert output.count("cancelled at shutdown") == 4, output  # one line per request
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output


def test_streams_finishing_within_the_shutdown_timeout_complete(tiny_model_dir):
    lines, errors, output, status = run_streams_then_sigterm(tiny_model_dir, 0.01, 40)  # 0.5-2 s left, 10 s allowed
    assert not errors and status == 0, (errors, output)
    for route in ("/v1/completions", "/v1/chat/completions"):
        assert lines[route][-1] == "data: [DONE]" and "error" not in lines[route][-2]
    for route in ("/api/generate", "/api/chat"):
        final = json.loads(lines[route][-1])
        assert final["done"] is True and final["done_reason"] in ("stop", "length") and "error" not in final
    assert "cancelled at shutdown" not in output and "Traceback" not in output, output
