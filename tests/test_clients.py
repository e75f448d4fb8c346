"""`hearth chat` and `hearth bench` as a new user meets them.

`hearth chat` runs against the shipped from-scratch model (weights/wordnet-mini, a
512-token context) as `make serve` serves it: piped, and in a pseudo-terminal
(its interactive path: prompt, stats line, Ctrl-D). `hearth bench` runs
against a stand-in ASGI server that records what each request carried and
on which connection it came.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server_fixtures import running_server, serve_app

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "weights" / "wordnet-mini"  # a 512-token context: the long-conversation tests need one


@pytest.fixture(scope="module")
def default_server():
    with running_server(MINI, dtype="auto") as running:
        yield running


def run_cli(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    from cli.main import main

    monkeypatch.delenv("HEARTH_API_KEY", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_first_message_is_answered(default_server, monkeypatch, capsys):
    """It was a 400: max_tokens 512 by default, the whole context of this model."""
    code, out, err = run_cli(["chat", "--url", default_server.url, "--temperature", "0"],
                             'What does "river" mean?\n', monkeypatch, capsys)
    assert code == 0 and err == "", err
    assert out.strip(), "no reply"


def test_a_long_conversation_drops_its_oldest_turns_instead_of_failing(default_server, monkeypatch, capsys):
    question = "Tell me again about the river, the boats on the water and the old stone bridge in the town. " * 10
    turns = "".join(f"{index}. {question}\n" for index in range(3))  # about 230 tokens each
    code, out, err = run_cli(["chat", "--url", default_server.url, "--temperature", "0", "--max-tokens", "16"],
                             turns, monkeypatch, capsys)
    assert code == 0 and "error" not in err, err
    assert "(dropped the oldest" in err and "to fit the model's 512-token context)" in err, err


def test_overflow_from_a_server_that_does_not_say_its_context_drops_the_oldest_pair(default_server):
    from clients.chat import ChatOptions, ChatSession, make_client

    notes: list[str] = []
    long_turn = "the river and the bridge " * 60  # about 300 tokens: two of them overflow 512
    with make_client(default_server.url, None) as client:
        session = ChatSession(client, default_server.model_id, ChatOptions(temperature=0, max_tokens=8),
                              notify=notes.append)  # context_length unknown, as from a plain OpenAI server
        session.messages = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "yes"}]
        session.send(long_turn, lambda piece: None)
    assert notes == ["(dropped the oldest exchange to fit the model's context)"]
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return data


def test_hearth_chat_in_a_terminal(default_server):
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    env.pop("HEARTH_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "chat", "--url", default_server.url, "--temperature", "0"],
                               stdin=child_fd, stdout=child_fd, stderr=child_fd, cwd=ROOT, env=env, close_fds=True)
    os.close(child_fd)
    try:
        banner = read_until(main_fd, b">>> ", 60)
        assert b"chatting with wordnet-mini" in banner, banner
        os.write(main_fd, b'What does "river" mean?\r')
        reply = read_until(main_fd, b">>> ", 120)
        os.write(main_fd, b"\x04")  # Ctrl-D at the prompt ends the session
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main_fd)
    text = reply.decode("utf-8", "replace")
    assert "error" not in text and " tokens" in text and "first token" in text, text  # the dim stats line


# ------------------------------------------------------------------------------------------ hearth bench


class RecordingServer:
    """A stand-in /v1/completions that streams one token and records each request's body and client port."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.client_ports: list[int] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(json.loads(body))
        self.client_ports.append(scope["client"][1])
        chunk = {"choices": [{"index": 0, "text": "x"}], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()})


@pytest.mark.parametrize(("flags", "temperature"), [([], 0.0), (["--temperature", "0.7"], 0.7)])
def test_hearth_bench_sends_the_temperature_asked_and_a_new_connection_per_request(monkeypatch, capsys, flags, temperature):
    recorder = RecordingServer()
    with serve_app(recorder) as url:
        code, out, _ = run_cli(["bench", "--url", url, "--model", "m", "--concurrency", "2", "--requests", "6",
                                "--prompt-tokens", "4", "--max-tokens", "1", *flags], "", monkeypatch, capsys)
    assert code == 0, out
    assert len(recorder.bodies) == 7  # the warm-up and six measured
    assert {body["temperature"] for body in recorder.bodies} == {temperature}
    assert len(set(recorder.client_ports)) == 7  # no connection was reused
    assert f"temperature {temperature}, one new connection per request (no keep-alive reuse)" in out
