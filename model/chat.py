"""The chat template, defined once and used by the trainer (SFT) and the server.

Hearth's own template, token by token:

    <|bos|><|system|>\n{system}<|end|>\n<|user|>\n{user}<|end|>\n<|assistant|>\n{reply}<|end|>\n ...

A generation prompt ends with `<|assistant|>\n`; the model ends its turn with
`<|end|>`, which is a stop token. The template is built from token ids, not by
rendering a string and re-tokenising it: user text can never forge a marker,
and the SFT loss mask (assistant reply + its `<|end|>`) falls out for free.

Models imported from Hugging Face keep their own Jinja template
(`TokenizerInfo.chat_template == "jinja"`), rendered with jinja2.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from model.errors import HearthError
from model.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLES = ("system", "user", "assistant")
_ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class ChatFormatError(HearthError):
    """A conversation that cannot be formatted (unknown role, content not text...)."""


@dataclass
class EncodedChat:
    ids: list[int]
    loss_mask: list[int]  # 1 where the token is part of an assistant reply (incl. its <|end|>)


def message_text(message: Any, index: int) -> tuple[str, str]:
    """Validate one message; returns (role, content). Content may be a list of text parts."""
    if not isinstance(message, dict):
        raise ChatFormatError(f"messages[{index}]: expected an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ChatFormatError(f"messages[{index}].role: unknown role {role!r}, expected one of {', '.join(ROLES)}")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type", "text") == "text" else None for p in content]
        if any(not isinstance(p, str) for p in parts):
            raise ChatFormatError(f"messages[{index}].content: only text parts are supported")
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ChatFormatError(f"messages[{index}].content: expected a string or a list of text parts")
    return role, content


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Any], add_generation_prompt: bool = True) -> EncodedChat:
    """Token ids (and the assistant loss mask) for a conversation."""
    if not messages:
        raise ChatFormatError("messages: must contain at least one message")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    if tokenizer.info.chat_template == "jinja":
        return _encode_jinja(tokenizer, turns, add_generation_prompt)
    ids: list[int] = [tokenizer.bos_id] if tokenizer.adds_bos else []
    mask: list[int] = [0] * len(ids)
    newline = tokenizer.encode("\n")
    end = tokenizer.token_id(END)
    for role, content in turns:
        header = [tokenizer.token_id(_ROLE_TOKENS[role]), *newline]
        body = [*tokenizer.encode(content), end]
        is_reply = int(role == "assistant")
        ids += header + body + newline
        mask += [0] * len(header) + [is_reply] * len(body) + [0] * len(newline)
    if add_generation_prompt:
        prompt = [tokenizer.token_id(ASSISTANT), *newline]
        ids += prompt
        mask += [0] * len(prompt)
    return EncodedChat(ids, mask)


def _encode_jinja(tokenizer: Tokenizer, turns: list[tuple[str, str]], add_generation_prompt: bool) -> EncodedChat:
    if not tokenizer.info.jinja_template:
        raise ChatFormatError("this model has no chat template (a base model): use a completion, not a chat")
    text = _jinja_template(tokenizer.info.jinja_template).render(
        messages=[{"role": r, "content": c} for r, c in turns],
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.info.bos_token or "",
        eos_token=tokenizer.info.eos_token or "",
    )
    ids = tokenizer.encode(text, allow_special=True)
    return EncodedChat(ids, [0] * len(ids))


@functools.lru_cache(maxsize=8)
def _jinja_template(source: str):
    """Compile a Hugging Face chat template in the environment transformers gives it."""
    import jinja2  # only imported models use Jinja templates
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatFormatError(f"chat template: {message}")

    def tojson(value, indent=None):  # transformers' tojson: no HTML escaping
        return json.dumps(value, indent=indent, ensure_ascii=False)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatFormatError(f"chat template does not compile: {exc}") from None
