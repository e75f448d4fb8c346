"""The web chat page at `/`, driven in headless Chromium against the real app and engine.

Uses Debian's `chromium` (or HEARTH_CHROMIUM=/path/to/chrome) through the
`playwright` package with `executable_path`, so no browser download is
needed. Skipped, saying so, only where no Chromium binary can be found.
"""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("HEARTH_CHROMIUM")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary found (apt-get install -y chromium, or set HEARTH_CHROMIUM=/path/to/chrome)",
)



@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    opened = context.new_page()
    opened.foreign_requests = []  # anything not sent to our server: the page must work offline
    opened.on("request", lambda request: None if request.url.startswith(server.url) or request.url.startswith("data:")
              else opened.foreign_requests.append(request.url))
    opened.goto(server.url + "/")
    opened.wait_for_function("document.querySelectorAll('#model option').length > 0")
    yield opened
    context.close()


def set_control(page, element_id: str, value) -> None:
    page.evaluate(
        """([id, value]) => { const el = document.getElementById(id); el.value = String(value);
                              el.dispatchEvent(new Event('input', {bubbles: true})); }""",
        [element_id, value],
    )


def watch_reply_growth(page) -> None:
    """Record the assistant text each time it changes, to tell a stream from a one-shot answer."""
    page.evaluate(
        """() => { window.replySnapshots = [];
                   new MutationObserver(() => { const node = document.querySelector('.message.assistant .content');
                       if (node && node.textContent) window.replySnapshots.push(node.textContent); })
                     .observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true}); }"""
    )


def wait_for_reply(page) -> None:
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=20_000)


def test_model_picker_lists_the_served_models(page):
    options = page.eval_on_selector_all("#model option", "nodes => nodes.map(n => n.value)")
    assert options == ["tiny"]
    assert page.foreign_requests == []


class PacedEngine:
    """The real engine, with a pause before each output: a fast local stream would otherwise reach
    the browser in one network read, and streaming could not be told from a one-shot answer."""

    def __init__(self, engine, seconds: float):
        self.engine, self.seconds = engine, seconds

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def generate(self, request):
        import asyncio

        stream = self.engine.generate(request)
        try:
            async for output in stream:
                await asyncio.sleep(self.seconds)
                yield output
        finally:
            await stream.aclose()


@pytest.fixture
def paced(server):
    served = server.app.state.registry.models[server.model_id]
    real = served.engine
    served.engine = PacedEngine(real, 0.03)
    yield
    served.engine = real


def test_message_gets_a_streamed_reply_matching_the_api(page, server, paced):
    set_control(page, "temperature", 1)
    set_control(page, "seed", 1234)
    set_control(page, "max-tokens", 24)
    watch_reply_growth(page)
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    wait_for_reply(page)

    assert page.inner_text(".message.user .content") == "Hello there"
    reply = page.inner_text(".message.assistant .content")
    snapshots = page.evaluate("window.replySnapshots")
    # Streamed: the text grew through several partial states before the last one.
    assert len(set(snapshots)) >= 8 and snapshots[-1] == reply
    assert all(reply.startswith(partial) for partial in snapshots)
    # Faithful: the same seed and settings give the same text through the plain API.
    direct = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
        "temperature": 1, "seed": 1234, "max_tokens": 24, "top_p": 0.95, "top_k": 40,
    }).json()
    assert len(set(reply)) > 3  # a real sampled reply, not one repeated character
    assert reply == direct["choices"][0]["message"]["content"]
    assert "24 tokens" in page.inner_text(".message.assistant .meta")
    assert page.is_hidden("#error")


def test_multi_turn_sends_the_history(page, server):
    set_control(page, "max-tokens", 4)
    for text in ("first", "second"):
        page.fill("#prompt", text)
        page.press("#prompt", "Enter")
        page.wait_for_function(f"document.querySelectorAll('.message.assistant:not(.streaming)').length === {1 + (text == 'second')}")
    before = server.app.state.metrics.prompt_tokens.labels("tiny")._value.get()
    page.fill("#prompt", "third")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.message.assistant:not(.streaming)').length === 3")
    prompt_tokens = server.app.state.metrics.prompt_tokens.labels("tiny")._value.get() - before
    single_turn = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "third"}]}).json()["count"]
    assert prompt_tokens > single_turn + 8  # the two earlier exchanges went along


def test_stop_button_cancels_the_stream(page, server, paced):
    set_control(page, "max-tokens", 200)  # paced: 6 s of outputs, so the stream is surely running at the click
    set_control(page, "seed", 7)
    cancelled = server.app.state.metrics.finished.labels("tiny", "cancelled")
    before = cancelled._value.get()
    # Click Stop from inside the page the moment the first text arrives, so the race is not ours.
    page.evaluate(
        """() => new MutationObserver((_, observer) => {
                const node = document.querySelector('.message.assistant .content');
                if (node && node.textContent) { observer.disconnect(); document.getElementById('stop').click(); }
            }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true})"""
    )
    assert page.is_hidden("#stop")
    page.fill("#prompt", "Tell me a long story")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant.stopped", timeout=20_000)
    assert page.is_visible("#send") and page.is_hidden("#stop")
    assert "stopped" in page.inner_text(".message.assistant .meta")
    # The server saw the disconnect and cancelled the request instead of generating 200 tokens.
    assert _wait(lambda: cancelled._value.get() > before and server.engine.stats().num_running == 0)


def test_server_error_is_shown_and_the_turn_given_back(page):
    set_control(page, "seed", "1e30")  # beyond int64: the server refuses the request with a 400
    page.fill("#prompt", "a doomed question")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])", timeout=20_000)
    message = page.inner_text("#error-text")
    assert message.startswith("Server error 400") and "seed" in message
    assert page.query_selector(".message") is None  # the failed turn was taken out...
    assert page.input_value("#prompt") == "a doomed question"  # ...and its text given back for a retry


def test_reply_length_fits_the_context(page, server):
    sent = []
    page.on("request", lambda request: sent.append(json.loads(request.post_data))
            if request.url.endswith("/v1/chat/completions") else None)
    set_control(page, "max-tokens", 100000)  # far beyond the tiny model's 256-token context
    page.fill("#prompt", "hi")
    page.press("#prompt", "Enter")
    wait_for_reply(page)
    assert page.is_hidden("#error")
    prompt = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["count"]
    assert [body["max_tokens"] for body in sent] == [256 - prompt]  # capped to what the context has left
    page.fill("#prompt", "word " * 300)  # now the conversation alone is longer than the context
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])", timeout=20_000)
    assert "fills the model's context of 256 tokens" in page.inner_text("#error-text")
    assert len(page.query_selector_all(".message.user")) == 1 and len(sent) == 1  # nothing sent for the long one


def _wait(condition, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
