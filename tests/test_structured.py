"""Structured outputs in the engine: grammar-masked sampling on a tiny random model.

The model is random, so only the mask can make its outputs valid: every output that stops
(rather than running out of max_tokens) must parse and validate against its schema.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from server.engine.grammar import GrammarSpec
from server.engine.types import InvalidRequestError, SamplingParams
from tests.structured_schemas import SCHEMAS
from tests.test_engine import collect, collect_all, make_engine

BOUNDED = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 6},
                                            "count": {"type": "integer", "minimum": 0, "maximum": 50}},
           "required": ["word", "count"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_num_seqs=40, kv_cache_blocks=700, max_num_batched_tokens=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer.encode("Give me some JSON:", add_bos=True)


def compiled(engine, schema, field="schema"):
    return engine.grammars.compile(GrammarSpec.json_schema(schema, field))


def validate(text: str, schema: dict) -> None:
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    validator.validate(json.loads(text))


def test_every_schema_output_parses_and_validates(engine, prompt):
    assert len(SCHEMAS) >= 30
    requests = [(prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=i, grammar=compiled(engine, schema)))
                for i, schema in enumerate(SCHEMAS)]
    results = asyncio.run(collect_all(engine, requests))  # all in one batch
    stopped = 0
    for schema, result in zip(SCHEMAS, results):
        choice = result.choices[0]
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            validate(choice.text, schema)
            stopped += 1
    assert stopped >= 0.85 * len(SCHEMAS)  # a random model only stops because the grammar ends


def test_greedy_constrained_output_validates(engine, prompt):
    schema = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}
    result = asyncio.run(collect(engine, "greedy", prompt, SamplingParams(max_tokens=40, temperature=0, grammar=compiled(engine, schema))))
    assert result.choices[0].finish_reason == "stop"
    validate(result.choices[0].text, schema)


@pytest.mark.parametrize(("spec", "check", "bounded"), [
    (GrammarSpec.regex(r"[a-z]{3}-[0-9]{2}", "regex"), lambda text: re.fullmatch(r"[a-z]{3}-[0-9]{2}", text), True),
    (GrammarSpec.choice(["yes", "no", "maybe"], "choice"), lambda text: text in ("yes", "no", "maybe"), True),
    (GrammarSpec.lark('start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/', "grammar"),
     lambda text: re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", text), False),
    (GrammarSpec.json_object("response_format"), lambda text: isinstance(json.loads(text), dict), False),
])
def test_regex_choice_lark_and_json_object(engine, prompt, spec, check, bounded):
    """Bounded grammars always stop; unbounded ones (any JSON object) stop on most seeds, and valid."""
    grammar = engine.grammars.compile(spec)
    requests = [(prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=seed, grammar=grammar)) for seed in range(6)]
    choices = [result.choices[0] for result in asyncio.run(collect_all(engine, requests))]
    stopped = [choice.text for choice in choices if choice.finish_reason == "stop"]
    assert all(check(text) for text in stopped), stopped
    assert len(stopped) == 6 if bounded else len(stopped) >= 2


@pytest.mark.parametrize(("spec", "words"), [
    (GrammarSpec.json_schema({"type": "object", "if": {"required": ["a"]}}, "response_format.json_schema.schema"), "if"),
    (GrammarSpec.json_schema({"type": "string", "format": "no-such-format"}, "format"), "no-such-format"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}, "guided_json"), "missing"),
    (GrammarSpec.regex("([a-z]", "structured_outputs.regex"), "regex"),
    (GrammarSpec.lark("start: undefined_rule", "structured_outputs.grammar"), "undefined_rule"),
])
def test_a_schema_that_cannot_be_enforced_names_the_field_and_part(engine, spec, words):
    with pytest.raises(InvalidRequestError) as caught:
        engine.grammars.compile(spec)
    assert caught.value.param == spec.field
    message = str(caught.value)
    assert message.startswith(f"{spec.field} cannot be enforced") and (words in message or spec.kind == "regex")


def test_bad_spec_shapes_are_refused_before_compiling():
    for make in (lambda: GrammarSpec.json_schema("not a schema", "f"), lambda: GrammarSpec.choice([], "f"),
                 lambda: GrammarSpec.choice(["a", 3], "f"), lambda: GrammarSpec.regex("", "f")):
        with pytest.raises(InvalidRequestError) as caught:
            make()
        assert caught.value.param == "f"


def test_grammars_are_cached_by_schema(engine):
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]}
    before = engine.grammars.compilations
    first = engine.grammars.compile(GrammarSpec.json_schema(schema, "a"))
    again = engine.grammars.compile(GrammarSpec.json_schema(dict(schema), "b"))
    assert engine.grammars.compilations == before + 1
    assert again.spec.field == "b" and first.spec.field == "a"  # errors still name each request's own field
    reordered = {"required": ["cached"], "type": "object", "properties": {"cached": {"type": "integer"}}}
    engine.grammars.compile(GrammarSpec.json_schema(reordered, "c"))  # key order orders properties: its own entry
    assert engine.grammars.compilations == before + 2


def test_batch_invariance_with_constrained_neighbours(engine, prompt, tokenizer):
    """A constrained (seeded) request and an unconstrained greedy one give the same tokens alone and crowded."""
    constrained = SamplingParams(max_tokens=60, temperature=1.0, seed=7, logprobs=2, grammar=compiled(engine, BOUNDED))
    greedy = SamplingParams(max_tokens=30, temperature=0, logprobs=2)
    other = tokenizer.encode("To be, or not to be", add_bos=True)
    alone = [asyncio.run(collect(engine, "alone-c", prompt, constrained)), asyncio.run(collect(engine, "alone-g", other, greedy))]
    neighbours = [(other, SamplingParams(max_tokens=50, temperature=1.0, seed=s, grammar=compiled(engine, SCHEMAS[s]))) for s in range(4)]
    crowded = asyncio.run(collect_all(engine, neighbours[:2] + [(prompt, constrained), (other, greedy)] + neighbours[2:]))
    assert crowded[2].choices[0] == alone[0].choices[0]
    assert crowded[3].choices[0] == alone[1].choices[0]
    validate(alone[0].choices[0].text, BOUNDED)


def test_n_choices_each_follow_the_grammar(engine, prompt):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3, n=4, grammar=compiled(engine, BOUNDED))
    result = asyncio.run(collect(engine, "n4", prompt, params))
    texts = [result.choices[i].text for i in range(4)]
    for text in texts:
        validate(text, BOUNDED)
    assert len(set(texts)) > 1  # each choice advanced its own matcher with its own tokens


def test_logprobs_are_the_models_and_stop_strings_still_cut(engine, prompt):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3, "maxItems": 3}
    grammar = compiled(engine, schema)
    full = asyncio.run(collect(engine, "lp", prompt, SamplingParams(max_tokens=30, temperature=0, logprobs=1, grammar=grammar)))
    choice = full.choices[0]
    validate(choice.text, schema)
    assert len(choice.logprobs) == len(choice.tokens) and all(lp <= 0 for lp in choice.logprobs)
    cut = asyncio.run(collect(engine, "stop", prompt, SamplingParams(max_tokens=30, temperature=0, stop=[","], grammar=grammar)))
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == choice.text.split(",")[0]


def test_running_out_of_tokens_is_length(engine, prompt):
    result = asyncio.run(collect(engine, "short", prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=0, grammar=compiled(engine, BOUNDED))))
    text = result.choices[0].text
    assert result.choices[0].finish_reason == "length" and 0 < len(text) and '{"word":"'.startswith(text)


def test_ignore_eos_with_a_grammar_is_refused(engine, prompt):
    grammar = compiled(engine, BOUNDED)
    with pytest.raises(InvalidRequestError) as caught:  # refused when the params are made
        asyncio.run(collect(engine, "eos", prompt, SamplingParams(max_tokens=5, ignore_eos=True, grammar=grammar)))
    assert caught.value.param == "ignore_eos"


def test_objects_without_additional_properties_get_only_their_declared_keys(engine, prompt):
    open_schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    grammar = compiled(engine, open_schema)
    assert json.loads(grammar.spec.source)["additionalProperties"] is False
    requests = [(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=seed, grammar=grammar)) for seed in range(4)]
    for result in asyncio.run(collect_all(engine, requests)):
        assert list(json.loads(result.choices[0].text)) == ["a"]
    all_of = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "integer"}}}]}
    assert "additionalProperties" not in GrammarSpec.json_schema(all_of, "f").source  # closing a branch would forbid the other's key
