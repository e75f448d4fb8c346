"""The chat template, defined once and used by the trainer (SFT) and the server.

Hearth's own template, token by token:

    <|bos|><|system|>\n{system}<|end|>\n<|user|>\n{user}<|end|>\n<|assistant|>\n{reply}<|end|>\n ...

A generation prompt ends with `<|assistant|>\n`; the model ends its turn with
`<|end|>`, which is a stop token. The template is built from token ids, not by
rendering a string and re-tokenising it: user text can never forge a marker,
and the SFT loss mask (assistant reply + its `<|end|>`) falls out for free.

Models imported from Hugging Face keep their own Jinja template
(`TokenizerInfo.chat_template == "jinja"`), rendered with jinja2; it gets the
messages (with `tool_calls`, `tool_call_id`) and `tools` as transformers
passes them, call arguments as objects.

Tools in Hearth's template (the ChatML/Hermes convention, without newlines
inside the tags, as the server's tool grammar generates them): the system
turn gets a "# Tools" section listing each tool's JSON in `<tools></tools>`;
an assistant turn's calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
after its text; a `tool` message is a user turn `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from model.errors import HearthError
from model.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
_ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class ChatFormatError(HearthError):
    """A conversation that cannot be formatted (unknown role, content not text...).

    `field` is the offending part of the request ("messages[2].role"); None: the conversation as a whole.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class EncodedChat:
    ids: list[int]
    loss_mask: list[int]  # 1 where the token is part of an assistant reply (incl. its <|end|>)


def message_text(message: Any, index: int) -> tuple[str, str]:
    """Validate one message; returns (role, content). Content may be a list of text parts."""
    if not isinstance(message, dict):
        raise ChatFormatError(f"messages[{index}]: expected an object with 'role' and 'content'", f"messages[{index}]")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ChatFormatError(f"messages[{index}].role: unknown role {role!r}, expected one of {', '.join(ROLES)}", f"messages[{index}].role")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type", "text") == "text" else None for p in content]
        if any(not isinstance(p, str) for p in parts):
            raise ChatFormatError(f"messages[{index}].content: only text parts are supported", f"messages[{index}].content")
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ChatFormatError(f"messages[{index}].content: expected a string or a list of text parts", f"messages[{index}].content")
    return role, content


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Any], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> EncodedChat:
    """Token ids (and the assistant loss mask) for a conversation; tools in OpenAI's
    {"type": "function", "function": {...}} shape are rendered by the template."""
    if not messages:
        raise ChatFormatError("messages: must contain at least one message", "messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    if tokenizer.info.chat_template == "jinja":
        return _encode_jinja(tokenizer, _jinja_messages(messages, turns), add_generation_prompt, tools)
    turns = _with_tools(_hearth_turns(messages, turns), tools)
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


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>{{\"name\": <function-name>, \"arguments\": <args-json-object>}}</tool_call>"
)


def tool_call_text(call: Any, where: str) -> str:
    """One call (OpenAI's {"function": {"name", "arguments": JSON text}} or Ollama's, arguments an object)
    as the template writes it."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ChatFormatError(f"{where}: a tool call needs function.name", where)
    body = {"name": function["name"], "arguments": call_arguments(function.get("arguments"), where)}
    return TOOL_CALL_OPEN + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + TOOL_CALL_CLOSE


def call_arguments(arguments: Any, where: str) -> dict:
    if arguments in (None, ""):
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ChatFormatError(f"{where}.function.arguments: not valid JSON", f"{where}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise ChatFormatError(f"{where}.function.arguments: must be a JSON object", f"{where}.function.arguments")
    return arguments


def _hearth_turns(messages: Sequence[Any], turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Tool calls appended to their assistant turn; tool results as user turns."""
    result = []
    for index, (message, (role, content)) in enumerate(zip(messages, turns)):
        if role == "tool":
            result.append(("user", f"<tool_response>{content}</tool_response>"))
            continue
        calls = (message.get("tool_calls") or []) if role == "assistant" else []
        where = f"messages[{index}].tool_calls"
        result.append((role, content + "".join(tool_call_text(c, f"{where}[{i}]") for i, c in enumerate(calls))))
    return result


def _with_tools(turns: list[tuple[str, str]], tools: list[dict] | None) -> list[tuple[str, str]]:
    if not tools:
        return turns
    section = TOOLS_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if turns and turns[0][0] == "system":
        return [("system", f"{turns[0][1]}\n\n{section}"), *turns[1:]]
    return [("system", section), *turns]


def _jinja_messages(messages: Sequence[Any], turns: list[tuple[str, str]]) -> list[dict]:
    """Messages as transformers hands them to a template: call arguments as objects."""
    result = []
    for index, (message, (role, content)) in enumerate(zip(messages, turns)):
        rendered = {"role": role, "content": content}
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                rendered[key] = message[key]
        if role == "assistant" and message.get("tool_calls"):
            rendered["tool_calls"] = [_jinja_call(call, f"messages[{index}].tool_calls[{i}]")
                                      for i, call in enumerate(message["tool_calls"])]
        result.append(rendered)
    return result


def _jinja_call(call: Any, where: str) -> dict:
    body = json.loads(tool_call_text(call, where)[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)])
    return {"id": call.get("id"), "type": "function", "function": body}


def _encode_jinja(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool,
                  tools: list[dict] | None = None) -> EncodedChat:
    if not tokenizer.info.jinja_template:
        raise ChatFormatError("this model has no chat template (a base model): use a completion, not a chat")
    text = _jinja_template(tokenizer.info.jinja_template).render(
        messages=messages,
        tools=tools,
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
