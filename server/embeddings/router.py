"""Embedding routes: OpenAI's POST /v1/embeddings, Ollama's POST /api/embed and legacy POST /api/embeddings.

    curl localhost:8080/v1/embeddings -d '{"model": "default", "input": ["a cat", "a dog"]}'
    curl localhost:8080/api/embed -d '{"model": "default", "input": "a cat"}'

Design choices:
- One model instance serves generation and embeddings: each input is one
  prefill-only engine request in the same continuous batch as generating ones
  (`Engine.embed`, server/engine/pooling.py). A vector is bit for bit the same
  alone, in a batch of inputs, or beside generation.
- Pooling (`--pooling mean|last`) and L2 normalization (`--embed-normalize`,
  on by default) are the server's; a request may turn normalization off or on
  with llama-server's `embd_normalize` (-1: off, 2: Euclidean).
- Text is encoded as a completion prompt is (BOS where the model's tokenizer
  adds one); token ids (OpenAI's list of ids or list of id lists) are taken as
  they are.
- Too-long input is a 400 naming the limit unless `truncate` is set (Ollama's
  field, true by default there; an extension on /v1/embeddings, false by
  default): then each input keeps its first context-length tokens.
- `dimensions` is accepted only when it equals the model's hidden size: the
  models served here are not trained for shortened (Matryoshka) vectors.
- Empty input: a 400 on /v1/embeddings (as OpenAI); on /api/embed and
  /api/embeddings an empty `input`/`prompt` answers no vectors (as Ollama,
  whose clients send it to load a model).
- Inputs of one request run at most `max_num_seqs` at a time, so a long list
  cannot fill the waiting queue (429) by itself; if one input fails, or the
  client goes away, the others are cancelled and their KV blocks freed.
"""

from __future__ import annotations

import asyncio
import base64
import time
from contextlib import suppress
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.engine.types import EmbeddingOutput, EmbeddingRequest, InvalidRequestError
from server.core.http import new_id, parse_body
from server.http_errors import APIError, ClientDisconnectedError

router = APIRouter(tags=["embeddings"])

MAX_INPUTS = 2048  # inputs per request, as OpenAI
NORMALIZE_CHOICES = {-1: False, 2: True}  # llama-server's embd_normalize values supported here


# ---------------------------------------------------------------- requests


class EmbeddingFields(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    embd_normalize: int | None = Field(None, description="llama-server: -1 no normalization, 2 L2 (default: the server's)")


def input_shape(value: Any) -> Any:
    """OpenAI's four input forms pass; anything else is one clear error (not four union errors)."""
    is_ids = lambda item: isinstance(item, list) and all(type(t) is int for t in item)  # noqa: E731
    if isinstance(value, str) or is_ids(value):
        return value
    if isinstance(value, list) and (all(isinstance(v, str) for v in value) or all(is_ids(v) for v in value)):
        return value
    raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists")


class EmbeddingsRequest(EmbeddingFields):
    """POST /v1/embeddings."""

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # only the model's own hidden size
    user: str | None = None
    truncate: bool = False  # extension: keep each input's first context-length tokens instead of a 400

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return input_shape(value)


class OllamaEmbedRequest(EmbeddingFields):
    """POST /api/embed."""

    input: str | list[str] = ""
    truncate: bool = True  # keep each input's first context-length tokens; false: a 400 when one is longer
    dimensions: int | None = None
    options: dict[str, Any] | None = None  # accepted, unused (the context length is the checkpoint's)
    keep_alive: str | int | float | None = None  # accepted, unused: models stay loaded


class OllamaEmbeddingsRequest(EmbeddingFields):
    """POST /api/embeddings (Ollama's legacy route: one prompt, one vector)."""

    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


# ---------------------------------------------------------------- answers


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """The /v1/embeddings answer."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int  # nanoseconds
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(BaseModel):
    embedding: list[float]


# ---------------------------------------------------------------- routes


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> JSONResponse:
    body = await parse_body(request, EmbeddingsRequest)
    served = request.app.state.registry.get(body.model)
    check_dimensions(body.dimensions, served.engine.model_config.dim)
    prompts = encode_inputs(served.tokenizer, openai_inputs(body.input), "input")
    if not prompts:
        raise InvalidRequestError("input", "input must not be empty")
    prompts = fit_context(prompts, served.max_seq_len, body.truncate, "input")
    outputs = await embed_unless_disconnected(request, served.engine, prompts, normalize_choice(body.embd_normalize))
    data = [Embedding(index=i, embedding=encode_vector(out.embedding, body.encoding_format)) for i, out in enumerate(outputs)]
    tokens = sum(out.prompt_tokens for out in outputs)
    answer = EmbeddingList(data=data, model=served.model_id, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return JSONResponse(answer.model_dump())


@router.post("/api/embed")
async def ollama_embed(request: Request) -> JSONResponse:
    started = time.perf_counter()
    body = await parse_body(request, OllamaEmbedRequest)
    served = request.app.state.registry.get(body.model)
    check_dimensions(body.dimensions, served.engine.model_config.dim)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if texts == [""]:
        texts = []  # Ollama: an empty input loads the model and answers no vectors
    prompts = fit_context(encode_inputs(served.tokenizer, texts, "input"), served.max_seq_len, body.truncate, "input")
    outputs = await embed_unless_disconnected(request, served.engine, prompts, normalize_choice(body.embd_normalize))
    answer = OllamaEmbedResponse(model=body.model, embeddings=[out.embedding.tolist() for out in outputs],
                                 total_duration=int((time.perf_counter() - started) * 1e9), load_duration=0,
                                 prompt_eval_count=sum(out.prompt_tokens for out in outputs))
    return JSONResponse(answer.model_dump())


@router.post("/api/embeddings")
async def ollama_embeddings(request: Request) -> JSONResponse:
    body = await parse_body(request, OllamaEmbeddingsRequest)
    served = request.app.state.registry.get(body.model)
    if not body.prompt:
        return JSONResponse(OllamaEmbeddingsResponse(embedding=[]).model_dump())  # as Ollama
    prompts = fit_context(encode_inputs(served.tokenizer, [body.prompt], "prompt"), served.max_seq_len, True, "prompt")
    (output,) = await embed_unless_disconnected(request, served.engine, prompts, normalize_choice(body.embd_normalize))
    return JSONResponse(OllamaEmbeddingsResponse(embedding=output.embedding.tolist()).model_dump())


# ---------------------------------------------------------------- checks


def openai_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The input field as a list of inputs, each text or token ids."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(item, int) for item in value):
        return [list(value)]  # one token-id array
    return list(value)


def encode_inputs(tokenizer: Any, inputs: list[str | list[int]], field: str) -> list[list[int]]:
    """Token ids of each input; an empty one, too many, or an id outside the vocabulary is a 400 naming it."""
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequestError(field, f"{field} has {len(inputs)} items; at most {MAX_INPUTS} per request")
    prompts = []
    for index, item in enumerate(inputs):
        name = f"{field}[{index}]" if len(inputs) > 1 else field
        if not item:
            raise InvalidRequestError(name, f"{name} is empty")
        ids = tokenizer.encode(item, add_bos=True) if isinstance(item, str) else item
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(name, f"{name}: token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})")
        prompts.append(ids)
    return prompts


def fit_context(prompts: list[list[int]], limit: int, truncate: bool, field: str) -> list[list[int]]:
    """Each input cut to the context (truncate), or a 400 naming the limit for the first one over it."""
    if truncate:
        return [ids[:limit] for ids in prompts]
    for index, ids in enumerate(prompts):
        if len(ids) > limit:
            name = f"{field}[{index}]" if len(prompts) > 1 else field
            raise APIError(400, f"{name} is {len(ids)} tokens, over this model's maximum context length of {limit} "
                                f"tokens (set truncate to cut it)", param=name, code="context_length_exceeded")
    return prompts


def check_dimensions(dimensions: int | None, hidden_size: int) -> None:
    if dimensions is not None and dimensions != hidden_size:
        raise InvalidRequestError("dimensions", f"dimensions: this model's embeddings have {hidden_size} dimensions "
                                                f"and cannot be shortened to {dimensions}")


def normalize_choice(embd_normalize: int | None) -> bool | None:
    """llama-server's embd_normalize -> normalize on/off; None: the server's default."""
    if embd_normalize is None:
        return None
    if embd_normalize not in NORMALIZE_CHOICES:
        raise InvalidRequestError("embd_normalize", "embd_normalize must be -1 (none) or 2 (L2, Euclidean)")
    return NORMALIZE_CHOICES[embd_normalize]


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


# ---------------------------------------------------------------- running


async def embed_all(engine: Any, prompts: list[list[int]], normalize: bool | None) -> list[EmbeddingOutput]:
    """One engine request per input, at most max_num_seqs at once; one failure cancels the rest."""
    slots = asyncio.Semaphore(engine.config.max_num_seqs)

    async def embed_one(ids: list[int]) -> EmbeddingOutput:
        async with slots:
            return await engine.embed(EmbeddingRequest(new_id("embd"), ids, normalize=normalize))

    tasks = [asyncio.ensure_future(embed_one(ids)) for ids in prompts]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await cancel_all(tasks)


async def cancel_all(tasks: list[asyncio.Future]) -> None:
    """Cancel what still runs and wait for it (each cancelled `Engine.embed` aborts its request)."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        with suppress(asyncio.CancelledError):
            await asyncio.shield(asyncio.wait(pending))


async def embed_unless_disconnected(request: Request, engine: Any, prompts: list[list[int]],
                                    normalize: bool | None) -> list[EmbeddingOutput]:
    """embed_all, cancelled (every input aborted) if the client goes away first."""
    if not prompts:
        return []
    work = asyncio.ensure_future(embed_all(engine, prompts, normalize))
    watcher = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ClientDisconnectedError()
    finally:
        watcher.cancel()
        await cancel_all([work])


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
