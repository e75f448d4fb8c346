"""Operations: settings, API key, CORS, /metrics, access log, `hearth chat`, `hearth bench`, SIGTERM.

Everything runs against the real app and engine on the tiny checkpoint
(tests/server_fixtures.py), except the settings tests, which need no server.
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.errors import HearthError
from server.settings import ServerSettings, SettingsError, add_settings_arguments, load_settings, settings_from_args
from tests.server_fixtures import running_server

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-0123456789"


def chat_body(model: str, content: str = "Hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus-client's own parser."""
    response = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


# ---------------------------------------------------------------------------------------- settings


def parse_flags(*flags: str) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(list(flags)))


def test_settings_defaults_are_a_local_server(monkeypatch):
    for name in list(os.environ):
        if name.startswith("HEARTH_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert (settings.host, settings.port, settings.api_key, settings.cors_origins) == ("127.0.0.1", 8080, None, [])
    assert settings.model_entries() == [("default", Path("weights/default"))]


def test_settings_env_then_flags_take_precedence(monkeypatch):
    monkeypatch.setenv("HEARTH_PORT", "9001")
    monkeypatch.setenv("HEARTH_MODELS", "weights/a, other=weights/b")
    monkeypatch.setenv("HEARTH_CORS_ORIGINS", '["http://a.example", "http://b.example"]')
    monkeypatch.setenv("HEARTH_ENABLE_PREFIX_CACHING", "false")
    from_env = load_settings()
    assert from_env.port == 9001 and from_env.cors_origins == ["http://a.example", "http://b.example"]
    assert from_env.model_entries() == [("a", Path("weights/a")), ("other", Path("weights/b"))]
    assert from_env.enable_prefix_caching is False
    flagged = parse_flags("--port", "9002", "--model", "x/one", "--model", "x/two,x/three", "--enable-prefix-caching")
    assert flagged.port == 9002 and flagged.models == ["x/one", "x/two", "x/three"]
    assert flagged.enable_prefix_caching is True
    assert flagged.cors_origins == ["http://a.example", "http://b.example"]  # not given as a flag: env shows through


def test_settings_never_show_the_api_key(monkeypatch):
    monkeypatch.setenv("HEARTH_API_KEY", KEY)
    settings = load_settings()
    assert settings.api_key.get_secret_value() == KEY
    for text in (settings.describe(), repr(settings), str(settings.model_dump())):
        assert KEY not in text
    assert "api_key = set" in settings.describe()
    assert load_settings(api_key="").api_key is None  # an empty variable means no key


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "http"], "setting port (--port / HEARTH_PORT)"),
        (["--port", "70000"], "setting port (--port / HEARTH_PORT): Input should be less than or equal to 65535"),
        (["--dtype", "float16"], "setting dtype (--dtype / HEARTH_DTYPE): Value error, must be auto, bfloat16 or float32"),
        (["--log-level", "loud"], "setting log_level (--log-level / HEARTH_LOG_LEVEL)"),
        (["--max-num-seqs", "0"], "setting max_num_seqs (--max-num-seqs / HEARTH_MAX_NUM_SEQS)"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_flag_and_variable(flags, message):
    with pytest.raises(SettingsError) as error:
        parse_flags(*flags)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_duplicate_model_ids_are_refused():
    with pytest.raises(SettingsError, match="model id 'default' is used twice"):
        load_settings(models=["weights/default", "elsewhere/default"]).model_entries()


# ---------------------------------------------------------------------------------------- API key, CORS


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """One server for this module: an API key, one CORS origin, and two decode slots (so queueing shows)."""
    with running_server(tiny_model_dir, api_key=KEY, cors_origins=["http://ui.example"], max_num_seqs=2) as running:
        yield running


@pytest.fixture
def keyed_env(monkeypatch):
    monkeypatch.setenv("HEARTH_API_KEY", KEY)  # what `hearth chat` and `hearth bench` read


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/api/chat"), ("GET", "/api/tags"),
     ("GET", "/metrics"), ("POST", "/tokenize")],
)
def test_api_key_guards_every_route(server, method, path):
    for headers, provided in (({}, False), ({"Authorization": "Bearer wrong"}, True), ({"Authorization": KEY}, True)):
        response = httpx.request(method, server.url + path, headers=headers, json={})
        assert response.status_code == 401, (path, headers)
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert ("Incorrect" in error["message"]) == provided
        assert response.headers["www-authenticate"] == "Bearer"


def test_api_key_admits_the_right_key_and_leaves_health_and_page_public(server):
    auth = AUTH
    assert httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
    reply = httpx.post(server.url + "/v1/chat/completions", headers=auth, json=chat_body("tiny", max_tokens=3), timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.url + "/health").status_code == 200
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>Hearth</title>" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200


def test_openai_sdk_sees_an_authentication_error(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list().data[0].id == "tiny"


def test_api_key_compared_in_constant_time(server, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sk-test-01234567xx"})
    assert compared == [(b"sk-test-01234567xx", KEY.encode())]


def test_cors_answers_configured_origins_only(server):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    answer = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://ui.example"
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    refused = httpx.get(server.url + "/v1/models", headers={"Origin": "http://ui.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://ui.example"
    stranger = httpx.options(server.url + "/v1/models", headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in stranger.headers


# ---------------------------------------------------------------------------------------- metrics, access log


def stream_chat(url: str, body: dict, headers: dict | None = None) -> tuple[list[dict], httpx.Headers]:
    chunks = []
    headers = {**AUTH, **(headers or {})}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return chunks, response.headers


def test_metrics_count_requests_tokens_and_latencies(server):
    before = scrape(server.url)
    body = chat_body("tiny", "Count my tokens", max_tokens=12, ignore_eos=True, stream=True,
                     stream_options={"include_usage": True})
    chunks, _ = stream_chat(server.url, body)
    usage = chunks[-1]["usage"]
    assert httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={"model": "nope", "messages": []}).status_code in (400, 404)
    after = scrape(server.url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    model = {"model": "tiny"}
    assert delta("hearth_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert delta("hearth_http_requests_total", route="/v1/chat/completions", method="POST", status="404") + \
        delta("hearth_http_requests_total", route="/v1/chat/completions", method="POST", status="400") == 1
    assert delta("hearth_prompt_tokens_total", **model) == usage["prompt_tokens"]
    assert delta("hearth_generation_tokens_total", **model) == usage["completion_tokens"] == 12
    assert delta("hearth_time_to_first_token_seconds_count", **model) == 1
    assert delta("hearth_inter_token_latency_seconds_count", **model) == 11  # 12 tokens: 11 gaps
    assert delta("hearth_request_finished_total", reason="length", **model) == 1
    assert after[("hearth_time_to_first_token_seconds_sum", (("model", "tiny"),))] > 0


def test_metrics_engine_gauges_follow_the_engine(server):
    stats = server.engine.stats()
    samples = scrape(server.url)
    labels = (("model", "tiny"),)
    assert samples[("hearth_num_requests_waiting", labels)] == stats.num_waiting == 0
    assert samples[("hearth_num_requests_running", labels)] == stats.num_running == 0
    used, free = samples[("hearth_kv_cache_blocks_used", labels)], samples[("hearth_kv_cache_blocks_free", labels)]
    assert used + free == stats.kv_blocks_total and used == stats.kv_blocks_used


def test_metrics_show_prefix_cache_hits(server):
    key = ("hearth_prefix_cache_hit_tokens_total", (("model", "tiny"),))
    before = scrape(server.url)[key]
    prompt = "The same long prompt, again and again, so its blocks are cached. " * 3
    for _ in range(2):
        httpx.post(server.url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=30)
    assert scrape(server.url)[key] - before >= 16  # at least one full 16-token block reused


def test_metrics_show_running_and_waiting_requests(server):
    done = threading.Event()

    def occupy() -> None:  # a long stream, dropped (and so cancelled) once the test has seen enough
        body = {"model": "tiny", "prompt": "busy", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as response:
            for _ in response.iter_lines():
                if done.is_set():
                    return

    threads = [threading.Thread(target=occupy) for _ in range(4)]
    for thread in threads:
        thread.start()
    labels = (("model", "tiny"),)
    seen = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (2, 2) not in seen:
        samples = scrape(server.url)
        seen.add((samples[("hearth_num_requests_running", labels)], samples[("hearth_num_requests_waiting", labels)]))
    done.set()
    for thread in threads:
        thread.join()
    assert (2, 2) in seen  # two decoding (max_num_seqs=2), two queued behind them
    assert _wait(lambda: server.engine.stats().num_running == 0)  # the dropped streams were cancelled


def _wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_access_log_line_per_request(server, caplog):
    caplog.set_level(logging.INFO, logger="hearth.access")
    body = chat_body("tiny", max_tokens=5, ignore_eos=True, stream=True)
    _, headers = stream_chat(server.url, body, headers={"X-Request-Id": "trace-42"})
    assert headers["x-request-id"] == "trace-42"
    def access_line() -> dict | None:  # written when the response ends, which may be after the client read it all
        records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hearth.access"]
        return next((r for r in records if r["request_id"] == "trace-42"), None)

    assert _wait(lambda: access_line() is not None)
    line = access_line()
    assert line["event"] == "request" and line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["status"] == 200 and line["model"] == "tiny"
    assert line["completion_tokens"] == 5 and line["prompt_tokens"] > 0 and line["finish_reasons"] == ["length"]
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    fresh = httpx.get(server.url + "/health").headers["x-request-id"]  # public route
    assert len(fresh) == 32 and fresh != "trace-42"  # generated when the client sends none


# ---------------------------------------------------------------------------------------- hearth chat


def run_cli(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    from cli.main import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_session_streams_and_keeps_the_conversation(server):
    from clients.chat import ChatOptions, ChatSession, make_client

    pieces: list[str] = []
    with make_client(server.url, KEY) as client:
        session = ChatSession(client, "tiny", ChatOptions(temperature=0, max_tokens=8))
        session.send("first question", pieces.append)
        first_reply = "".join(pieces)
        assert len(pieces) > 1  # written piece by piece as it streamed
        stats = session.send("second question", lambda piece: None)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first_reply
    direct = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers=AUTH, json={
        "model": "tiny", "messages": session.messages[:3], "temperature": 0, "max_tokens": 8, "top_k": 40, "top_p": 0.95,
    }).json()
    assert session.messages[3]["content"] == direct["choices"][0]["message"]["content"]  # history went along
    assert stats.completion_tokens == direct["usage"]["completion_tokens"]


def test_hearth_chat_command_multi_turn_from_piped_stdin(server, keyed_env, monkeypatch, capsys):
    code, out, err = run_cli(["chat", "--url", server.url, "--temperature", "0", "--max-tokens", "4"],
                             "hello\n\n/new\nagain\n/quit\nnever sent\n", monkeypatch, capsys)
    assert code == 0 and err == ""
    assert "(new conversation)" in out and "never sent" not in out


def test_hearth_chat_errors_are_one_line(server, keyed_env, monkeypatch, capsys):
    code, _, err = run_cli(["chat", "--url", server.url, "--model", "missing"], "", monkeypatch, capsys)
    assert code == 1 and err == "error: --model missing: the server has tiny\n"
    code, _, err = run_cli(["chat", "--url", "http://127.0.0.1:9"], "", monkeypatch, capsys)
    assert code == 1 and err.startswith("error: cannot reach the server at http://127.0.0.1:9") and err.count("\n") == 1
    # A server-side refusal mid-session is reported and the session goes on.
    code, out, err = run_cli(["chat", "--url", server.url, "--max-tokens", "100000"], "hi\n", monkeypatch, capsys)
    assert code == 0 and err.startswith("error: server answered 400: ") and "context length" in err


def test_hearth_chat_needs_the_key(server, monkeypatch, capsys):
    monkeypatch.delenv("HEARTH_API_KEY", raising=False)
    code, _, err = run_cli(["chat", "--url", server.url], "", monkeypatch, capsys)
    assert code == 1 and "use --api-key or HEARTH_API_KEY" in err
    monkeypatch.setenv("HEARTH_API_KEY", KEY)
    code, out, err = run_cli(["chat", "--url", server.url, "--max-tokens", "2"], "hi\n", monkeypatch, capsys)
    assert code == 0 and err == ""


# ---------------------------------------------------------------------------------------- hearth bench


def test_percentile_is_nearest_rank():
    from clients.loadbench import percentile

    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (50, 99, 100)] == [50.0, 99.0, 100.0]
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_hearth_bench_against_the_server(server, keyed_env, monkeypatch, capsys):
    key = ("hearth_prompt_tokens_total", (("model", "tiny"),))
    before = scrape(server.url).get(key, 0.0)  # absent until the first request
    code, out, _ = run_cli(["bench", "--url", server.url, "--concurrency", "1,3", "--requests", "4",
                            "--prompt-tokens", "10", "--max-tokens", "6", "--json"], "", monkeypatch, capsys)
    assert code == 0
    reports = json.loads(out)
    assert [r["concurrency"] for r in reports] == [1, 3]
    for report in reports:
        assert report["requests"] == 4 and report["errors"] == 0
        assert report["output_tokens_per_s"] > 0 and report["requests_per_s"] > 0
        assert 0 < report["ttft_p50_ms"] <= report["ttft_p99_ms"]
        assert 0 <= report["itl_p50_ms"] <= report["itl_p99_ms"]  # chunks read together are ~0 ms apart
    # Exact prompt lengths: 2 levels x (4 requests + 1 warm-up) x 10 tokens.
    assert scrape(server.url)[key] - before == 2 * 5 * 10
    code, out, _ = run_cli(["bench", "--url", server.url, "--concurrency", "2", "--requests", "2",
                            "--prompt-tokens", "4", "--max-tokens", "2"], "", monkeypatch, capsys)
    assert code == 0 and "| clients | requests | req/s | output tok/s |" in out


def test_hearth_bench_reports_errors(server, keyed_env, monkeypatch, capsys):
    code, out, _ = run_cli(["bench", "--url", server.url, "--concurrency", "1", "--requests", "1",
                            "--prompt-tokens", "300", "--max-tokens", "4"], "", monkeypatch, capsys)
    assert code == 1  # a 300-token prompt overflows the 256-token context: the warm-up fails
    code, _, err = run_cli(["bench", "--url", server.url, "--concurrency", "0"], "", monkeypatch, capsys)
    assert code == 1 and "--concurrency 0: every level must be at least 1" in err


# ---------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_finishes_running_streams_then_exits_zero(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "HEARTH_API_KEY": KEY, "HEARTH_KV_CACHE_BLOCKS": "64", "HEARTH_DTYPE": "float32"}
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--shutdown-timeout", "20"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        _wait_healthy(url, process)
        received: list[dict] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = chat_body("tiny", max_tokens=60, ignore_eos=True, stream=True, stream_options={"include_usage": True})
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        received.append(json.loads(line[6:]))
                        first_chunk.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first_chunk.wait(20)
        process.send_signal(signal.SIGTERM)
        client.join(30)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert received[-1]["usage"]["completion_tokens"] == 60  # the running stream was allowed to finish
    assert "api_key = set" in output and KEY not in output  # settings printed once, without the secret
    assert output.count("settings:") == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"hearth serve exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.ConnectError:
            pass
        time.sleep(0.1)
    raise AssertionError("hearth serve never became healthy")
