"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Design choices:
- A route does four things in order: parse and check the body
  (openai_protocol), resolve the model (registry), turn messages or prompts
  into token ids and `SamplingParams`, then either stream chunks or collect
  one answer. Every failure on the way is an exception mapped to a status by
  http_errors, so the happy path reads straight through.
- A list of prompts (completions) is one engine request per prompt, merged
  as outputs arrive; choice index = prompt index * n + choice.
- Streaming follows OpenAI's framing exactly: `data: {chunk}\\n\\n` frames,
  the first chunk of each choice carries the role, the last its
  finish_reason, an optional usage chunk with empty choices, then
  `data: [DONE]`. An engine failure mid-stream is sent as an error frame
  (what the openai SDK raises on), without [DONE].
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from model.chat import encode_chat
from server.engine.types import InvalidRequestError, RequestOutput, TokenLogprob, Usage
from server.generation import (
    SSE_HEADERS,
    AdmittedStream,
    CancellingStreamingResponse,
    ChoiceState,
    TokenPieces,
    add_usage,
    collect_unless_disconnected,
    check_context,
    check_params,
    merge_streams,
    new_id,
    parse_body,
    remaining_context,
    start_all,
    start_generation,
)
from server.http_errors import to_api_error
from server.openai_protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    ChoiceDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TopLogprob,
)
from server.registry import ModelRegistry, ServedModel
from server.structured import attach_grammar
from server.tools import tool_grammar_spec

router = APIRouter(prefix="/v1", tags=["openai"])

# Engine parameter name -> the request field a user set.
CHAT_PARAM_NAMES = {"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs"}
COMPLETION_PARAM_NAMES = {"max_tokens": "max_tokens"}


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


@dataclass
class ResponseContext:
    """What every chunk or answer of one response repeats."""

    response_id: str
    created: int
    served: ServedModel
    pieces: TokenPieces

    @classmethod
    def create(cls, prefix: str, served: ServedModel) -> "ResponseContext":
        return cls(new_id(prefix), int(time.time()), served, served.token_pieces)

    @property
    def header(self) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "created": self.created,
            "model": self.served.model_id,
            "system_fingerprint": self.served.system_fingerprint,
        }


def to_usage(usage: Usage | None) -> CompletionUsage | None:
    if usage is None:
        return None
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def sse_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frame the chunks, end with [DONE]; an engine failure becomes an error frame."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except Exception as exc:  # mid-stream: the status line is long gone, report in-band
        yield sse(json.dumps(to_api_error(exc).openai_body()))
        return
    yield sse("[DONE]")


def event_stream_response(chunks: AsyncIterator[str], streams: list[AdmittedStream]) -> Response:
    return CancellingStreamingResponse(sse_stream(chunks), streams=streams, media_type="text/event-stream", headers=SSE_HEADERS)


# ------------------------------------------------------------------ models


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(served) for served in registry_of(request).listed()])  # loaded or not


@router.get("/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return model_card(registry_of(request).describe(model_id))


def model_card(served: ServedModel) -> ModelCard:
    engine = getattr(served, "engine", None)  # None: not loaded (facts from config.json, server/registry.py)
    return ModelCard(id=served.model_id, created=served.created, max_model_len=served.max_seq_len or None,
                     compute=engine.compute() if hasattr(engine, "compute") else None)


# -------------------------------------------------------------------- chat


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    tools = body.tool_config()
    prompt_ids = encode_chat(served.tokenizer, body.template_messages(), tools=tools and tools.template_tools()).ids
    params = body.to_sampling_params(remaining_context(len(prompt_ids), served.max_seq_len))
    check_params(params, served.tokenizer.vocab_size, CHAT_PARAM_NAMES)
    spec = await tool_grammar_spec(served.engine, tools) if tools else body.grammar_spec()
    await attach_grammar(params, served.engine, spec)
    check_context(len(prompt_ids), params, served.max_seq_len, "messages")
    context = ResponseContext.create("chatcmpl", served)
    outputs = await start_generation(served.engine, context.response_id, prompt_ids, params)
    if tools:  # text and tool calls parsed out of the answer (server/openai_tools.py)
        from server.openai_tools import tool_chat_response

        return await tool_chat_response(request, context, outputs, params.n, body.stream, body.include_usage)
    if body.stream:
        return event_stream_response(chat_chunks(context, outputs, params.n, body.include_usage), [outputs])
    answer = await collect_unless_disconnected(request, collect_chat(context, outputs, params.n), [outputs])
    return Response(answer.model_dump_json(), media_type="application/json")


async def collect_chat(context: ResponseContext, outputs: AdmittedStream, n: int) -> ChatCompletion:
    choices, usage = await collect_choices(merge_streams([outputs]), n)
    return ChatCompletion(
        **context.header,
        choices=[
            ChatCompletionChoice(
                index=index,
                message=ChatCompletionMessage(content=state.text),
                logprobs=chat_logprobs(context.pieces, state.logprobs) if state.logprobs else None,
                finish_reason=state.finish_reason,
            )
            for index, state in sorted(choices.items())
        ],
        usage=to_usage(usage),
    )


async def chat_chunks(context: ResponseContext, outputs: AdmittedStream, n: int, include_usage: bool) -> AsyncIterator[str]:
    for index in range(n):  # the first chunk of each choice carries the role
        role = ChatCompletionChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content=""))
        yield ChatCompletionChunk(**context.header, choices=[role]).model_dump_json()
    usage = None
    async for output in outputs:
        for delta in output.deltas:
            if not (delta.text or delta.finish_reason or delta.logprobs):
                continue
            choice = ChatCompletionChunkChoice(
                index=delta.index,
                delta=ChoiceDelta(content=delta.text),
                logprobs=chat_logprobs(context.pieces, delta.logprobs) if delta.logprobs else None,
                finish_reason=delta.finish_reason,
            )
            yield ChatCompletionChunk(**context.header, choices=[choice]).model_dump_json()
        usage = output.usage or usage
    if include_usage:
        yield ChatCompletionChunk(**context.header, choices=[], usage=to_usage(usage)).model_dump_json()


def chat_logprobs(pieces: TokenPieces, logprobs: list[TokenLogprob]) -> ChoiceLogprobs:
    content = []
    for entry in logprobs:
        text, raw = pieces.piece(entry.token_id)
        top = [TopLogprob(token=pieces.piece(t)[0], logprob=lp, bytes=pieces.piece(t)[1]) for t, lp in entry.top]
        content.append(ChatCompletionTokenLogprob(token=text, logprob=entry.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


async def collect_choices(merged: AsyncIterator[tuple[int, RequestOutput]], n: int) -> tuple[dict[int, ChoiceState], Usage | None]:
    """Accumulate every delta of every choice; usage summed over the engine requests."""
    choices: dict[int, ChoiceState] = {}
    usage = None
    async for prompt_index, output in merged:
        for delta in output.deltas:
            choices.setdefault(prompt_index * n + delta.index, ChoiceState()).add(delta)
        usage = add_usage(usage, output.usage)
    return choices, usage


# ------------------------------------------------------------- completions


@dataclass
class PromptInput:
    """One prompt of a completions request, tokenized."""

    text: str  # what `echo` repeats
    token_ids: list[int]


def tokenize_prompts(body: CompletionRequest, served: ServedModel) -> list[PromptInput]:
    tokenizer = served.tokenizer
    inputs = []
    for index, prompt in enumerate(body.prompts()):
        if isinstance(prompt, str):
            inputs.append(PromptInput(prompt, tokenizer.encode(prompt, add_bos=True)))
            continue
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if not prompt or bad:
            problem = "is empty" if not prompt else f"has token id {bad[0]} outside [0, {tokenizer.vocab_size})"
            raise InvalidRequestError("prompt", f"prompt[{index}] {problem}")
        inputs.append(PromptInput(tokenizer.decode(prompt), list(prompt)))
    if any(not p.token_ids for p in inputs):
        raise InvalidRequestError("prompt", "prompt must not be empty")
    return inputs


@router.post("/completions")
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    prompts = tokenize_prompts(body, served)
    context = ResponseContext.create("cmpl", served)
    jobs = []
    for index, prompt in enumerate(prompts):
        params = body.to_sampling_params(remaining_context(len(prompt.token_ids), served.max_seq_len))
        check_params(params, served.tokenizer.vocab_size, COMPLETION_PARAM_NAMES)
        check_context(len(prompt.token_ids), params, served.max_seq_len, "prompt")
        request_id = context.response_id if len(prompts) == 1 else f"{context.response_id}-{index}"
        jobs.append((request_id, prompt.token_ids, params))
    await attach_grammar([params for _, _, params in jobs], served.engine, body.grammar_spec())
    streams = await start_all(served.engine, jobs)
    n = body.n or 1
    echoes = [p.text if body.echo else "" for p in prompts]
    if body.stream:
        return event_stream_response(completion_chunks(context, streams, n, echoes, body.include_usage), streams)
    answer = await collect_unless_disconnected(request, collect_completion(context, streams, n, echoes), streams)
    return Response(answer.model_dump_json(), media_type="application/json")


async def collect_completion(context: ResponseContext, streams: list[AdmittedStream], n: int, echoes: list[str]) -> Completion:
    choices, usage = await collect_choices(merge_streams(streams), n)
    return Completion(
        **context.header,
        choices=[
            CompletionChoice(
                index=index,
                text=echoes[index // n] + state.text,
                logprobs=completion_logprobs(context.pieces, state.logprobs, 0) if state.logprobs else None,
                finish_reason=state.finish_reason,
            )
            for index, state in sorted(choices.items())
        ],
        usage=to_usage(usage),
    )


async def completion_chunks(context: ResponseContext, streams: list[AdmittedStream], n: int, echoes: list[str], include_usage: bool) -> AsyncIterator[str]:
    for prompt_index, echo in enumerate(echoes):
        for choice in range(n):
            if echo:
                yield Completion(**context.header, choices=[CompletionChoice(index=prompt_index * n + choice, text=echo)]).model_dump_json()
    usage, offsets = None, {}
    async for prompt_index, output in merge_streams(streams):
        for delta in output.deltas:
            index = prompt_index * n + delta.index
            logprobs = None
            if delta.logprobs:
                logprobs = completion_logprobs(context.pieces, delta.logprobs, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(piece) for piece in logprobs.tokens)
            if delta.text or delta.finish_reason or logprobs:
                choice = CompletionChoice(index=index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason)
                yield Completion(**context.header, choices=[choice]).model_dump_json()
        usage = add_usage(usage, output.usage)
    if include_usage:
        yield Completion(**context.header, choices=[], usage=to_usage(usage)).model_dump_json()


def completion_logprobs(pieces: TokenPieces, logprobs: list[TokenLogprob], start_offset: int) -> CompletionLogprobs:
    """The legacy completions layout: parallel lists, alternatives as {token text: logprob}."""
    result = CompletionLogprobs()
    offset = start_offset
    for entry in logprobs:
        text = pieces.piece(entry.token_id)[0]
        result.tokens.append(text)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({pieces.piece(t)[0]: lp for t, lp in entry.top})
        result.text_offset.append(offset)
        offset += len(text)
    return result
