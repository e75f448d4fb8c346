"""Structured outputs at the API edge: each API's field names -> one API-neutral GrammarSpec.

    spec = openai_grammar_spec(body.response_format, body)     # or ollama_grammar_spec(body.format)
    await attach_grammar(params, served.engine, spec)         # compiled off the event loop, cached

Design choices:
- Only names are mapped here; what a grammar means and how it is compiled and
  enforced lives engine-side (server/engine/grammar.py), so the Responses API
  and tool calling reuse the same path.
- OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}; "text" is no constraint.
  vLLM's extras: `structured_outputs` {json | regex | choice | grammar} and the
  older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`.
  At most one constraint per request: two are a 400 naming both fields.
- Ollama: `format` "json" (any JSON object) or a JSON schema object.
- Every mistake is an InvalidRequestError naming the request field, e.g.
  `response_format.json_schema.schema`.
"""

from __future__ import annotations

from typing import Any

from server.engine.grammar import GrammarSpec
from server.engine.types import InvalidRequestError, SamplingParams

VLLM_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def openai_grammar_spec(response_format: Any, extras: dict[str, Any]) -> GrammarSpec | None:
    """response_format (a dict or None) plus vLLM's extras (field name -> value) -> at most one spec."""
    specs = [spec for spec in (_response_format_spec(response_format), *_vllm_specs(extras)) if spec is not None]
    if len(specs) > 1:
        names = " and ".join(spec.field.split(".")[0] for spec in specs)
        raise InvalidRequestError(specs[1].field, f"only one structured output constraint per request, got {names}")
    return specs[0] if specs else None


def _response_format_spec(response_format: Any) -> GrammarSpec | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequestError("response_format", "response_format must be an object with a 'type'")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object("response_format")
    if kind != "json_schema":
        raise InvalidRequestError("response_format.type", f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    json_schema = response_format.get("json_schema")
    if not isinstance(json_schema, dict):
        raise InvalidRequestError("response_format.json_schema", "response_format.json_schema must be an object with 'name' and 'schema'")
    if not isinstance(json_schema.get("name", ""), str):
        raise InvalidRequestError("response_format.json_schema.name", "response_format.json_schema.name must be a string")
    schema = json_schema.get("schema", {})  # OpenAI: absent schema = any JSON
    return GrammarSpec.json_schema(schema, "response_format.json_schema.schema")


def _vllm_specs(extras: dict[str, Any]) -> list[GrammarSpec]:
    specs = []
    structured = extras.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise InvalidRequestError("structured_outputs", "structured_outputs must be an object")
        chosen = {key: value for key, value in structured.items() if key in ("json", "regex", "choice", "grammar") and value is not None}
        if len(chosen) != 1:
            raise InvalidRequestError("structured_outputs", "structured_outputs needs exactly one of json, regex, choice, grammar")
        (key, value), = chosen.items()
        specs.append(_vllm_spec(key, value, f"structured_outputs.{key}"))
    for name, key in VLLM_GUIDED.items():
        if extras.get(name) is not None:
            specs.append(_vllm_spec(key, extras[name], name))
    return specs


def _vllm_spec(key: str, value: Any, field: str) -> GrammarSpec:
    if key == "json":
        if isinstance(value, str):
            value = _parse_json_text(value, field)
        return GrammarSpec.json_schema(value, field)
    if key == "regex":
        return GrammarSpec.regex(value, field)
    if key == "choice":
        return GrammarSpec.choice(value, field)
    return GrammarSpec.lark(value, field)


def _parse_json_text(text: str, field: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(field, f"{field} is not valid JSON: {exc}") from None


def ollama_grammar_spec(format_value: Any) -> GrammarSpec | None:
    """Ollama's `format`: "json", a JSON schema object, or nothing."""
    if format_value in (None, ""):
        return None
    if format_value == "json":
        return GrammarSpec.json_object("format")
    if isinstance(format_value, dict):
        return GrammarSpec.json_schema(format_value, "format")
    raise InvalidRequestError("format", f"format must be \"json\" or a JSON schema object, got {format_value!r}")


async def attach_grammar(params: SamplingParams | list[SamplingParams], engine: Any, spec: GrammarSpec | None) -> None:
    """Compile spec for the engine's tokenizer (cached; in a worker thread) and set it on the params."""
    if spec is None:
        return
    grammar = await engine.grammars.compile_async(spec)
    for each in params if isinstance(params, list) else [params]:
        each.grammar = grammar
