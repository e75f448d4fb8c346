"""OpenAI chat answers with tool calls: the generated text split into content and `tool_calls`.

Design choices:
- Non-streamed: the whole text goes through server/tools.py's parser;
  calls become `message.tool_calls` (ids `call_...`, arguments as JSON
  text), the text outside them `content` (null when empty), and a choice
  that stopped with calls has finish_reason "tool_calls".
- Streamed: OpenAI's delta format, per call index: the first delta carries
  id, type and name (arguments ""), later ones argument fragments, which
  concatenate to exactly the non-streamed arguments (the same parser, fed
  token by token). Text outside calls streams as content; a possible start
  of `<tool_call>` is held back until it is decided.
- Logprobs, usage and the framing are those of plain chat answers.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from starlette.responses import Response

from server.generation import AdmittedStream, collect_unless_disconnected
from server.openai_api import ResponseContext, chat_logprobs, collect_chat, event_stream_response, to_usage
from server.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessageToolCall,
    ChoiceDelta,
    FunctionCall,
)
from server.tools import ArgumentsDelta, CallStart, TextEvent, ToolCallParser, parse_tool_calls


async def tool_chat_response(request: Request, context: ResponseContext, outputs: AdmittedStream, n: int,
                             stream: bool | None, include_usage: bool) -> Response:
    if stream:
        return event_stream_response(tool_chat_chunks(context, outputs, n, include_usage), [outputs])
    answer = await collect_unless_disconnected(request, collect_tool_chat(context, outputs, n), [outputs])
    return Response(answer.model_dump_json(), media_type="application/json")


async def collect_tool_chat(context: ResponseContext, outputs: AdmittedStream, n: int) -> ChatCompletion:
    answer = await collect_chat(context, outputs, n)
    for choice in answer.choices:
        content, calls = parse_tool_calls(choice.message.content or "")
        if not calls:
            continue
        choice.message.content = content.strip() or None
        choice.message.tool_calls = [
            ChatCompletionMessageToolCall(id=call["id"], function=FunctionCall(name=call["name"], arguments=call["arguments"]))
            for call in calls
        ]
        choice.finish_reason = finish_with_calls(choice.finish_reason, True)
    return answer


def finish_with_calls(finish_reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


async def tool_chat_chunks(context: ResponseContext, outputs: AdmittedStream, n: int, include_usage: bool) -> AsyncIterator[str]:
    parsers = [ToolCallParser() for _ in range(n)]
    for index in range(n):
        role = ChatCompletionChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content=""))
        yield ChatCompletionChunk(**context.header, choices=[role]).model_dump_json()
    usage = None
    async for output in outputs:
        for delta in output.deltas:
            parser = parsers[delta.index]
            events = parser.feed(delta.text) + (parser.finish() if delta.finish_reason else [])
            choices = [ChatCompletionChunkChoice(index=delta.index, delta=event_delta(event)) for event in events]
            choices = [choice for choice in choices if choice.delta.content or choice.delta.tool_calls]
            if delta.logprobs:
                logprobs = chat_logprobs(context.pieces, delta.logprobs)
                if not choices:
                    choices = [ChatCompletionChunkChoice(index=delta.index, delta=ChoiceDelta())]
                choices[-1].logprobs = logprobs
            if delta.finish_reason:
                finish = finish_with_calls(delta.finish_reason, parser.calls > 0)
                choices.append(ChatCompletionChunkChoice(index=delta.index, delta=ChoiceDelta(), finish_reason=finish))
            for choice in choices:
                yield ChatCompletionChunk(**context.header, choices=[choice]).model_dump_json()
        usage = output.usage or usage
    if include_usage:
        yield ChatCompletionChunk(**context.header, choices=[], usage=to_usage(usage)).model_dump_json()


def event_delta(event: Any) -> ChoiceDelta:
    if isinstance(event, TextEvent):
        return ChoiceDelta(content=event.text)
    if isinstance(event, CallStart):
        call = {"index": event.index, "id": event.call_id, "type": "function", "function": {"name": event.name, "arguments": ""}}
        return ChoiceDelta(tool_calls=[call])
    if isinstance(event, ArgumentsDelta):
        return ChoiceDelta(tool_calls=[{"index": event.index, "function": {"arguments": event.fragment}}])
    return ChoiceDelta()  # CallEnd: nothing to send
