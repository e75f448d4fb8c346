"""Admission, `serve()` and `collect()`: one path from a parsed request to API-neutral events.

    generation = await admit(served, GenerationInput([ids], {"temperature": 0}), "chatcmpl-1", FIELDS)
    async for event in serve(generation): ...          # ChoiceStep ..., UsageEvent
    results, usage = await collect(serve(generation))  # whole answers: {choice: ChoiceResult}

Design choices:
- `admit` is every route's admission, in one order: SamplingParams (validated
  by its constructor; `max_tokens` None = the rest of the context), the
  grammar (a tool choice's, or `grammar`), the context check against the
  API's limit (Ollama's num_ctx may lower it), then the engine. Every
  InvalidRequestError on the way is renamed to the API's field names.
- Tool calls are parsed by server/tools.py's incremental parser, one per
  choice, fed step by step; without tools the text is passed through as is.
- `collect` folds the very events a stream sends, so the text deltas of a
  stream concatenate to the whole answer's text and the argument deltas to
  its tool calls' arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Iterator, Mapping

from server.core.events import ChoiceStep, Event, Finish, Logprob, Part, UsageEvent
from server.core.pieces import TokenPieces, convert_logprobs
from server.core.streams import AdmittedStream, add_usage, merge_streams, start_all
from server.engine.grammar import GrammarSpec
from server.engine.types import CompletionDelta, ContextOverflowError, InvalidRequestError, SamplingParams, Usage
from server.tools import CallEnd, TextEvent, ToolCallParser, ToolConfig, tool_grammar_spec


@dataclass(frozen=True)
class GenerationInput:
    """One request as an API adapter parsed it, in engine terms."""

    prompts: list[list[int]]  # token ids: one engine request per prompt (completions may send several)
    sampling: Mapping[str, Any]  # SamplingParams fields; max_tokens None (or absent): the rest of the context
    grammar: GrammarSpec | None = None  # the output constraint (structured outputs)
    tools: ToolConfig | None = None  # callable tools: their grammar, and calls parsed out of the text
    context_limit: int | None = None  # None: the model's own
    prompt_field: str = "messages"  # the request field holding the prompt (context errors name it)


@dataclass
class Generation:
    """An admitted request: its engine streams and how to read them."""

    streams: list[AdmittedStream]
    n: int  # choices per prompt
    pieces: TokenPieces
    tools: ToolConfig | None = None

    @property
    def num_choices(self) -> int:
        return len(self.streams) * self.n


@contextmanager
def api_field_names(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise InvalidRequestErrors under the API's field names (engine field -> request field)."""
    try:
        yield
    except InvalidRequestError as exc:
        renamed = exc.renamed(names)
        if renamed is exc:
            raise
        raise renamed from None


async def admit(served: Any, job: GenerationInput, request_id: str, names: Mapping[str, str]) -> Generation:
    """Validate, compile the grammar, check the context, submit: errors raise here, renamed."""
    limit = job.context_limit or served.max_seq_len
    with api_field_names(names):
        params = [sampling_params(job.sampling, len(prompt), limit) for prompt in job.prompts]
        grammar = await compile_constraint(served.engine, job)
        params = [replace(each, grammar=grammar) for each in params] if grammar is not None else params
        for prompt, each in zip(job.prompts, params):
            check_context(len(prompt), each, limit, job.prompt_field)
        ids = [request_id] if len(job.prompts) == 1 else [f"{request_id}-{i}" for i in range(len(job.prompts))]
        streams = await start_all(served.engine, list(zip(ids, job.prompts, params)))
    return Generation(streams, params[0].n, served.token_pieces, job.tools)


def sampling_params(fields: Mapping[str, Any], prompt_tokens: int, limit: int) -> SamplingParams:
    max_tokens = fields.get("max_tokens")
    return SamplingParams(**{**fields, "max_tokens": remaining_context(prompt_tokens, limit) if max_tokens is None else max_tokens})


def remaining_context(prompt_tokens: int, context_limit: int) -> int:
    """Default max_tokens: whatever context is left (at least 1, so a full prompt is an overflow, not a bad max_tokens)."""
    return max(1, context_limit - prompt_tokens)


async def compile_constraint(engine: Any, job: GenerationInput) -> Any:
    """The compiled grammar of the tools or of `job.grammar` (None: unconstrained)."""
    spec = await tool_grammar_spec(engine, job.tools) if job.tools else job.grammar
    return None if spec is None else await engine.grammars.compile_async(spec)


def check_context(prompt_tokens: int, params: SamplingParams, limit: int, param: str) -> None:
    """Refuse prompt + max_tokens beyond the context, naming the limit and the count."""
    if prompt_tokens + params.max_tokens > limit:
        error = ContextOverflowError(limit, prompt_tokens + params.max_tokens, prompt_tokens)
        error.param = param
        raise error


# ------------------------------------------------------------------ engine outputs -> events


class ChoiceParser:
    """One choice's engine deltas -> ChoiceSteps (tool calls parsed out when there are tools)."""

    def __init__(self, choice: int, pieces: TokenPieces, tools: bool):
        self.choice, self.pieces = choice, pieces
        self.parser = ToolCallParser() if tools else None

    def step(self, delta: CompletionDelta) -> ChoiceStep:
        logprobs = convert_logprobs(self.pieces, delta.logprobs) if delta.logprobs else None
        finish = self.finish(delta.finish_reason) if delta.finish_reason else None
        return ChoiceStep(self.choice, delta.text, self.parts(delta), tuple(delta.token_ids), logprobs, finish)

    def parts(self, delta: CompletionDelta) -> tuple[Part, ...]:
        if self.parser is None:
            return (TextEvent(delta.text),) if delta.text else ()
        events = self.parser.feed(delta.text) + (self.parser.finish() if delta.finish_reason else [])
        return tuple(events)

    def finish(self, reason: str) -> Finish:
        if self.parser is None:
            return Finish(reason)
        return Finish(reason, self.parser.calls, self.parser.unfinished)


async def serve(generation: Generation) -> AsyncIterator[Event]:
    """Every event of a generation: the choices' steps as they come, then one UsageEvent."""
    parsers: dict[int, ChoiceParser] = {}
    usage = None
    async for prompt_index, output in merge_streams(generation.streams):
        for delta in output.deltas:
            choice = prompt_index * generation.n + delta.index
            if choice not in parsers:
                parsers[choice] = ChoiceParser(choice, generation.pieces, generation.tools is not None)
            yield parsers[choice].step(delta)
        usage = add_usage(usage, output.usage)
    yield UsageEvent(usage)


# ------------------------------------------------------------------ events -> whole answers


@dataclass
class ChoiceResult:
    """One choice, whole."""

    text: str = ""  # the raw generated text (stop strings excluded)
    content: str = ""  # the text outside complete tool calls (a call cut off stays as text)
    calls: list[dict[str, str]] = field(default_factory=list)  # complete calls: {"id", "name", "arguments"}
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish: Finish | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.finish.reason if self.finish else None

    def add(self, step: ChoiceStep) -> None:
        self.text += step.text
        self.content += "".join(part.text for part in step.parts if isinstance(part, TextEvent))
        self.calls += [call_of(part) for part in step.parts if isinstance(part, CallEnd)]
        self.token_ids += step.token_ids
        self.logprobs += step.logprobs or ()
        self.finish = step.finish or self.finish
        self.content += step.finish.leftover if step.finish else ""


def call_of(end: CallEnd) -> dict[str, str]:
    return {"id": end.call_id, "name": end.name, "arguments": end.arguments}


async def collect(events: AsyncIterator[Event]) -> tuple[dict[int, ChoiceResult], Usage | None]:
    """Fold a generation's events into whole choices (by index) and its usage."""
    results: dict[int, ChoiceResult] = {}
    usage = None
    async for event in events:
        if isinstance(event, UsageEvent):
            usage = event.usage
        else:
            results.setdefault(event.choice, ChoiceResult()).add(event)
    return results, usage
