"""OpenAI wire format: request and response models, field by field as OpenAI's API reference.

Design choices:
- Request fields appear in the reference's order; ranges the reference
  states (temperature 0-2, top_p in (0, 1], penalties -2..2, n >= 1...) are
  pydantic constraints, so a bad value is a 400 naming the field before the
  engine sees it.
- Unknown fields are accepted (`extra="allow"`) so the route can log and
  ignore them; known-but-unsupported features (fill-in-the-middle `suffix`)
  are refused with a 400 that says so, never silently dropped.
- Only what OpenAI's reference states is checked here; the engine's own
  rules (n <= 16, token ids in the vocabulary...) are SamplingParams' (run
  once, in server/core/serving.py's admission), reported under these names.
- Extras beyond OpenAI, as vLLM names them: top_k, min_p,
  repetition_penalty, ignore_eos, and the structured-output constraints
  `structured_outputs` / `guided_*` (mapped by server/structured.py, like
  `response_format`).
- `sampling_fields()` is the one place a request becomes engine settings
  (SamplingParams fields); an absent max_tokens means "the rest of the context".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from server.engine.grammar import GrammarSpec
from server.engine.types import InvalidRequestError
from server.structured import VLLM_GUIDED, openai_grammar_spec
from server.tools import ToolConfig


SEED_RANGE = {"ge": -(2**63), "le": 2**63 - 1}  # int64, as OpenAI documents seed
LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]  # token id (as a string) -> bias


class OpenAIRequest(BaseModel):
    # Unknown fields: logged by the route, then ignored. Strict types, as OpenAI's API checks them: "5" is
    # not an integer, 1 not a boolean (an integer is still a number), so the published schema is exact.
    model_config = ConfigDict(extra="allow", strict=True)


# ---------------------------------------------------------------- requests


class TextContentPart(OpenAIRequest):
    type: str = "text"  # only "text" is supported; images etc. are refused by the chat template
    text: str | None = None


class ChatMessage(OpenAIRequest):
    role: str  # system, developer (treated as system), user, assistant, tool
    content: str | list[TextContentPart] | None = None
    name: str | None = None  # accepted, not used by the template
    tool_calls: list[dict[str, Any]] | None = None  # assistant: [{"id", "type": "function", "function": {"name", "arguments"}}]
    tool_call_id: str | None = None  # tool: the call this message answers

    def to_template_message(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        content = self.content
        if isinstance(content, list):
            content = [part.model_dump(exclude_none=True) for part in content]
        message = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(OpenAIRequest):
    include_usage: bool = False  # a last chunk with empty choices carries the usage


class ResponseFormat(OpenAIRequest):
    type: str = "text"  # text | json_object | json_schema
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}


class StructuredOutputFields(OpenAIRequest):
    """vLLM's structured-output extras (chat and completions)."""

    structured_outputs: dict[str, Any] | None = None  # {json | regex | choice | grammar}
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def grammar_spec(self) -> GrammarSpec | None:
        """The request's one output constraint (response_format or a vLLM extra), API-neutral."""
        response_format = getattr(self, "response_format", None)
        extras = {name: getattr(self, name) for name in ("structured_outputs", *VLLM_GUIDED)}
        return openai_grammar_spec(response_format.model_dump(exclude_none=True) if response_format else None, extras)


class SamplingFields(StructuredOutputFields):
    """Fields shared by chat and text completions (reference order within each request)."""

    def stop_list(self) -> list[str]:
        stop = getattr(self, "stop", None)
        return [stop] if isinstance(stop, str) else list(stop or [])

    def common_fields(self) -> dict[str, Any]:
        """SamplingParams fields shared by chat and completions (validated by SamplingParams itself)."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_k": self.top_k or 0,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "min_p": self.min_p or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": dict(self.logit_bias or {}),  # string keys: SamplingParams reads them as token ids
            "seed": self.seed,
            "stop": self.stop_list(),
            "ignore_eos": bool(self.ignore_eos),
            "n": 1 if self.n is None else self.n,
        }

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "stream_options is only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    model: str
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    n: int | None = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    tool_choice: Any = None  # none | auto | required | {"type": "function", "function": {"name"}}
    tools: list[Any] | None = None
    parallel_tool_calls: bool | None = None  # default true
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # Extras (vLLM's names).
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.to_template_message() for message in self.messages]

    def tool_config(self) -> ToolConfig | None:
        """The tools the model may call (None: none, or tool_choice "none"), API-neutral."""
        config = ToolConfig.from_openai(self.tools, self.tool_choice, self.parallel_tool_calls)
        if config is not None and self.grammar_spec() is not None:
            raise InvalidRequestError("response_format", "response_format and structured outputs cannot be combined with tools")
        return config

    def check_supported(self) -> None:
        """Refuse, with a clear 400, features this server cannot honour."""
        self.check_stream_options()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "top_logprobs requires logprobs to be true")

    def sampling_fields(self) -> dict[str, Any]:
        """SamplingParams fields; max_tokens None: the rest of the context."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return {**self.common_fields(), "max_tokens": self.max_completion_tokens or self.max_tokens, "logprobs": logprobs}


class CompletionRequest(SamplingFields):
    """POST /v1/completions (legacy text completions)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI caps this at 5; the engine allows 20
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # Extras (vLLM's names).
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        is_ids = lambda value: isinstance(value, list) and all(type(t) is int for t in value)  # noqa: E731
        if isinstance(prompt, str) or is_ids(prompt):
            return prompt
        if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(is_ids(p) for p in prompt)):
            return prompt
        raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists")

    def check_supported(self) -> None:
        self.check_stream_options()
        if self.suffix:
            raise InvalidRequestError("suffix", "suffix (fill-in-the-middle) is not supported by this model")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidRequestError("best_of", "best_of is not supported (only best_of == n)")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo", "echo with logprobs is not supported (prompt logprobs are not computed)")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # one token-id array
        else:
            prompts = list(prompt)
        if not prompts:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        return prompts

    def sampling_fields(self) -> dict[str, Any]:
        """SamplingParams fields; max_tokens None: the rest of the context."""
        return {**self.common_fields(), "max_tokens": self.max_tokens, "logprobs": self.logprobs}


# --------------------------------------------------------------- responses


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ChatCompletionMessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # [{"index", "id"?, "type"?, "function": {"name"?, "arguments"}}]

    @model_serializer
    def _only_set_fields(self) -> dict[str, Any]:  # OpenAI's deltas omit what did not change
        fields = (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
        return {key: value for key, value in fields if value is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """Both the whole answer and each streamed chunk (`object` is "text_completion" for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hearth"
    max_model_len: int | None = None  # vLLM's extra: the context length
    compute: dict[str, str] | None = None  # Hearth's extra: device, dtype, native_isa, native_decoder
    parent: str | None = None  # vLLM's: a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
