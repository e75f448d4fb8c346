"""`hearth chat`: a streaming, multi-turn chat in the terminal against a running Hearth server.

    hearth chat                                   # http://127.0.0.1:8080, the server's first model
    hearth chat --url http://box:8080 --model default --system "Answer briefly."

Design choices:
- Speaks the server's OpenAI API over plain HTTP (httpx), so it works against
  any OpenAI-compatible server, and needs neither torch nor the weights.
- The whole conversation is resent each turn (the API is stateless); the
  server's prefix cache makes the repeated prefix cheap.
- Ctrl-C while a reply streams closes the connection (the server cancels the
  request) and keeps the partial reply in the history; Ctrl-C or Ctrl-D at
  the prompt ends the session. `/new` starts over, `/help` lists commands.
- Piped stdin works too (one user turn per line), which is how it is tested.
- Server errors are printed as the server's one-line message, never a
  traceback; an unreachable server or a wrong key is a `HearthError`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

import httpx

from model.errors import HearthError

DEFAULT_URL = "http://127.0.0.1:8080"
HELP = "commands: /new (forget the conversation), /system TEXT (set the system prompt), /quit (or Ctrl-D)"


class ServerError(HearthError):
    """The server answered with an error status; the message is the server's own."""


@dataclass
class ChatOptions:
    """Sampling settings sent with every turn."""

    temperature: float = 0.7
    top_k: int = 40  # 0: off (vLLM-style extra, ignored by plain OpenAI servers)
    top_p: float = 0.95
    max_tokens: int = 512


@dataclass
class ReplyStats:
    """What one streamed reply cost, for the dim status line after it."""

    completion_tokens: int  # from the server's usage chunk, else the number of content chunks
    first_token_seconds: float | None  # request sent -> first content chunk
    total_seconds: float

    def describe(self) -> str:
        parts = [f"{self.completion_tokens} tokens"]
        decode_seconds = self.total_seconds - (self.first_token_seconds or 0)
        if self.first_token_seconds is not None:
            parts.append(f"first token {self.first_token_seconds:.2f} s")
            if self.completion_tokens > 1 and decode_seconds > 0:
                parts.append(f"{(self.completion_tokens - 1) / decode_seconds:.1f} tokens/s")
        return ", ".join(parts)


def error_text(body: object) -> str:
    """The message of an OpenAI ({error: {message}}) or Ollama ({error: str}) error body."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body)


def server_error_message(response: httpx.Response) -> str:
    try:
        return error_text(response.json())
    except ValueError:
        return response.text.strip() or response.reason_phrase


def iter_sse_data(lines: Iterator[str]) -> Iterator[dict]:
    """Parsed JSON payloads of `data:` lines until `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            yield json.loads(data)


@dataclass
class ChatSession:
    """One conversation with one model on one server."""

    client: httpx.Client
    model: str
    options: ChatOptions = field(default_factory=ChatOptions)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)  # user/assistant turns so far

    def request_body(self) -> dict:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {
            "model": self.model,
            "messages": system + self.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": self.options.temperature,
            "top_k": self.options.top_k,
            "top_p": self.options.top_p,
            "max_tokens": self.options.max_tokens,
        }

    def send(self, text: str, write: Callable[[str], None]) -> ReplyStats:
        """Send a user turn, write the reply as it streams, and remember both turns."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            stats = self._stream_reply(pieces, write)
        except BaseException:  # Ctrl-C or a failure: keep what arrived, drop an empty turn
            if pieces:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            else:
                self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        return stats

    def _stream_reply(self, pieces: list[str], write: Callable[[str], None]) -> ReplyStats:
        started = time.perf_counter()
        first_token: float | None = None
        usage_tokens: int | None = None
        with self.client.stream("POST", "/v1/chat/completions", json=self.request_body()) as response:
            if response.status_code != 200:
                response.read()
                raise ServerError(f"server answered {response.status_code}: {server_error_message(response)}")
            for chunk in iter_sse_data(response.iter_lines()):
                if "error" in chunk:
                    raise ServerError(f"server error mid-reply: {error_text(chunk)}")
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first_token = first_token or time.perf_counter()
                        pieces.append(piece)
                        write(piece)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
        total = time.perf_counter() - started
        count = usage_tokens if usage_tokens is not None else len(pieces)
        return ReplyStats(count, first_token - started if first_token else None, total)


def make_client(url: str, api_key: str | None, timeout: float = 600.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Reading waits as long as a reply may take; connecting fails fast.
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))


def pick_model(client: httpx.Client, wanted: str | None) -> str:
    """The model to talk to: `wanted` if the server has it, else the server's first."""
    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise HearthError(f"cannot reach the server at {client.base_url}: {exc}") from None
    if response.status_code == 401:
        raise HearthError(f"{client.base_url}: {server_error_message(response)} (use --api-key or HEARTH_API_KEY)")
    if response.status_code != 200:
        raise HearthError(f"{client.base_url}/v1/models answered {response.status_code}: {server_error_message(response)}")
    models = [model["id"] for model in response.json().get("data", [])]
    if wanted is not None:
        if wanted not in models:
            raise HearthError(f"--model {wanted}: the server has {', '.join(models) or 'no models'}")
        return wanted
    if not models:
        raise HearthError(f"{client.base_url} serves no models")
    return models[0]


def handle_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; False means quit."""
    command, _, argument = line.partition(" ")
    if command in ("/quit", "/exit", "/bye"):
        return False
    if command in ("/new", "/clear"):
        session.messages.clear()
        out.write("(new conversation)\n")
    elif command == "/system":
        session.system = argument.strip() or None
        out.write(f"(system prompt {'set' if session.system else 'cleared'})\n")
    else:
        out.write(HELP + "\n")
    return True


def chat_loop(session: ChatSession, read_line: Callable[[str], str], out: TextIO, err: TextIO, show_stats: bool) -> None:
    """Prompt, stream, repeat, until /quit, EOF or Ctrl-C at the prompt."""
    while True:
        try:
            line = read_line(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(session, line, out):
                return
            continue
        try:
            stats = session.send(line, lambda piece: (out.write(piece), out.flush()))
        except KeyboardInterrupt:
            out.write("\n")
            err.write("(stopped)\n")
            continue
        except ServerError as exc:
            out.write("\n")
            err.write(f"error: {exc}\n")
            continue
        except httpx.HTTPError as exc:
            raise HearthError(f"lost the connection to {session.client.base_url}: {exc}") from None
        out.write("\n")
        if show_stats:
            err.write(f"\033[2m[{stats.describe()}]\033[0m\n")


def run_chat(args) -> int:
    """Handler of `hearth chat`."""
    api_key = args.api_key or os.environ.get("HEARTH_API_KEY") or None
    options = ChatOptions(args.temperature, args.top_k, args.top_p, args.max_tokens)
    with make_client(args.url, api_key) as client:
        model = pick_model(client, args.model)
        session = ChatSession(client, model, options, system=args.system)
        interactive = sys.stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            sys.stderr.write(f"chatting with {model} at {args.url} ({HELP})\n")
        read_line = input if interactive else _read_piped_line
        chat_loop(session, read_line, sys.stdout, sys.stderr, show_stats=interactive)
    return 0


def _read_piped_line(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line
