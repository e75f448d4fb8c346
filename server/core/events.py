"""The API-neutral events `serve()` yields; each API renders them in its own wire format.

Design choices:
- One `ChoiceStep` per engine step and choice, holding that step's text
  delta, tool-call deltas (`parts`, in generation order), logprobs and
  finish: every wire format frames per step, so renderers never regroup.
- `parts` are server/tools.py's parser events (TextEvent, CallStart,
  ArgumentsDelta, CallEnd); without tools a step's part is its text.
- Logprobs are already converted (token text and raw bytes), once, here in
  the core; APIs only reshape them.
- The last event of a generation is one `UsageEvent` (usage summed over its
  engine requests), after every choice's finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from server.engine.types import Usage
from server.tools import ArgumentsDelta, CallEnd, CallStart, TextEvent

Part = Union[TextEvent, CallStart, ArgumentsDelta, CallEnd]


@dataclass(frozen=True)
class TopLogprob:
    token: str  # the token's text (a part of a UTF-8 character becomes U+FFFD)
    bytes: list[int]  # its raw bytes
    logprob: float


@dataclass(frozen=True)
class Logprob:
    token: str
    bytes: list[int]
    logprob: float
    top: tuple[TopLogprob, ...]  # most likely first


@dataclass(frozen=True)
class Finish:
    reason: str  # the engine's: "stop" or "length"
    tool_calls: int = 0  # calls started in this choice (an API may report "tool_calls")
    leftover: str = ""  # raw text of a call cut off by max_tokens: text in a whole answer


@dataclass(frozen=True)
class ChoiceStep:
    """What one engine step added to one choice."""

    choice: int  # index among all choices (prompt index * n + choice, for several prompts)
    text: str  # the raw text delta (tool calls included)
    parts: tuple[Part, ...]  # the text split into text and tool-call deltas
    token_ids: tuple[int, ...]
    logprobs: tuple[Logprob, ...] | None = None  # one per token when requested
    finish: Finish | None = None  # on the choice's last step


@dataclass(frozen=True)
class UsageEvent:
    usage: Usage | None


Event = Union[ChoiceStep, UsageEvent]
