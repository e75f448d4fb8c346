"""The one rule for text entering the server: a string must be encodable as UTF-8.

    path = unencodable_text_path(data)   # after json.loads, before any model sees the body
    if path: raise APIError(400, f"{path}: ...", param=path)

Design choices:
- JSON allows a lone UTF-16 surrogate (`"\\ud800"`) and Python decodes it to
  a `str` that cannot be encoded: the tokenizer, logging and the error
  answers would then fail with a 500. Such text is not a Unicode string, so
  the request is refused with a 400 naming the field (OpenAI's own answer
  to it), rather than silently replaced with U+FFFD: the client learns its
  encoder is broken and no text is changed behind its back.
- The check runs once, on the parsed JSON body (`server.core.http.parse_body`),
  so it covers every string of every route: known fields, unknown ones and
  object keys alike, whatever fields the protocol models grow later.
- The path is written as the error's `param` ("messages[0].content"), the
  same notation as validation errors; a bad object key is named with
  `backslashreplace`, so the answer itself is always encodable.
"""

from __future__ import annotations

import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def first_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text`, or None (a valid str holds no surrogate at all)."""
    match = _SURROGATE.search(text)
    return match.start() if match else None


def printable_key(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def unencodable_text_path(data: Any, path: str = "") -> str | None:
    """The JSON path of the first string (value or key) in `data` holding a lone surrogate, else None."""
    if isinstance(data, str):
        return (path or "body") if first_surrogate(data) is not None else None
    if isinstance(data, dict):
        for key, value in data.items():
            child = f"{path}.{printable_key(key)}" if path else printable_key(key)
            if first_surrogate(key) is not None:
                return child
            found = unencodable_text_path(value, child)
            if found:
                return found
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found = unencodable_text_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


def surrogate_message(path: str) -> str:
    return f"{path}: text contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a Unicode character"
