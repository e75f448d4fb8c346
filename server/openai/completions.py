"""POST /v1/completions (legacy text completions): prompts -> the serving core -> completion (chunks).

Design choices:
- A list of prompts is one engine request per prompt, admitted together and
  merged as outputs arrive; choice index = prompt index * n + choice.
- `echo` repeats the prompt text first (its own chunk when streaming).
- Streamed logprobs carry `text_offset`s that continue across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from server.core.events import ChoiceStep, UsageEvent
from server.core.http import parse_body
from server.core.serving import Generation, GenerationInput, admit, collect, serve
from server.engine.types import InvalidRequestError
from server.openai.common import ResponseContext, completion_logprobs, registry_of, respond, to_usage
from server.openai.protocol import Completion, CompletionChoice, CompletionRequest
from server.registry import ServedModel

COMPLETION_FIELD_NAMES = {"max_tokens": "max_tokens"}


@dataclass
class PromptInput:
    """One prompt of a completions request, tokenized."""

    text: str  # what `echo` repeats
    token_ids: list[int]


def tokenize_prompts(body: CompletionRequest, served: ServedModel) -> list[PromptInput]:
    inputs = [tokenize_prompt(prompt, index, served) for index, prompt in enumerate(body.prompts())]
    if any(not p.token_ids for p in inputs):
        raise InvalidRequestError("prompt", "prompt must not be empty")
    return inputs


def tokenize_prompt(prompt: str | list[int], index: int, served: ServedModel) -> PromptInput:
    tokenizer = served.tokenizer
    if isinstance(prompt, str):
        return PromptInput(prompt, tokenizer.encode(prompt, add_bos=True))
    bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
    if not prompt or bad:
        problem = "is empty" if not prompt else f"has token id {bad[0]} outside [0, {tokenizer.vocab_size})"
        raise InvalidRequestError("prompt", f"prompt[{index}] {problem}")
    return PromptInput(tokenizer.decode(prompt), list(prompt))


async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    prompts = tokenize_prompts(body, served)
    job = GenerationInput([p.token_ids for p in prompts], body.sampling_fields(), body.grammar_spec(), prompt_field="prompt")
    context = ResponseContext.create("cmpl", served)
    generation = await admit(served, job, context.response_id, COMPLETION_FIELD_NAMES)
    echoes = [p.text if body.echo else "" for p in prompts]
    return await respond(request, generation, body.stream, lambda: completion_chunks(context, generation, echoes, body.include_usage),
                         lambda: completion_answer(context, generation, echoes))


async def completion_answer(context: ResponseContext, generation: Generation, echoes: list[str]) -> Completion:
    results, usage = await collect(serve(generation))
    choices = [
        CompletionChoice(index=index, text=echoes[index // generation.n] + result.text,
                         logprobs=completion_logprobs(result.logprobs, 0) if result.logprobs else None,
                         finish_reason=result.finish_reason)
        for index, result in sorted(results.items())
    ]
    return Completion(**context.header, choices=choices, usage=to_usage(usage))


async def completion_chunks(context: ResponseContext, generation: Generation, echoes: list[str], include_usage: bool) -> AsyncIterator[str]:
    for index in range(generation.num_choices):
        if echoes[index // generation.n]:
            yield Completion(**context.header, choices=[CompletionChoice(index=index, text=echoes[index // generation.n])]).model_dump_json()
    offsets: dict[int, int] = {}  # choice -> text_offset of its next logprob
    async for event in serve(generation):
        if isinstance(event, UsageEvent):
            if include_usage:
                yield Completion(**context.header, choices=[], usage=to_usage(event.usage)).model_dump_json()
        elif event.text or event.finish or event.logprobs:
            yield Completion(**context.header, choices=[step_choice(event, offsets)]).model_dump_json()


def step_choice(step: ChoiceStep, offsets: dict[int, int]) -> CompletionChoice:
    logprobs = None
    if step.logprobs:
        logprobs = completion_logprobs(step.logprobs, offsets.get(step.choice, 0))
        offsets[step.choice] = offsets.get(step.choice, 0) + sum(len(token) for token in logprobs.tokens)
    finish_reason = step.finish.reason if step.finish else None
    return CompletionChoice(index=step.choice, text=step.text, logprobs=logprobs, finish_reason=finish_reason)
