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
- `max_tokens` is sent only when the user sets it: the server then lets a
  reply use the rest of the context (a fixed default as large as a small
  model's context made the first message a 400).
- A conversation outgrowing the context loses its oldest turns, said on
  stderr, never fails: before a turn, when the last reply's usage shows the
  conversation filling more than the context minus room for a reply
  (`--max-tokens`, else a quarter of the context), oldest user/assistant
  pairs go (their token share estimated by length); a context-overflow 400
  still drops the oldest pair and retries, for servers that do not report
  their context length.
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

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code  # OpenAI's error.code, e.g. "context_length_exceeded"


@dataclass
class ChatOptions:
    """Sampling settings sent with every turn."""

    temperature: float = 0.7
    top_k: int = 40  # 0: off (vLLM-style extra, ignored by plain OpenAI servers)
    top_p: float = 0.95
    max_tokens: int | None = None  # None: not sent, the server uses the rest of the context


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


def server_error_code(response: httpx.Response) -> str | None:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


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
    context_length: int | None = None  # the model's, when the server says (/v1/models max_model_len)
    conversation_tokens: int | None = None  # prompt + reply tokens of the last turn (its usage)
    notify: Callable[[str], None] = lambda note: None  # where "(dropped ... turns)" notes go

    def request_body(self) -> dict:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body = {
            "model": self.model,
            "messages": system + self.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": self.options.temperature,
            "top_k": self.options.top_k,
            "top_p": self.options.top_p,
        }
        if self.options.max_tokens is not None:
            body["max_tokens"] = self.options.max_tokens
        return body

    def send(self, text: str, write: Callable[[str], None]) -> ReplyStats:
        """Send a user turn, write the reply as it streams, and remember both turns."""
        self.drop_turns(self.turns_over_budget())
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            stats = self._reply_dropping_turns_on_overflow(pieces, write)
        except BaseException:  # Ctrl-C or a failure: keep what arrived, drop an empty turn
            if pieces:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            else:
                self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        return stats

    def _reply_dropping_turns_on_overflow(self, pieces: list[str], write: Callable[[str], None]) -> ReplyStats:
        while True:
            try:
                return self._stream_reply(pieces, write)
            except ServerError as exc:
                if exc.code != "context_length_exceeded" or len(self.messages) < 3 or pieces:
                    raise
                self.drop_turns(1)

    def reply_room(self) -> int:
        """Tokens kept free for the next reply."""
        return self.options.max_tokens or (self.context_length or 0) // 4

    def turns_over_budget(self) -> int:
        """How many oldest user/assistant pairs to drop so the conversation leaves room for a reply."""
        if not (self.context_length and self.conversation_tokens):
            return 0
        budget = self.context_length - self.reply_room()
        tokens, total_chars = float(self.conversation_tokens), sum(len(m["content"]) for m in self.messages) or 1
        pairs = 0
        while tokens > budget and 2 * (pairs + 1) <= len(self.messages):
            pair = self.messages[2 * pairs: 2 * pairs + 2]
            tokens -= self.conversation_tokens * sum(len(m["content"]) for m in pair) / total_chars
            pairs += 1
        return pairs

    def drop_turns(self, pairs: int) -> None:
        if pairs <= 0:
            return
        del self.messages[: 2 * pairs]
        self.conversation_tokens = None
        limit = f"the model's {self.context_length}-token context" if self.context_length else "the model's context"
        what = "exchange" if pairs == 1 else f"{pairs} exchanges"
        self.notify(f"(dropped the oldest {what} to fit {limit})")

    def _stream_reply(self, pieces: list[str], write: Callable[[str], None]) -> ReplyStats:
        started = time.perf_counter()
        first_token: float | None = None
        usage_tokens: int | None = None
        with self.client.stream("POST", "/v1/chat/completions", json=self.request_body()) as response:
            if response.status_code != 200:
                response.read()
                raise ServerError(f"server answered {response.status_code}: {server_error_message(response)}",
                                  server_error_code(response))
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
                    self.conversation_tokens = chunk["usage"].get("total_tokens")
        total = time.perf_counter() - started
        count = usage_tokens if usage_tokens is not None else len(pieces)
        return ReplyStats(count, first_token - started if first_token else None, total)


def make_client(url: str, api_key: str | None, timeout: float = 600.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Reading waits as long as a reply may take; connecting fails fast.
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))


def pick_model(client: httpx.Client, wanted: str | None) -> tuple[str, int | None]:
    """The model to talk to (`wanted` if the server has it, else the server's first) and its context length."""
    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise HearthError(f"cannot reach the server at {client.base_url}: {exc}") from None
    if response.status_code == 401:
        raise HearthError(f"{client.base_url}: {server_error_message(response)} (use --api-key or HEARTH_API_KEY)")
    if response.status_code != 200:
        raise HearthError(f"{client.base_url}/v1/models answered {response.status_code}: {server_error_message(response)}")
    cards = {card["id"]: card for card in response.json().get("data", [])}
    models = list(cards)
    if wanted is not None and wanted not in models:
        raise HearthError(f"--model {wanted}: the server has {', '.join(models) or 'no models'}")
    if not models:
        raise HearthError(f"{client.base_url} serves no models")
    model = wanted or models[0]
    return model, cards[model].get("max_model_len")  # vLLM's extra; None from plain OpenAI servers


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
        model, context_length = pick_model(client, args.model)
        session = ChatSession(client, model, options, system=args.system, context_length=context_length,
                              notify=lambda note: sys.stderr.write(note + "\n"))
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
