"""Ollama's `keep_alive` durations: how long a model stays loaded after its last request.

    parse_keep_alive("5m", "keep_alive")   -> 300.0
    parse_keep_alive(-1, "keep_alive")     -> None    (never unloaded)
    parse_keep_alive(0, "keep_alive")      -> 0.0     (unloaded as soon as its requests finish)

Design choices:
- The accepted forms are Ollama's: a JSON number of seconds, or a string in
  Go's duration syntax ("300ms", "30s", "5m", "1h30m"); a bare number in a
  string ("60") is seconds too. Any negative duration (or one over ~31
  years) means "never unload".
- A bad value is a `InvalidRequestError` naming the field (400 on a request,
  a one-line settings error at start-up via the ValueError it also is).
"""

from __future__ import annotations

import math
import re
from typing import Any

from server.engine.types import InvalidRequestError

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER_SECONDS = 1e9  # ~31 years: longer is "never" (and keeps /api/ps's expires_at a valid date)
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class KeepAliveError(InvalidRequestError, ValueError):
    """A keep_alive that is neither a number of seconds nor a Go duration."""


def parse_keep_alive(value: Any, field: str) -> float | None:
    """Seconds to stay loaded after the last request; None means forever."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KeepAliveError(field, f"{field}: expected a number of seconds or a duration like \"5m\", got {value!r}")
    seconds = value if not isinstance(value, str) else _duration_seconds(value.strip(), field)
    if not math.isfinite(seconds):
        raise KeepAliveError(field, f"{field}: {value!r} is not a finite duration")
    return None if seconds < 0 or seconds > FOREVER_SECONDS else float(seconds)


def _duration_seconds(text: str, field: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if re.fullmatch(r"\d+(\.\d*)?", body):
        return sign * float(body)
    parts = _PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise KeepAliveError(field, f"{field}: {text!r} is not a duration "
                             "(use seconds, or e.g. \"30s\", \"5m\", \"1h\", -1 for never)")
    return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def describe_keep_alive(seconds: float | None) -> str:
    return "never unloaded" if seconds is None else f"{seconds:g} s"
