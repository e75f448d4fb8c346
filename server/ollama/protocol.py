"""Ollama wire format: request and response models as Ollama's API documents them.

Design choices:
- Sampling defaults are Ollama's documented ones (temperature 0.8, top_k 40,
  top_p 0.9, repeat_penalty 1.1, num_predict -1 = until the context ends), so
  a client moving from Ollama gets the behaviour it is used to.
- `num_ctx` can shrink the context a request may use, never grow it past the
  model's own limit.
- Durations in responses are integers in nanoseconds, `created_at` is
  RFC 3339 in UTC, as Ollama writes them.
- `format` ("json" or a JSON schema) is enforced by constrained decoding
  (server/structured.py maps it to an API-neutral GrammarSpec).
- `tools` are rendered by the chat template and called under a grammar
  (server/tools.py), `message.tool_calls` with arguments as objects.
- Features this server cannot honour (images, custom `template`,
  `suffix`) are refused with a 400 saying so; unknown options are logged and
  ignored.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.engine.grammar import GrammarSpec
from server.engine.types import InvalidRequestError
from server.structured import ollama_grammar_spec
from server.tools import ToolConfig

# Engine field -> Ollama's request field, for errors.
OLLAMA_FIELD_NAMES = {
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_k": "options.top_k",
    "top_p": "options.top_p",
    "min_p": "options.min_p",
    "repetition_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "stop": "options.stop",
    "logprobs": "top_logprobs",
}


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class OllamaRequest(BaseModel):
    # Unknown fields: logged by the route, then ignored. Strict types, as Ollama's JSON decoding is
    # ("5" is not an integer, 1 not a boolean), so the published schema is exact.
    model_config = ConfigDict(extra="allow", strict=True)


# ---------------------------------------------------------------- requests


class Options(OllamaRequest):
    """The `options` object (Modelfile parameters); only the ones that apply here."""

    num_ctx: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # negative: random
    num_predict: int | None = None  # -1: no limit, -2: fill the context
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = None
    min_p: float | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | str | None = None

    def context_limit(self, model_limit: int) -> int:
        return min(self.num_ctx or model_limit, model_limit)

    def sampling_fields(self) -> dict[str, Any]:
        """SamplingParams fields with Ollama's defaults; max_tokens None: until the context ends."""
        if self.num_predict == 0:
            raise InvalidRequestError("options.num_predict", "options.num_predict must be at least 1 (or -1 for no limit)")
        return {
            "max_tokens": self.num_predict if self.num_predict and self.num_predict > 0 else None,
            "temperature": 0.8 if self.temperature is None else self.temperature,
            "top_k": 40 if self.top_k is None else self.top_k,
            "top_p": 0.9 if self.top_p is None else self.top_p,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "repetition_penalty": 1.1 if self.repeat_penalty is None else self.repeat_penalty,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "seed": self.seed if self.seed is not None and self.seed >= 0 else None,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
        }


class Message(OllamaRequest):
    role: str  # system, user, assistant
    content: str = ""
    images: list[Any] | None = None
    thinking: str | None = None  # earlier reasoning (accepted, not templated)
    tool_calls: list[Any] | None = None  # [{"function": {"name", "arguments": {...}}}]
    tool_name: str | None = None  # role tool: which tool answered


class GenerationFields(OllamaRequest):
    """Fields common to /api/chat and /api/generate."""

    def check_supported(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "top_logprobs requires logprobs to be true")

    def grammar_spec(self) -> GrammarSpec | None:
        """`format` ("json" or a JSON schema) as an API-neutral constraint."""
        return ollama_grammar_spec(self.format)

    def sampling_fields(self) -> dict[str, Any]:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return {**(self.options or Options()).sampling_fields(), "logprobs": logprobs}


class ChatRequest(GenerationFields):
    """POST /api/chat."""

    model: str
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None
    format: Any = None  # "json" or a JSON schema (constrained decoding)
    options: Options | None = None
    stream: bool | None = True  # null: the default (stream)
    keep_alive: float | str | None = None  # accepted: models stay loaded
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def tool_config(self) -> ToolConfig | None:
        """Ollama's tools (OpenAI's shape, no tool_choice: the model decides), API-neutral."""
        config = ToolConfig.from_openai(self.tools, None, True)
        if config is not None and self.grammar_spec() is not None:
            raise InvalidRequestError("format", "format cannot be combined with tools")
        return config

    def check_supported(self) -> None:
        super().check_supported()
        for index, message in enumerate(self.messages):
            if message.images:
                raise InvalidRequestError(f"messages[{index}].images", f"{self.model} does not support images (text only)")

    def template_messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content, **({"tool_calls": m.tool_calls} if m.tool_calls else {})}
                for m in self.messages]


class GenerateRequest(GenerationFields):
    """POST /api/generate."""

    model: str
    prompt: str = ""
    suffix: str | None = None
    images: list[Any] | None = None
    format: Any = None
    options: Options | None = None
    system: str | None = None
    template: str | None = None
    stream: bool | None = True  # null: the default (stream)
    raw: bool | None = False  # true: the prompt is used as is, without the chat template
    keep_alive: float | str | None = None
    context: list[int] | None = None  # token ids returned by a previous /api/generate (short memory)
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise InvalidRequestError("suffix", f"{self.model} does not support insert (suffix / fill-in-the-middle)")
        if self.images:
            raise InvalidRequestError("images", f"{self.model} does not support images (text only)")
        if self.template:
            raise InvalidRequestError("template", "a custom template is not supported; use raw: true with a formatted prompt")


class ShowRequest(OllamaRequest):
    """POST /api/show (`name` is the older spelling of `model`)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    @property
    def model_name(self) -> str:
        if not (self.model or self.name):
            raise InvalidRequestError("model", "model is required")
        return self.model or self.name or ""


# --------------------------------------------------------------- responses


class AlternativeLogprob(BaseModel):
    """Ollama's TokenLogprob (Go), named apart from the engine's TokenLogprob."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(AlternativeLogprob):
    top_logprobs: list[AlternativeLogprob] = Field(default_factory=list)


class ResponseMessage(BaseModel):
    role: str = "assistant"
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None  # [{"function": {"name", "arguments": {...}}}]


class ChatResponse(BaseModel):
    """One /api/chat object; the statistics are set on the final one only (done true)."""

    model: str
    created_at: str
    message: ResponseMessage
    done: bool
    done_reason: str | None = None  # stop | length | load
    logprobs: list[Logprob] | None = None
    total_duration: int | None = None  # nanoseconds, arrival to last token
    load_duration: int | None = None  # nanoseconds spent loading the model for this request
    prompt_eval_count: int | None = None  # prompt tokens
    prompt_eval_duration: int | None = None  # nanoseconds
    eval_count: int | None = None  # generated tokens
    eval_duration: int | None = None  # nanoseconds


class GenerateResponse(BaseModel):
    """One /api/generate object; `context` and the statistics on the final one only."""

    model: str
    created_at: str
    response: str
    done: bool
    done_reason: str | None = None
    context: list[int] | None = None  # prompt + answer token ids, to pass back as `context`
    logprobs: list[Logprob] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "safetensors"
    family: str = "llama"
    families: list[str] = Field(default_factory=lambda: ["llama"])
    parameter_size: str
    quantization_level: str


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class ListResponse(BaseModel):
    models: list[ListedModel]


class RunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class ProcessResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    system: str | None = None  # a derived model's system prompt (/api/create)
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str
