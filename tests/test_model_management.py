"""Model management: --models-dir, on-demand loading, keep-alive, /api/ps, /api/create, /api/copy, /api/delete.

Every server here runs `create_app(settings=...)` with `--models-dir` on a
temporary weights folder of tiny random checkpoints written by the test (the
real engine, float32, so greedy outputs are exact), and is driven through
HTTP: the `ollama` client where it has the call, httpx for status codes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from pathlib import Path

import httpx
import ollama
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.gguf_export import export_gguf
from server import registry as registry_module
from server.app import create_app
from server.keep_alive import parse_keep_alive
from server.ollama.model_store import MERGED_DIR, STORE_FILE
from server.settings import SettingsError, load_settings
from tests.conftest import make_tiny_model
from tests.server_fixtures import (
    TEST_ENGINE_SETTINGS,
    http_client,
    ollama_client,
    reference_tokens,
    serve_app,
    wait_until_ready,
)
from trainer.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

GREEDY = {"temperature": 0, "num_predict": 6}
FAR_FUTURE_YEAR = "9999"


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tokenizer) -> Path:
    """alpha and beta (different weights), family/gamma (nested), delta.gguf, an adapter for alpha, a non-model folder."""
    root = tmp_path_factory.mktemp("weights")
    save_checkpoint(root / "alpha", make_tiny_model(tokenizer, seed=0), tokenizer)
    save_checkpoint(root / "beta", make_tiny_model(tokenizer, seed=1), tokenizer)
    save_checkpoint(root / "family" / "gamma", make_tiny_model(tokenizer, seed=2), tokenizer)
    export_gguf(root / "beta", root / "delta.gguf")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    write_adapter(root / "adapters" / "alpha-lora", root / "alpha")
    save_checkpoint(root / "broken", make_tiny_model(tokenizer, seed=4), tokenizer)
    weights_file = root / "broken" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # config.json fine, weights truncated
    return root


def write_adapter(folder: Path, base_dir: Path) -> None:
    base = load_checkpoint(base_dir)
    config = LoRAConfig(rank=4, alpha=8, targets=("q", "v", "up"))
    apply_lora(base.model, config, seed=3)  # A from a fixed seed: the test does not depend on the tests before it
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in lora_modules(base.model).values():  # B large enough to change greedy tokens
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=generator) * 2.0)
    save_adapter(folder, base.model, config, base_dir, base.metadata)


@pytest.fixture(scope="module", autouse=True)
def gguf_cache(tmp_path_factory):
    """GGUF imports go to a temporary cache, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEARTH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@contextlib.contextmanager
def models_server(weights: Path, **settings):
    app = create_app(settings=load_settings(models_dir=str(weights), **{**TEST_ENGINE_SETTINGS, **settings}))
    with serve_app(app) as url:
        wait_until_ready(url)
        with http_client(url) as http:
            yield app, url, http


@pytest.fixture(scope="module")
def running(weights):
    with models_server(weights) as served:
        yield served


@pytest.fixture(scope="module")
def http(running):
    return running[2]


@pytest.fixture(scope="module")
def client(running) -> ollama.Client:
    return ollama_client(running[1])


def ps_names(http: httpx.Client) -> dict[str, str]:
    return {m["name"]: m["expires_at"] for m in http.get("/api/ps").json()["models"]}


def generate(http: httpx.Client, model: str, prompt: str = "to be or not", **fields) -> dict:
    answer = http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False,
                                              "options": GREEDY, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def prompt_ids(answer: dict) -> list[int]:
    """The prompt the engine saw: /api/generate's context minus the generated tokens."""
    return answer["context"][:answer["prompt_eval_count"]]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


def on_loop(app, coroutine):
    """Run a registry coroutine on the server's event loop (as the request middleware does)."""
    registry = app.state.registry
    return asyncio.run_coroutine_threadsafe(coroutine, registry.loop).result(timeout=60)


# ----------------------------------------------------------------------------- catalog and on-demand loading


def test_models_dir_lists_every_model_and_loads_none_at_start(http, client):
    assert http.get("/health").json()["status"] == "ok"
    listed = {m.model: m for m in client.list().models}
    assert {"alpha:latest", "beta:latest", "family/gamma:latest", "delta:latest"} <= set(listed)
    assert not any(name.startswith(("notes", "adapters", ".")) for name in listed)  # no model, adapter, store
    assert listed["alpha:latest"].details.parameter_size.endswith("M")
    assert listed["delta:latest"].details.parameter_size == listed["beta:latest"].details.parameter_size
    assert ps_names(http) == {}
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert {"alpha", "beta", "family/gamma", "delta"} <= set(cards)
    assert cards["alpha"]["max_model_len"] == cards["delta"]["max_model_len"] > 0 and cards["alpha"]["compute"] is None
    assert http.get("/v1/models/alpha").json()["max_model_len"] == cards["alpha"]["max_model_len"]
    assert ps_names(http) == {}  # listing loads nothing


def test_first_request_loads_the_model_and_says_so(http, weights, tokenizer):
    first = generate(http, "family/gamma")
    assert first["total_duration"] > first["load_duration"] > 0
    again = generate(http, "family/gamma")
    assert again["load_duration"] == 0
    expected = reference_tokens(weights / "family" / "gamma", prompt_ids(first), 6, tuple(tokenizer.stop_ids))
    assert first["context"][first["prompt_eval_count"]:] == expected  # that checkpoint's greedy tokens
    assert "family/gamma:latest" in ps_names(http)


def test_gguf_file_in_the_folder_is_served(http, weights, tokenizer):
    answer = generate(http, "delta")
    assert answer["load_duration"] > 0
    assert answer["context"] == generate(http, "beta")["context"]  # an f32 export of beta: the same tokens


def test_a_checkpoint_that_fails_to_load_is_one_error_and_the_rest_keep_serving(http):
    for _ in range(2):  # not cached as loaded, not left half-loaded
        answer = http.post("/api/generate", json={"model": "broken", "prompt": "x", "stream": False})
        assert answer.status_code == 500 and "model.safetensors" in answer.json()["error"]
        assert "Traceback" not in answer.text
    assert "broken:latest" not in ps_names(http)
    assert generate(http, "alpha")["done"]


def test_unknown_model_is_404_and_pull_is_501(http, client):
    missing = http.post("/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    openai_missing = http.post("/v1/chat/completions", json=chat)
    assert openai_missing.status_code == 404
    pulled = http.post("/api/pull", json={"model": "llama3"})
    assert pulled.status_code == 501 and "files" in pulled.json()["error"]
    with pytest.raises(ollama.ResponseError):
        client.pull("llama3")


# ----------------------------------------------------------------------------- keep-alive


def test_keep_alive_expires_an_idle_model_and_the_next_request_reloads(http):
    generate(http, "beta", keep_alive="1s")
    expires = ps_names(http)["beta:latest"]
    assert not expires.startswith(FAR_FUTURE_YEAR)
    wait_for(lambda: "beta:latest" not in ps_names(http), timeout=10)
    assert generate(http, "beta")["load_duration"] > 0


def test_keep_alive_zero_unloads_right_after_the_request(http, client):
    answer = client.generate(model="alpha", prompt="hello", options=GREEDY, keep_alive=0)
    assert answer.done
    wait_for(lambda: "alpha:latest" not in ps_names(http), timeout=5)


def test_unload_request_without_prompt(http, client):
    generate(http, "alpha")
    assert "alpha:latest" in ps_names(http)
    answer = client.generate(model="alpha", keep_alive=0)
    assert answer.done_reason == "unload"
    wait_for(lambda: "alpha:latest" not in ps_names(http), timeout=5)


def test_keep_alive_minus_one_never_expires(weights):
    with models_server(weights, keep_alive="1s") as (app, url, http):
        generate(http, "alpha")  # the server's --keep-alive: 1 s
        generate(http, "beta", keep_alive=-1)
        assert ps_names(http)["beta:latest"].startswith(FAR_FUTURE_YEAR)
        wait_for(lambda: "alpha:latest" not in ps_names(http), timeout=10)
        time.sleep(0.5)
        assert "beta:latest" in ps_names(http)


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("60", 60.0), (2.5, 2.5), (0, 0.0), ("0", 0.0),
    (-1, None), ("-1", None), ("-5m", None), (1e300, None),
])
def test_keep_alive_durations(value, seconds):
    assert parse_keep_alive(value, "keep_alive") == seconds


def test_bad_keep_alive_is_400(http):
    answer = http.post("/api/generate", json={"model": "alpha", "prompt": "x", "keep_alive": "soon"})
    assert answer.status_code == 400 and "keep_alive" in answer.json()["error"]
    assert http.post("/api/chat", json={"model": "alpha", "messages": [], "keep_alive": True}).status_code == 400
    with pytest.raises(SettingsError, match="keep_alive"):
        load_settings(models_dir=".", keep_alive="5 minutes")


def test_an_idle_timer_never_unloads_a_model_with_running_requests(running):
    app, _, http = running
    registry = app.state.registry
    generate(http, "alpha")
    lease = on_loop(app, registry.acquire("alpha"))  # a request still running, as the middleware holds it
    registry.loop.call_soon_threadsafe(registry.expire_now, "alpha")  # keep_alive 0 from another client
    time.sleep(0.5)
    assert "alpha:latest" in ps_names(http)
    registry.loop.call_soon_threadsafe(registry.release, lease)
    wait_for(lambda: "alpha:latest" not in ps_names(http), timeout=5)


# ----------------------------------------------------------------------------- concurrency and the loaded-model limit


def test_requests_arriving_while_a_model_loads_wait_for_that_one_load(weights, monkeypatch):
    loads = []
    real_load = registry_module.load_engine

    def slow_load(path, settings):
        loads.append(path)
        time.sleep(1.0)
        return real_load(path, settings)

    monkeypatch.setattr(registry_module, "load_engine", slow_load)
    with models_server(weights) as (app, url, http):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: generate(http, "alpha"), range(4)))
        assert len(loads) == 1
        assert all(answer["load_duration"] > 0.5e9 for answer in answers)  # each waited for the same load
        assert len({tuple(answer["context"]) for answer in answers}) == 1


def test_max_loaded_models_unloads_the_least_recently_used(weights):
    with models_server(weights, max_loaded_models=2) as (app, url, http):
        generate(http, "alpha")
        generate(http, "beta")
        generate(http, "alpha")  # beta is now the least recently used
        generate(http, "family/gamma")
        assert set(ps_names(http)) == {"alpha:latest", "family/gamma:latest"}


def test_a_loaded_adapter_holds_its_models_dir_base_loaded(weights):
    """keep_alive 0 and --max-loaded-models 2 would unload `alpha`; its adapter keeps it until unloaded."""
    with models_server(weights, max_loaded_models=2, keep_alive="0", weights_dir=str(weights)) as (app, url, http):
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "alpha-tuned", "base_model": "alpha",
                                                          "lora_path": "adapters/alpha-lora"})
        assert loaded.status_code == 200 and loaded.json()["parent"] == "alpha", loaded.text
        generate(http, "beta")
        generate(http, "family/gamma")
        assert "alpha:latest" in ps_names(http)
        assert generate(http, "alpha-tuned")["done"]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha-tuned"}).status_code == 200
        deadline = time.monotonic() + 10
        while "alpha:latest" in ps_names(http) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "alpha:latest" not in ps_names(http)  # the hold is given back: keep_alive 0 applies again


def test_when_every_loaded_model_is_busy_another_load_is_503(weights):
    with models_server(weights, max_loaded_models=2) as (app, url, http):
        registry = app.state.registry
        leases = [on_loop(app, registry.acquire(name)) for name in ("alpha", "beta")]
        busy = http.post("/api/generate", json={"model": "family/gamma", "prompt": "x", "stream": False})
        assert busy.status_code == 503 and busy.headers["Retry-After"]
        assert "--max-loaded-models" in busy.json()["error"]
        for lease in leases:
            registry.loop.call_soon_threadsafe(registry.release, lease)
        assert generate(http, "family/gamma")["load_duration"] > 0


def test_settings_refuse_fewer_loaded_models_than_model_entries(tiny_model_dir):
    with pytest.raises(SettingsError, match="max_loaded_models"):
        load_settings(models=[str(tiny_model_dir), f"other={tiny_model_dir}"], max_loaded_models=1)
    assert load_settings(models_dir=".").models == []  # --models-dir alone serves no default checkpoint


# ----------------------------------------------------------------------------- derived models


def test_create_with_system_changes_the_prompt_the_engine_sees(http, client):
    client.create(model="terse", from_="alpha", system="Answer in one word.")
    derived = generate(http, "terse")
    with_system = generate(http, "alpha", system="Answer in one word.")
    plain = generate(http, "alpha")
    assert prompt_ids(derived) == prompt_ids(with_system) != prompt_ids(plain)
    assert derived["context"] == with_system["context"]  # same engine, same greedy answer
    own_system = generate(http, "terse", system="Be verbose.")
    assert prompt_ids(own_system) == prompt_ids(generate(http, "alpha", system="Be verbose."))

    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat(model="terse", messages=messages, options=GREEDY)
    base_chat = client.chat(model="alpha", messages=[{"role": "system", "content": "Answer in one word."}, *messages],
                            options=GREEDY)
    assert chat.prompt_eval_count == base_chat.prompt_eval_count and chat.message.content == base_chat.message.content
    openai_usage = http.post("/v1/chat/completions", json={"model": "terse", "messages": messages, "max_tokens": 2}).json()
    assert openai_usage["usage"]["prompt_tokens"] == base_chat.prompt_eval_count


def test_create_with_parameters_sets_default_options(http, client):
    client.create(model="short", from_="alpha", parameters={"num_predict": 3, "temperature": 0})
    answer = http.post("/api/generate", json={"model": "short", "prompt": "to be", "stream": False}).json()
    assert answer["eval_count"] == 3
    base = http.post("/api/generate", json={"model": "alpha", "prompt": "to be", "stream": False,
                                            "options": {"num_predict": 3, "temperature": 0}}).json()
    assert answer["context"] == base["context"]  # temperature 0 from the model: greedy
    longer = http.post("/api/generate", json={"model": "short", "prompt": "to be", "stream": False,
                                              "options": {"num_predict": 5}}).json()
    assert longer["eval_count"] == 5  # the request's own options win
    completion = http.post("/v1/completions", json={"model": "short", "prompt": "to be"}).json()
    assert completion["usage"]["completion_tokens"] == 3  # num_predict as max_tokens on the OpenAI routes


def test_create_with_a_jinja_template_formats_the_chat(http, client, tokenizer):
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant:{% endif %}"
    client.create(model="plain", from_="alpha", template=template)
    answer = generate(http, "plain", prompt="hello")
    expected = tokenizer.encode(f"{tokenizer.info.bos_token}user: hello\nassistant:", allow_special=True)
    assert prompt_ids(answer) == expected
    assert prompt_ids(generate(http, "alpha", prompt="hello")) != expected
    assert client.show("plain").template == template


def test_a_model_derived_from_a_derived_model_keeps_its_defaults(http, client):
    client.create(model="terse", from_="alpha", system="Answer in one word.")
    client.create(model="terse-short", from_="terse", parameters={"num_predict": 2, "temperature": 0})
    answer = http.post("/api/generate", json={"model": "terse-short", "prompt": "to be", "stream": False}).json()
    assert answer["eval_count"] == 2
    assert prompt_ids(answer) == prompt_ids(generate(http, "alpha", prompt="to be", system="Answer in one word."))


def test_show_gives_a_derived_model_its_system_and_parameters(http, client):
    """`ollama show`: the SYSTEM and PARAMETER lines of the Modelfile, inherited through two derivations."""
    client.create(model="terse", from_="alpha", system="Answer in one word.")
    client.create(model="terse-short", from_="terse", parameters={"num_predict": 2, "stop": ["\n", "."]})
    shown = client.show("terse-short")
    assert http.post("/api/show", json={"model": "terse-short"}).json()["system"] == "Answer in one word."
    assert shown.parameters.splitlines() == ["num_predict 2", 'stop "\\n"', 'stop "."']
    assert 'SYSTEM """Answer in one word."""\n' in shown.modelfile and "PARAMETER num_predict 2\n" in shown.modelfile
    assert "system" not in http.post("/api/show", json={"model": "alpha"}).json()


def test_derived_models_share_the_base_engine(running, client):
    app, _, http = running
    client.create(model="terse", from_="alpha", system="Answer in one word.")
    generate(http, "alpha")
    generate(http, "terse")
    registry = app.state.registry
    assert registry.runner_of("alpha") is registry.runner_of("terse")


def test_create_from_a_path_inside_the_weights_folder(http, client, weights):
    client.create(model="from-path", from_=str(weights / "beta"))
    assert generate(http, "from-path")["context"] == generate(http, "beta")["context"]
    client.create(model="from-relative", from_="family/gamma")
    assert generate(http, "from-relative")["context"] == generate(http, "family/gamma")["context"]
    client.create(model="from-gguf", from_="delta.gguf", system="Answer in one word.")
    assert prompt_ids(generate(http, "from-gguf")) == prompt_ids(generate(http, "beta", system="Answer in one word."))


def test_create_refuses_bad_input(http, weights, tmp_path, tiny_model_dir):
    def create(**body):
        return http.post("/api/create", json={"model": "bad", "stream": False, **body})

    outside = create(**{"from": str(tiny_model_dir)})
    assert outside.status_code == 400 and "outside the weights folder" in outside.json()["error"]
    assert create(**{"from": "../" + tiny_model_dir.parent.name + "/" + tiny_model_dir.name}).status_code == 400
    assert create(**{"from": "no-such-model"}).status_code == 404
    assert create(**{"from": "notes"}).status_code == 400  # a folder that is not a checkpoint
    assert create().status_code == 400  # no from
    bad_param = create(**{"from": "alpha", "parameters": {"mirostat": 2}})
    assert bad_param.status_code == 400 and "parameters.mirostat" in bad_param.json()["error"]
    assert create(**{"from": "alpha", "parameters": {"temperature": "hot"}}).status_code == 400
    go_template = create(**{"from": "alpha", "template": "{{ .System }} {{ .Prompt }}"})
    assert go_template.status_code == 400 and "template" in go_template.json()["error"]
    assert create(**{"from": "alpha", "files": {"x.gguf": "sha256:00"}}).status_code == 400
    taken = http.post("/api/create", json={"model": "beta", "from": "alpha", "stream": False})
    assert taken.status_code == 400 and "checkpoint" in taken.json()["error"]
    outside_adapter = create(**{"from": "alpha", "adapters": {"lora": str(tmp_path)}})
    assert outside_adapter.status_code == 400
    assert "bad:latest" not in {m["name"] for m in http.get("/api/tags").json()["models"]}


def test_create_streams_progress_like_ollama(http):
    answer = http.post("/api/create", json={"model": "streamed", "from": "alpha"})
    lines = [line for line in answer.text.splitlines() if line]
    assert answer.status_code == 200 and lines[-1] == '{"status": "success"}'


def test_create_with_an_adapter_merges_it(running, http, client, weights, tokenizer, tmp_path):
    from trainer.sft import merge_adapter_folder

    client.create(model="tuned", from_="alpha", adapters={"alpha-lora": "adapters/alpha-lora"})
    tuned, base = generate(http, "tuned"), generate(http, "alpha")
    assert prompt_ids(tuned) == prompt_ids(base)
    merged = merge_adapter_folder(weights / "alpha", weights / "adapters" / "alpha-lora", tmp_path / "merged")
    expected = reference_tokens(merged, prompt_ids(tuned), 6, tuple(tokenizer.stop_ids))
    assert tuned["context"][tuned["prompt_eval_count"]:] == expected
    assert tuned["context"] != base["context"]
    assert len(list((weights / MERGED_DIR).iterdir())) == 1
    merged_key = running[0].state.registry.catalog["tuned"].key
    assert merged_key in running[0].state.registry.runners
    client.delete("tuned")
    assert not list((weights / MERGED_DIR).iterdir())  # the merged checkpoint goes with its model,
    assert merged_key not in running[0].state.registry.runners  # unloaded first


# ----------------------------------------------------------------------------- copy, delete, persistence


def test_copy_and_delete(http, client):
    client.create(model="to-copy", from_="alpha", system="Answer in one word.")
    client.copy("to-copy", "copied")
    assert prompt_ids(generate(http, "copied")) == prompt_ids(generate(http, "to-copy"))
    client.delete("to-copy")
    assert http.post("/api/generate", json={"model": "to-copy", "prompt": "x"}).status_code == 404
    assert prompt_ids(generate(http, "copied")) == prompt_ids(generate(http, "alpha", system="Answer in one word."))
    assert http.post("/api/copy", json={"source": "nope", "destination": "x"}).status_code == 404
    assert http.request("DELETE", "/api/delete", json={"model": "nope"}).status_code == 404
    refused = http.request("DELETE", "/api/delete", json={"model": "alpha"})
    assert refused.status_code == 400 and "weights folder" in refused.json()["error"]
    client.copy("alpha", "alpha-copy")  # a copy of a checkpoint can be deleted, the checkpoint stays
    client.delete("alpha-copy")
    assert generate(http, "alpha")["done"]


def test_deleting_a_model_with_running_requests_is_409(running, client):
    app, _, http = running
    registry = app.state.registry
    client.create(model="busy", from_="alpha")
    lease = on_loop(app, registry.acquire("busy"))
    refused = http.request("DELETE", "/api/delete", json={"model": "busy"})
    assert refused.status_code == 409 and "running" in refused.json()["error"]
    registry.loop.call_soon_threadsafe(registry.release, lease)
    wait_for(lambda: registry.running_requests("busy") == 0)
    client.delete("busy")


def test_made_models_survive_a_restart(weights, http, client):
    client.create(model="persisted", from_="alpha", system="Answer in one word.", parameters={"num_predict": 4})
    assert (weights / STORE_FILE).is_file()
    with models_server(weights) as (app, url, restarted):
        tags = {m["name"] for m in restarted.get("/api/tags").json()["models"]}
        assert "persisted:latest" in tags
        answer = restarted.post("/api/generate", json={"model": "persisted", "prompt": "to be", "stream": False,
                                                       "options": {"temperature": 0}}).json()
        assert answer["eval_count"] == 4
        assert prompt_ids(answer) == prompt_ids(generate(http, "alpha", prompt="to be", system="Answer in one word."))


def test_model_management_needs_a_weights_folder(tiny_model_dir):
    app = create_app(settings=load_settings(models=[str(tiny_model_dir)], **TEST_ENGINE_SETTINGS))
    with serve_app(app) as url:
        wait_until_ready(url)
        answer = httpx.post(f"{url}/api/create", json={"model": "x", "from": tiny_model_dir.name})
        assert answer.status_code == 400 and "--models-dir" in answer.json()["error"]
        ps = httpx.get(f"{url}/api/ps").json()["models"]
        assert ps[0]["expires_at"].startswith(FAR_FUTURE_YEAR)  # a --model checkpoint stays loaded
