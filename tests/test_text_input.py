"""Text that is not Unicode (a lone UTF-16 surrogate, legal in JSON) in every text field of every route.

The rule (server/text_rules.py): a 400 naming the field, never a 500.
A property test sends arbitrary code points, surrogates included, through
each field and checks the rule and that valid text is never a 5xx.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.text_rules import first_surrogate, unencodable_text_path

Body = Callable[[str, str], dict[str, Any]]  # (model id, text) -> a request body with `text` in one field


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **fields}


def completion(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hi", "max_tokens": 1, **fields}


def ollama(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "stream": False, "options": {"num_predict": 1}, **fields}


# (route, param the 400 must name, body builder): every text field a route reads, and an unknown one.
TEXT_FIELDS: list[tuple[str, str, Body]] = [
    ("/v1/chat/completions", "model", lambda m, t: chat(t)),
    ("/v1/chat/completions", "messages[0].content", lambda m, t: chat(m, messages=[{"role": "user", "content": t}])),
    ("/v1/chat/completions", "messages[0].content[0].text",
     lambda m, t: chat(m, messages=[{"role": "user", "content": [{"type": "text", "text": t}]}])),
    ("/v1/chat/completions", "messages[1].role",
     lambda m, t: chat(m, messages=[{"role": "user", "content": "a"}, {"role": t, "content": "b"}])),
    ("/v1/chat/completions", "messages[0].name", lambda m, t: chat(m, messages=[{"role": "user", "content": "a", "name": t}])),
    ("/v1/chat/completions", "stop", lambda m, t: chat(m, stop=t)),
    ("/v1/chat/completions", "stop[0]", lambda m, t: chat(m, stop=[t])),
    ("/v1/chat/completions", "user", lambda m, t: chat(m, user=t)),
    ("/v1/chat/completions", "unknown_field", lambda m, t: chat(m, unknown_field=t)),
    ("/v1/completions", "model", lambda m, t: completion(t)),
    ("/v1/completions", "prompt", lambda m, t: completion(m, prompt=t)),
    ("/v1/completions", "prompt[1]", lambda m, t: completion(m, prompt=["a", t])),
    ("/v1/completions", "stop", lambda m, t: completion(m, stop=t)),
    ("/v1/completions", "suffix", lambda m, t: completion(m, suffix=t)),
    ("/api/chat", "model", lambda m, t: ollama(t, messages=[{"role": "user", "content": "hi"}])),
    ("/api/chat", "messages[0].content", lambda m, t: ollama(m, messages=[{"role": "user", "content": t}])),
    ("/api/chat", "messages[0].role", lambda m, t: ollama(m, messages=[{"role": t, "content": "hi"}])),
    ("/api/chat", "options.stop[0]",
     lambda m, t: ollama(m, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1, "stop": [t]})),
    ("/api/generate", "model", lambda m, t: ollama(t, prompt="hi")),
    ("/api/generate", "prompt", lambda m, t: ollama(m, prompt=t)),
    ("/api/generate", "prompt", lambda m, t: ollama(m, prompt=t, raw=True)),
    ("/api/generate", "system", lambda m, t: ollama(m, prompt="hi", system=t)),
    ("/api/generate", "template", lambda m, t: ollama(m, prompt="hi", template=t)),
    ("/api/show", "model", lambda m, t: {"model": t}),
    ("/api/show", "name", lambda m, t: {"name": t}),
    ("/tokenize", "prompt", lambda m, t: {"prompt": t}),
    ("/tokenize", "model", lambda m, t: {"model": t, "prompt": "hi"}),
    ("/tokenize", "messages[0].content", lambda m, t: {"messages": [{"role": "user", "content": t}]}),
    ("/detokenize", "model", lambda m, t: {"model": t, "tokens": [1]}),
]
FIELD_IDS = [f"{route}:{param}" + (":raw" if "raw" in str(body("m", "t")) else "") for route, param, body in TEXT_FIELDS]




def post_raw_json(http, route: str, body: dict[str, Any]):
    """POST with \\uXXXX escapes (ensure_ascii): the only way to put a lone surrogate on the wire."""
    return http.post(route, content=json.dumps(body).encode("ascii"), headers={"Content-Type": "application/json"})


def error_param(route: str, answer: dict[str, Any]) -> str | None:
    return None if route.startswith("/api/") else answer["error"]["param"]


def error_message(answer: dict[str, Any]) -> str:
    error = answer["error"]
    return error if isinstance(error, str) else error["message"]


@pytest.mark.parametrize(("route", "param", "body"), TEXT_FIELDS, ids=FIELD_IDS)
def test_lone_surrogate_is_400_naming_the_field(http, server, caplog, route, param, body):
    with caplog.at_level(logging.ERROR, logger="hearth.server"):
        response = post_raw_json(http, route, body(server.model_id, "\ud800 x"))
    assert response.status_code == 400, response.text
    answer = response.json()
    assert error_message(answer).startswith(f"{param}: ") and "surrogate" in error_message(answer)
    assert error_param(route, answer) in (param, None)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback in the log


def test_surrogate_in_an_object_key_is_named_encodably(http, server):
    response = post_raw_json(http, "/v1/chat/completions", chat(server.model_id, options={"\udfff": 1}))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "options.\\udfff"


text_with_surrogates = st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=12)


@pytest.mark.parametrize(("route", "param", "body"), TEXT_FIELDS, ids=FIELD_IDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_with_surrogates)
def test_any_code_points_in_any_text_field(http, server, route, param, body, text):
    """Never a 5xx; a surrogate anywhere in the field is a 400 naming it; valid text passes the text rule."""
    response = post_raw_json(http, route, body(server.model_id, text))
    assert response.status_code < 500, response.text
    received = json.loads(json.dumps(text))  # a high + low surrogate pair on the wire is one character
    mentions_surrogate = response.status_code == 400 and "surrogate" in error_message(response.json())
    assert mentions_surrogate == (first_surrogate(received) is not None), (text, response.text)
    if mentions_surrogate:
        assert error_message(response.json()).startswith(f"{param}: ")


def test_path_finder_walks_values_keys_and_lists():
    assert unencodable_text_path({"a": [1, "ok", {"b": "\udc00"}]}) == "a[2].b"
    assert unencodable_text_path({"a": ["ok"], "b": {"c": 1.5}}) is None
    assert unencodable_text_path("\ud800") == "body"
    assert re.fullmatch(r"k\\ud83d", unencodable_text_path({"k\ud83d": 1}))
    assert unencodable_text_path({"emoji": "\U0001f600 fine"}) is None
