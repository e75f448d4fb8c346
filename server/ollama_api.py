"""Ollama-compatible routes: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Design choices:
- Streaming is the default, as in Ollama: one JSON object per line
  (`application/x-ndjson`); `"stream": false` gives one object. The final
  object has done true, done_reason and the timings in nanoseconds.
- /api/generate applies the chat template to the prompt (as Ollama applies
  the model's template) unless `raw` is true; `context` from a previous
  answer is prepended, and the final object returns the new context.
- A request with no prompt (or no messages) only "loads" the model, as
  Ollama's clients use it to warm a model: done at once, done_reason "load".
- Model names may carry Ollama's default tag: "default:latest" is "default".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from model.chat import encode_chat
from server.engine.types import InvalidRequestError, SamplingParams, TokenLogprob, Usage
from server.generation import (
    AdmittedStream,
    CancellingStreamingResponse,
    ChoiceState,
    TokenPieces,
    collect_unless_disconnected,
    check_context,
    check_params,
    parse_body,
    remaining_context,
    new_id,
    start_generation,
)
from server.http_errors import to_api_error
from server.ollama_protocol import (
    OLLAMA_PARAM_NAMES,
    ChatRequest,
    ChatResponse,
    GenerateRequest,
    GenerateResponse,
    ListedModel,
    ListResponse,
    Logprob,
    ModelDetails,
    Options,
    ProcessResponse,
    ResponseMessage,
    RunningModel,
    ShowRequest,
    ShowResponse,
    TokenLogprob as OllamaTokenLogprob,
    VersionResponse,
    now_rfc3339,
)
from server.registry import ModelRegistry, ServedModel, request_load_seconds
from server.structured import attach_grammar
from server.tools import tool_grammar_spec, with_tool_calls

router = APIRouter(prefix="/api", tags=["ollama"])

# Clients gate features on the version they see; report the Ollama release whose API this mirrors.
OLLAMA_COMPATIBLE_VERSION = "0.12.0"
NEVER_EXPIRES = "9999-12-31T23:59:59Z"  # /api/ps for a model that stays loaded (keep_alive -1, --model)
NDJSON = "application/x-ndjson"


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


@dataclass
class GenerationJob:
    """One admitted Ollama generation and what its answer objects repeat."""

    model_name: str  # as the client spelled it (echoed back, like Ollama)
    served: ServedModel
    prompt_ids: list[int]
    params: SamplingParams
    started: float  # perf_counter at arrival, for total_duration


def prepare_job(request_name: str, served: ServedModel, prompt_ids: list[int], body: Any, started: float) -> GenerationJob:
    options = body.options or Options()
    limit = options.context_limit(served.max_seq_len)
    params = body.sampling_params(remaining_context(len(prompt_ids), limit))
    check_params(params, served.tokenizer.vocab_size, OLLAMA_PARAM_NAMES)
    check_context(len(prompt_ids), params, limit, "prompt")
    return GenerationJob(request_name, served, prompt_ids, params, started)


def to_ns(seconds: float) -> int:
    return int(seconds * 1e9)


def timings(job: GenerationJob, usage: Usage | None) -> dict[str, int]:
    """The final object's statistics, in nanoseconds."""
    usage = usage or Usage(len(job.prompt_ids), 0, 0, 0.0, 0.0, 0.0)
    return {
        "total_duration": to_ns(time.perf_counter() - job.started + request_load_seconds()),
        "load_duration": to_ns(request_load_seconds()),  # waiting for the model to load (server/registry.py)
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": to_ns(usage.prefill_time),
        "eval_count": usage.completion_tokens,
        "eval_duration": to_ns(usage.decode_time),
    }


def ollama_logprobs(pieces: TokenPieces, logprobs: list[TokenLogprob] | None) -> list[Logprob] | None:
    if not logprobs:
        return None
    result = []
    for entry in logprobs:
        text, raw = pieces.piece(entry.token_id)
        top = [OllamaTokenLogprob(token=pieces.piece(t)[0], logprob=lp, bytes=pieces.piece(t)[1]) for t, lp in entry.top]
        result.append(Logprob(token=text, logprob=entry.logprob, bytes=raw, top_logprobs=top))
    return result


def ndjson_line(item: Any) -> str:
    return item.model_dump_json(exclude_none=True) + "\n"


async def ndjson_stream(objects: AsyncIterator[Any]) -> AsyncIterator[str]:
    try:
        async for item in objects:
            yield ndjson_line(item)
    except Exception as exc:  # mid-stream: report in-band, as Ollama does
        yield json.dumps(to_api_error(exc).ollama_body()) + "\n"


def ndjson_response(objects: AsyncIterator[Any], streams: list[AdmittedStream]) -> Response:
    return CancellingStreamingResponse(ndjson_stream(objects), streams=streams, media_type=NDJSON)


def json_response(item: Any) -> Response:
    return Response(item.model_dump_json(exclude_none=True), media_type="application/json")


async def answer(request: Request, job: GenerationJob, stream: bool, make_object) -> Response:
    """Run a job; `make_object(text, logprobs, final)` builds each answer object."""
    outputs = await start_generation(job.served.engine, new_id("ollama"), job.prompt_ids, job.params)
    if stream:
        return ndjson_response(streamed_objects(job, outputs, make_object), [outputs])
    return json_response(await collect_unless_disconnected(request, collected_object(job, outputs, make_object), [outputs]))


async def streamed_objects(job: GenerationJob, outputs: AdmittedStream, make_object) -> AsyncIterator[Any]:
    generated: list[int] = []
    usage, finish_reason = None, None
    async for output in outputs:
        for delta in output.deltas:
            generated += delta.token_ids
            finish_reason = delta.finish_reason or finish_reason
            if delta.text or delta.logprobs:
                yield make_object(delta.text, ollama_logprobs(job.served.token_pieces, delta.logprobs), None)
        usage = output.usage or usage
    yield make_object("", None, final_fields(job, generated, finish_reason, usage))


async def collected_object(job: GenerationJob, outputs: AdmittedStream, make_object) -> Any:
    state, usage = ChoiceState(), None
    async for output in outputs:
        for delta in output.deltas:
            state.add(delta)
        usage = output.usage or usage
    logprobs = ollama_logprobs(job.served.token_pieces, state.logprobs)
    return make_object(state.text, logprobs, final_fields(job, state.token_ids, state.finish_reason, usage))


@dataclass
class FinalFields:
    """What the last object adds: done_reason, timings, and the tokens for `context`."""

    done_reason: str
    stats: dict[str, int]
    generated_ids: list[int]


def final_fields(job: GenerationJob, generated: list[int], finish_reason: str | None, usage: Usage | None) -> FinalFields:
    return FinalFields(finish_reason or "stop", timings(job, usage), generated)


# -------------------------------------------------------------------- chat


@router.post("/chat")
async def chat(request: Request) -> Response:
    started = time.perf_counter()
    body = await parse_body(request, ChatRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    if not body.messages:
        return load_only(ChatResponse(model=body.model, created_at=now_rfc3339(), message=ResponseMessage(), done=True, done_reason="load"), body.stream is not False)
    tools = body.tool_config()
    prompt_ids = encode_chat(served.tokenizer, body.template_messages(), tools=tools and tools.template_tools()).ids
    job = prepare_job(body.model, served, prompt_ids, body, started)
    spec = await tool_grammar_spec(served.engine, tools) if tools else body.grammar_spec()
    await attach_grammar(job.params, served.engine, spec)

    def make_object(text: str, logprobs, final: FinalFields | None) -> ChatResponse:
        return ChatResponse(
            model=job.model_name,
            created_at=now_rfc3339(),
            message=ResponseMessage(content=text),
            done=final is not None,
            done_reason=final.done_reason if final else None,
            logprobs=logprobs,
            **(final.stats if final else {}),
        )

    if tools:  # calls parsed out of the text into message.tool_calls
        make_object = with_tool_calls(make_object)
    return await answer(request, job, body.stream is not False, make_object)


def load_only(item: Any, stream: bool) -> Response:
    """A request without input: the model is (already) loaded."""
    if stream:
        return Response(ndjson_line(item), media_type=NDJSON)
    return json_response(item)


# ---------------------------------------------------------------- generate


def generate_prompt_ids(body: GenerateRequest, served: ServedModel) -> list[int]:
    tokenizer = served.tokenizer
    context = list(body.context or [])
    bad = [t for t in context if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise InvalidRequestError("context", f"context has token id {bad[0]} outside [0, {tokenizer.vocab_size})")
    if body.raw:
        return context + tokenizer.encode(body.prompt, add_bos=not context)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [{"role": "user", "content": body.prompt}]
    ids = encode_chat(tokenizer, messages).ids
    if context and tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id]:
        ids = ids[1:]  # the earlier context already starts with BOS
    return context + ids


@router.post("/generate")
async def generate(request: Request) -> Response:
    started = time.perf_counter()
    body = await parse_body(request, GenerateRequest)
    body.check_supported()
    served = registry_of(request).get(body.model)
    if not body.prompt and not body.context:
        return load_only(GenerateResponse(model=body.model, created_at=now_rfc3339(), response="", done=True, done_reason="load"), body.stream is not False)
    job = prepare_job(body.model, served, generate_prompt_ids(body, served), body, started)
    await attach_grammar(job.params, served.engine, body.grammar_spec())

    def make_object(text: str, logprobs, final: FinalFields | None) -> GenerateResponse:
        return GenerateResponse(
            model=job.model_name,
            created_at=now_rfc3339(),
            response=text,
            done=final is not None,
            done_reason=final.done_reason if final else None,
            context=job.prompt_ids + final.generated_ids if final and not body.raw else None,
            logprobs=logprobs,
            **(final.stats if final else {}),
        )

    return await answer(request, job, body.stream is not False, make_object)


# ------------------------------------------------------------- model info


def parameter_size(num_params: int) -> str:
    """Ollama's style: "494.03M", "7.6B"."""
    return f"{num_params / 1e9:.1f}B" if num_params >= 1e9 else f"{num_params / 1e6:.2f}M"


def details(served: ServedModel) -> ModelDetails:
    return ModelDetails(parameter_size=parameter_size(served.num_params), quantization_level=served.quantization_level)


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")


def tagged(model_id: str) -> str:
    return model_id if ":" in model_id else f"{model_id}:latest"  # "bot:v2" (/api/create) has its tag


@router.get("/tags")
async def tags(request: Request) -> ListResponse:
    registry = registry_of(request)
    models = []
    for served in registry.listed():  # loaded or not (facts from config.json)
        models.append(
            ListedModel(
                name=tagged(served.model_id),
                model=tagged(served.model_id),
                modified_at=rfc3339(served.modified_at),
                size=served.size_bytes,
                digest=served.digest,
                details=details(served),
            )
        )
    return ListResponse(models=models)


@router.get("/ps")
async def running(request: Request) -> ProcessResponse:
    registry = registry_of(request)
    models = [
        RunningModel(
            name=tagged(served.model_id),
            model=tagged(served.model_id),
            size=served.size_bytes,
            digest=served.digest,
            details=details(served),
            expires_at=expiry_text(registry.expires_at(served.model_id)),
            size_vram=0,  # CPU inference
            context_length=served.max_seq_len,
        )
        for served in registry.models.values()
    ]
    return ProcessResponse(models=models)


def expiry_text(expires_at: float | None) -> str:
    return NEVER_EXPIRES if expires_at is None else rfc3339(expires_at)


@router.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=OLLAMA_COMPATIBLE_VERSION)


@router.post("/show")
async def show(request: Request) -> ShowResponse:
    body = await parse_body(request, ShowRequest)
    served = registry_of(request).get(body.model_name)
    tokenizer = served.tokenizer
    stops = [tokenizer.backend.id_to_token(i) for i in tokenizer.stop_ids]
    parameters = "\n".join(f'stop "{token}"' for token in stops)
    template = template_description(served)
    modelfile = f"# Modelfile generated by hearth\nFROM {served.path or served.model_id}\nTEMPLATE \"\"\"{template}\"\"\"\n"
    modelfile += "".join(f"PARAMETER {line}\n" for line in parameters.splitlines())
    return ShowResponse(
        modelfile=modelfile,
        parameters=parameters,
        template=template,
        details=details(served),
        model_info=model_info(served),
        capabilities=["completion"],
        modified_at=rfc3339(served.modified_at),
    )


def template_description(served: ServedModel) -> str:
    """The chat template, in Ollama's Go-template notation (Jinja text for imported models)."""
    info = served.tokenizer.info
    if info.chat_template == "jinja":
        return info.jinja_template or ""
    bos = info.bos_token or ""
    return (
        bos + "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
    )


def model_info(served: ServedModel) -> dict[str, Any]:
    config = served.engine.model_config
    return {
        "general.architecture": "llama",
        "general.parameter_count": served.num_params,
        "llama.context_length": config.max_seq_len,
        "llama.embedding_length": config.dim,
        "llama.block_count": config.n_layers,
        "llama.feed_forward_length": config.ffn_dim,
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.n_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": config.norm_eps,
        "llama.rope.freq_base": config.rope_theta,
        "llama.vocab_size": config.vocab_size,
    }
