"""Constrained decoding: API-neutral grammar specs compiled into llguidance matchers.

    compiler = GrammarCompiler(tokenizer, vocab_size)          # one per served model
    grammar = await compiler.compile_async(GrammarSpec.json_schema(schema, field="response_format"))
    params.grammar = grammar                                   # the sampler masks every step
    matcher = grammar.new_matcher()                            # one per sequence (SequenceSampler)

Design choices:
- A `GrammarSpec` says what to enforce (a JSON schema, any JSON object, a
  regex, a choice of strings, a Lark grammar) and which request field it came
  from; each API maps its own field names onto one (server/structured.py), so
  the engine never sees API vocabulary.
- Compiling builds llguidance's grammar and validates it against the
  tokenizer. A spec that cannot be enforced (an unknown `format`, an
  unimplemented keyword such as `if`, a bad regex) is an
  `InvalidRequestError` naming the field and the part: never silently
  unconstrained text.
- Compiled grammars are cached by a hash of (kind, canonical source), LRU,
  so a schema sent with every request compiles once. Compiling runs in a
  small thread pool (`compile_async`), never on the event loop or the engine
  thread; llguidance releases the GIL while it builds.
- An object schema with `properties` but no `additionalProperties` generates
  only the declared properties (as llama.cpp and xgrammar do): the output
  still validates against the schema as sent, and a model is not invited to
  invent keys forever (pydantic's `model_json_schema()` leaves the keyword
  out). Inside `allOf` branches nothing is closed (each branch would forbid
  the others' keys).
- JSON is compact by default (no whitespace between tokens): a weak model
  otherwise can spend its whole budget on newlines inside a JSON value.
- The end-of-sequence tokens of the grammar are the model's stop tokens: the
  mask allows them only where the grammar accepts, so a constrained output
  always parses unless it runs out of tokens (finish_reason "length").
- The llguidance tokenizer is built lazily on first use (one pass over the
  vocabulary), under a lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.engine.types import InvalidRequestError, RequestFailedError

CACHE_SIZE = 256  # compiled grammars kept per model
JSON_OPTIONS = {"whitespace_flexible": False}
_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hearth-grammar")

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


@dataclass(frozen=True)
class GrammarSpec:
    """What to enforce, and the request field it came from (named in errors)."""

    kind: str  # one of KINDS
    source: str  # canonical text: JSON of the schema or of the choices, the regex, the Lark grammar
    field: str  # e.g. "response_format.json_schema.schema", "format", "structured_outputs.regex"

    @classmethod
    def json_schema(cls, schema: Any, field: str) -> "GrammarSpec":
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise InvalidRequestError(field, f"{field} must be a JSON schema object")
        closed = close_objects(schema)  # key order kept: it orders the properties
        return cls("json_schema", json.dumps(closed, separators=(",", ":")), field)

    @classmethod
    def json_object(cls, field: str) -> "GrammarSpec":
        return cls("json_object", "", field)

    @classmethod
    def regex(cls, pattern: Any, field: str) -> "GrammarSpec":
        return cls("regex", _non_empty_text(pattern, field), field)

    @classmethod
    def lark(cls, grammar: Any, field: str) -> "GrammarSpec":
        return cls("lark", _non_empty_text(grammar, field), field)

    @classmethod
    def choice(cls, choices: Any, field: str) -> "GrammarSpec":
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
            raise InvalidRequestError(field, f"{field} must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices), field)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")


def close_objects(schema: Any, in_all_of: bool = False) -> Any:
    """A copy of schema where objects with `properties` and no `additionalProperties` allow no other keys."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: close_objects(sub) for name, sub in closed[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [close_objects(sub) for sub in closed[key]]
    for key in _SCHEMA_VALUES:
        if key in closed:
            closed[key] = close_objects(closed[key])
    if isinstance(closed.get("allOf"), list):
        closed["allOf"] = [close_objects(sub, in_all_of=True) for sub in closed["allOf"]]
    if "properties" in closed and "additionalProperties" not in closed and not in_all_of and "allOf" not in closed:
        closed["additionalProperties"] = False
    return closed


def _non_empty_text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(field, f"{field} must be a non-empty string")
    return value


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The spec as llguidance's grammar text (not yet validated)."""
    import llguidance

    matcher = llguidance.LLMatcher
    if spec.kind == "json_schema":
        return matcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return matcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        alternatives = " | ".join(json.dumps(choice) for choice in json.loads(spec.source))
        return f"start: {alternatives}\n"
    if spec.kind == "lark":
        return matcher.grammar_from_lark(spec.source)
    raise InvalidRequestError(spec.field, f"unknown grammar kind {spec.kind!r}")


class CompiledGrammar:
    """A validated grammar for one tokenizer; makes a fresh matcher per sequence."""

    def __init__(self, spec: GrammarSpec, prototype: Any, vocab_size: int):
        self.spec = spec
        self._prototype = prototype  # an llguidance.LLMatcher at the start; copied, never advanced
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's)

    def with_spec(self, spec: GrammarSpec) -> "CompiledGrammar":
        """The same grammar, reported under another request field."""
        return CompiledGrammar(spec, self._prototype, self.vocab_size)

    def new_matcher(self) -> "SequenceMatcher":
        """A fresh matcher (a copy of the compiled one: cheap, no grammar rebuild)."""
        return SequenceMatcher(self._prototype.deep_copy(), self.vocab_size)


class SequenceMatcher:
    """One sequence's position in its grammar: the allowed-token mask, advanced token by token."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """[vocab_size] bool: the tokens the grammar allows next (EOS only where it accepts)."""
        if self._matcher.is_error():
            raise RequestFailedError(f"the grammar failed: {self._matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(self.vocab_size, dtype=bool)
        width = min(self.vocab_size, bits.size)
        allowed[:width] = bits[:width].astype(bool)
        if not allowed.any():
            raise RequestFailedError("the grammar allows no token here")
        return allowed

    def advance(self, token_id: int) -> None:
        """Consume a sampled token. A refused token leaves the matcher in its error state,
        which the next `allowed()` reports (the sequence fails, not the batch)."""
        self._matcher.consume_token(token_id)

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer and logits width."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self._hearth_tokenizer = tokenizer  # model.tokenizer.Tokenizer
        self.vocab_size = vocab_size
        self._llg_tokenizer: Any = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0  # how many specs were compiled (not served from the cache)

    def llg_tokenizer(self) -> Any:
        with self._lock:
            if self._llg_tokenizer is None:
                import llguidance

                tokenizer = self._hearth_tokenizer
                self._llg_tokenizer = llguidance.LLTokenizer(
                    tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=list(tokenizer.stop_ids))
            return self._llg_tokenizer

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """-> the spec's grammar (cached); InvalidRequestError naming spec.field if it cannot be enforced."""
        with self._lock:
            cached = self._cache.get(spec.key)
            if cached is not None:
                self._cache.move_to_end(spec.key)
                return cached.with_spec(spec)
        compiled = self._compile_uncached(spec)
        with self._lock:
            self._cache[spec.key] = compiled
            self.compilations += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    async def compile_async(self, spec: GrammarSpec) -> CompiledGrammar:
        return await asyncio.get_running_loop().run_in_executor(_executor, self.compile, spec)

    def _compile_uncached(self, spec: GrammarSpec) -> CompiledGrammar:
        import llguidance

        tokenizer = self.llg_tokenizer()
        try:
            grammar = llguidance_grammar(spec)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise _cannot_enforce(spec, str(exc)) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise _cannot_enforce(spec, messages[0] if messages else "invalid grammar")
        prototype = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise _cannot_enforce(spec, prototype.get_error())
        return CompiledGrammar(spec, prototype, self.vocab_size)


def _cannot_enforce(spec: GrammarSpec, detail: str) -> InvalidRequestError:
    detail = " ".join(detail.split())[:500]
    return InvalidRequestError(spec.field, f"{spec.field} cannot be enforced: {detail}")
