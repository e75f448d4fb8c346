"""The OpenAPI document describes the API the server really has, and a fuzzer holds it to that.

The fuzz run is schemathesis over every operation (30 examples each, its
checks but `positive_data_acceptance`, which cannot know the rules between
fields: `top_logprobs` needs `logprobs`, a model must exist, a prompt must fit
the context). The model has a 32-token context, so no generated request can
run long, and the server has an API key, so the 401s are checked too.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from model.checkpoint import save_checkpoint
from tests.conftest import make_tiny_model
from tests.server_fixtures import running_server

KEY = "fuzz-key"
MODEL = "short"  # the checkpoint folder's name
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("fuzz") / MODEL
    save_checkpoint(path, make_tiny_model(tokenizer, max_seq_len=32), tokenizer)
    with running_server(path, api_key=KEY, kv_cache_blocks=64, models_dir=str(path.parent)) as running:
        yield running


@pytest.fixture(scope="module")
def document(fuzz_server):
    response = httpx.get(fuzz_server.url + "/openapi.json", headers=AUTH)
    assert response.status_code == 200
    return response.json()


POST_ROUTES = {
    "/v1/chat/completions": ("ChatCompletionRequest", "text/event-stream", "OpenAIError"),
    "/v1/completions": ("CompletionRequest", "text/event-stream", "OpenAIError"),
    "/api/chat": ("ChatRequest", "application/x-ndjson", "OllamaError"),
    "/api/generate": ("GenerateRequest", "application/x-ndjson", "OllamaError"),
    "/api/show": ("ShowRequest", None, "OllamaError"),
    "/tokenize": ("TokenizeRequest", None, "OpenAIError"),
    "/detokenize": ("DetokenizeRequest", None, "OpenAIError"),
    "/v1/embeddings": ("EmbeddingsRequest", None, "OpenAIError"),
    "/api/embed": ("OllamaEmbedRequest", None, "OllamaError"),
    "/api/embeddings": ("OllamaEmbeddingsRequest", None, "OllamaError"),
}


@pytest.mark.parametrize("path", POST_ROUTES)
def test_post_routes_publish_their_request_answers_and_errors(document, path):
    model, stream, error_shape = POST_ROUTES[path]
    operation = document["paths"][path]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{model}"} and operation["requestBody"]["required"]
    assert "model" in document["components"]["schemas"][model]["properties"]
    responses = operation["responses"]
    assert "422" not in responses
    ok_types = set(responses["200"]["content"])
    assert ok_types == {"application/json", *([stream] if stream else [])}
    errors = {"400", "401", "404", "413", "503"} | ({"429"} if stream else set())
    assert errors <= set(responses)
    for status in errors - {"401"}:
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith(error_shape)
    assert responses["401"]["content"]["application/json"]["schema"]["$ref"].endswith("OpenAIError")


def test_error_shapes_are_the_ones_sent(document):
    schemas = document["components"]["schemas"]
    assert schemas["OllamaError"]["properties"] == {"error": {"title": "Error", "type": "string"}}
    detail = schemas["OpenAIErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("TRACE", "/v1/chat/completions", "POST"),
    ("PUT", "/api/generate", "POST"),
    ("DELETE", "/v1/models", "GET"),
    ("TRACE", "/health", "GET"),
])
def test_unsupported_methods_are_405_with_allow(fuzz_server, method, path, allowed):
    response = httpx.request(method, fuzz_server.url + path, headers=AUTH)
    assert response.status_code == 405 and allowed in response.headers["allow"], (response, response.headers)
    error = response.json()["error"]
    assert (error if path.startswith("/api/") else error["message"]) == f"method {method} not allowed"


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", headers=AUTH)


def naming_the_served_model(case):
    """A schema-valid case about the model that exists (random names only reach the 404), so answers are generated."""
    if isinstance(case.body, dict) and ("model" in case.body or case.operation.path != "/api/show"):
        case.body["model"] = MODEL
    if case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = MODEL
    return case


OPERATIONS = [("POST", path) for path in POST_ROUTES] + [
    ("GET", path) for path in ("/health", "/v1/models", "/v1/models/{model_id}", "/api/tags", "/api/ps", "/api/version")
] + [("POST", "/api/create"), ("POST", "/api/copy"), ("DELETE", "/api/delete")]  # model management (/api/pull is a 501)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_fuzzed_requests_get_documented_answers_and_never_a_5xx(api_schema, method, path):
    """Schema-valid and schema-violating requests (schemathesis' generators); every check but one on each answer."""
    operation = api_schema[path][method]
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    cases = st.one_of(positive, positive.map(naming_the_served_model), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def fuzz(case):
        case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance], timeout=30)

    fuzz()
