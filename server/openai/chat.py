"""POST /v1/chat/completions: messages -> the serving core -> chat completion (chunks).

Design choices:
- The route parses (template messages and tools -> prompt ids, request ->
  SamplingParams fields, output constraint), admits through the core, then
  renders its events; nothing else.
- Streamed: the first chunk of each choice carries the role, the last its
  finish_reason. Without tools, each engine step is one chunk (content,
  logprobs, finish_reason together). With tools, OpenAI's tool-call delta
  format, per call index: the first delta carries id, type and name
  (arguments ""), later ones argument fragments, which concatenate to
  exactly the non-streamed arguments; logprobs ride on the step's last chunk,
  the finish on a chunk of its own.
- Whole: calls become `message.tool_calls`, the text outside them `content`
  (null when empty); a choice that stopped with calls has finish_reason
  "tool_calls". A call cut off by max_tokens is not a call (its raw text
  stays in the content, finish_reason "length").
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from starlette.responses import Response

from model.chat import encode_chat
from server.core.events import ChoiceStep, UsageEvent
from server.core.http import parse_body
from server.core.serving import ChoiceResult, Generation, GenerationInput, admit, collect, serve
from server.openai.common import ResponseContext, chat_logprobs, registry_of, respond, to_usage
from server.openai.protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChoiceDelta,
    FunctionCall,
)
from server.registry import ServedModel
from server.tools import ArgumentsDelta, CallStart, TextEvent

# Engine field -> the request field a user set.
CHAT_FIELD_NAMES = {"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs"}


def chat_input(body: ChatCompletionRequest, served: ServedModel) -> GenerationInput:
    tools = body.tool_config()
    prompt_ids = encode_chat(served.tokenizer, body.template_messages(), tools=tools and tools.template_tools()).ids
    return GenerationInput([prompt_ids], body.sampling_fields(), None if tools else body.grammar_spec(), tools)


async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    job = chat_input(body, served)
    context = ResponseContext.create("chatcmpl", served)
    generation = await admit(served, job, context.response_id, CHAT_FIELD_NAMES)
    return await respond(request, generation, body.stream,
                         lambda: chat_chunks(context, generation, body.include_usage), lambda: chat_answer(context, generation))


# ------------------------------------------------------------------ whole answers


async def chat_answer(context: ResponseContext, generation: Generation) -> ChatCompletion:
    results, usage = await collect(serve(generation))
    choices = [chat_choice(index, result) for index, result in sorted(results.items())]
    return ChatCompletion(**context.header, choices=choices, usage=to_usage(usage))


def chat_choice(index: int, result: ChoiceResult) -> ChatCompletionChoice:
    message = ChatCompletionMessage(content=result.text)
    if result.calls:
        tool_calls = [ChatCompletionMessageToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                      for c in result.calls]
        message = ChatCompletionMessage(content=result.content.strip() or None, tool_calls=tool_calls)
    logprobs = chat_logprobs(result.logprobs) if result.logprobs else None
    finish_reason = finish_with_calls(result.finish_reason, bool(result.calls))
    return ChatCompletionChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason)


def finish_with_calls(finish_reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


# ------------------------------------------------------------------ chunks


async def chat_chunks(context: ResponseContext, generation: Generation, include_usage: bool) -> AsyncIterator[str]:
    for index in range(generation.num_choices):  # the first chunk of each choice carries the role
        role = ChatCompletionChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content=""))
        yield ChatCompletionChunk(**context.header, choices=[role]).model_dump_json()
    render = tool_step_choices if generation.tools else text_step_choices
    async for event in serve(generation):
        if isinstance(event, UsageEvent):
            if include_usage:
                yield ChatCompletionChunk(**context.header, choices=[], usage=to_usage(event.usage)).model_dump_json()
            continue
        for choice in render(event):
            yield ChatCompletionChunk(**context.header, choices=[choice]).model_dump_json()


def text_step_choices(step: ChoiceStep) -> list[ChatCompletionChunkChoice]:
    """One chunk per step: its text, logprobs and finish together."""
    if not (step.text or step.finish or step.logprobs):
        return []
    logprobs = chat_logprobs(step.logprobs) if step.logprobs else None
    finish_reason = step.finish.reason if step.finish else None
    return [ChatCompletionChunkChoice(index=step.choice, delta=ChoiceDelta(content=step.text), logprobs=logprobs, finish_reason=finish_reason)]


def tool_step_choices(step: ChoiceStep) -> list[ChatCompletionChunkChoice]:
    """One chunk per text or tool-call delta; logprobs on the last; the finish on its own."""
    choices = [ChatCompletionChunkChoice(index=step.choice, delta=part_delta(part)) for part in step.parts]
    choices = [choice for choice in choices if choice.delta.content or choice.delta.tool_calls]
    if step.logprobs:
        if not choices:
            choices = [ChatCompletionChunkChoice(index=step.choice, delta=ChoiceDelta())]
        choices[-1].logprobs = chat_logprobs(step.logprobs)
    if step.finish:
        finish_reason = finish_with_calls(step.finish.reason, step.finish.tool_calls > 0)
        choices.append(ChatCompletionChunkChoice(index=step.choice, delta=ChoiceDelta(), finish_reason=finish_reason))
    return choices


def part_delta(part: Any) -> ChoiceDelta:
    if isinstance(part, TextEvent):
        return ChoiceDelta(content=part.text)
    if isinstance(part, CallStart):
        call = {"index": part.index, "id": part.call_id, "type": "function", "function": {"name": part.name, "arguments": ""}}
        return ChoiceDelta(tool_calls=[call])
    if isinstance(part, ArgumentsDelta):
        return ChoiceDelta(tool_calls=[{"index": part.index, "function": {"arguments": part.fragment}}])
    return ChoiceDelta()  # CallEnd: nothing to send
