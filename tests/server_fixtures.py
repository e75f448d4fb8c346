"""A real `hearth serve` stack on a loopback port, for the HTTP API tests.

    @pytest.fixture(scope="module")
    def server(tiny_model_dir):
        with running_server(tiny_model_dir) as running:
            yield running

`running_server` goes the production way: `create_app(settings=...)` with
the checkpoint folder, models loaded by the app's lifespan into the real
`Engine`, uvicorn in a background thread on a socket bound beforehand (so
the port is known and cannot be taken). It waits for /health to say 200.
The engine runs in float32 so greedy outputs can be checked token for token
against the reference generator.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import ollama
import openai
import uvicorn

try:
    import httpx2  # the HTTP library of openai >= 3
except ImportError:  # older SDKs use httpx
    httpx2 = httpx

from model.checkpoint import load_checkpoint
from model.generate import GenerationSettings, generate
from server.app import create_app
from server.settings import load_settings

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
# Enough KV blocks for 16 concurrent full contexts of the tiny model (256 tokens = 16 blocks).
TEST_ENGINE_SETTINGS = {"dtype": "float32", "device": "cpu", "kv_cache_blocks": 272, "max_num_seqs": 32, "block_size": 16}


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    app: Any  # the FastAPI app
    model_id: str  # the checkpoint folder's name

    @property
    def engine(self) -> Any:
        return self.app.state.registry.models[self.model_id].engine


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# Test clients send with TCP_NODELAY (as curl and browsers do): httpx writes a POST's headers
# and body separately, and without it each request waits ~40 ms for a delayed ACK.


def http_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(socket_options=NODELAY))


def openai_client(url: str) -> openai.OpenAI:
    transport = httpx2.HTTPTransport(socket_options=NODELAY)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=httpx2.Client(transport=transport))


def async_openai_client(url: str) -> openai.AsyncOpenAI:
    client = httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(socket_options=NODELAY))
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=client)


def ollama_client(url: str) -> ollama.Client:
    return ollama.Client(host=url, transport=httpx.HTTPTransport(socket_options=NODELAY))


def wait_until_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health").status_code == 200:
            return
        time.sleep(0.02)
    raise RuntimeError(f"{url}/health never answered 200")


@contextlib.contextmanager
def running_server(model_dir: Path, **engine_settings: Any) -> Iterator[RunningServer]:
    """The tiny checkpoint served the way `hearth serve --model DIR` serves it."""
    settings = load_settings(models=[str(model_dir)], **{**TEST_ENGINE_SETTINGS, **engine_settings})
    app = create_app(settings=settings)
    with serve_app(app) as url:
        wait_until_ready(url)
        yield RunningServer(url, app, Path(model_dir).name)


def reference_tokens(model_dir: Path, prompt_ids: list[int], max_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens from the reference generator (no batching, no paging)."""
    model = _reference_model(str(model_dir))
    return list(generate(model, prompt_ids, GenerationSettings(max_tokens=max_tokens, temperature=0, stop_ids=stop_ids)))


_models: dict[str, Any] = {}  # checkpoint folder -> its reference model, loaded once per session


def _reference_model(model_dir: str) -> Any:
    if model_dir not in _models:
        _models[model_dir] = load_checkpoint(model_dir).model
    return _models[model_dir]
