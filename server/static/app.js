// Hearth chat page. Plain browser JavaScript, no framework, no build step, no CDN.
//
// Talks to the server's own OpenAI-compatible API with relative URLs, so it also works behind a
// path-prefix proxy: GET v1/models for the picker, POST v1/chat/completions with stream: true for
// replies. The stream is read with fetch + ReadableStream (EventSource cannot POST) and parsed as
// server-sent events; the Stop button aborts the fetch, which closes the connection, which makes
// the server cancel the request. Model output is inserted as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STORAGE_KEY = "hearth.settings.v1";
const SETTING_IDS = ["temperature", "top-k", "top-p", "max-tokens", "seed", "system", "api-key"];

const state = {
  messages: [],        // the conversation sent with each request: {role, content}
  controller: null,    // AbortController of the stream in flight, if any
  contextLengths: {},  // model id -> max_model_len from /v1/models (when the server says)
};

// ---- settings -------------------------------------------------------------------------------

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}"); } catch (_) { /* corrupt: defaults */ }
  for (const id of SETTING_IDS) if (saved[id] !== undefined) $(id).value = saved[id];
  return saved;
}

function saveSettings() {
  const saved = { model: $("model").value };
  for (const id of SETTING_IDS) saved[id] = $(id).value;
  try { localStorage.setItem(STORAGE_KEY, JSON.stringify(saved)); } catch (_) { /* private mode: skip */ }
}

function showSettingValues() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  $("top-p-value").textContent = Number($("top-p").value).toFixed(2);
}

function toggleSettings(open) {
  const panel = $("settings");
  panel.hidden = open === undefined ? !panel.hidden : !open;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// ---- errors ---------------------------------------------------------------------------------

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function hideError() { $("error").hidden = true; }

// The server answers errors in OpenAI's shape {error: {message}}; Ollama routes use {error: "..."}.
function errorText(body) {
  if (body && typeof body.error === "object" && body.error) return body.error.message || JSON.stringify(body.error);
  if (body && typeof body.error === "string") return body.error;
  if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  return null;
}

async function responseError(response) {
  const raw = await response.text();
  let message = raw.trim() || response.statusText;
  try { message = errorText(JSON.parse(raw)) || message; } catch (_) { /* not JSON */ }
  if (response.status === 401) {
    toggleSettings(true);
    $("api-key").focus();
    message += " Enter the server's API key under Settings.";
  }
  return new Error(`Server error ${response.status}: ${message}`);
}

// ---- models ---------------------------------------------------------------------------------

async function loadModels(preferred) {
  const picker = $("model");
  let response;
  try {
    response = await fetch("v1/models", { headers: requestHeaders() });
  } catch (err) {
    showError(`Cannot reach the server: ${err.message}`);
    return;
  }
  if (!response.ok) { showError((await responseError(response)).message); return; }
  const cards = (await response.json()).data || [];
  const models = cards.map((model) => model.id);
  for (const card of cards) if (card.max_model_len) state.contextLengths[card.id] = card.max_model_len;
  picker.replaceChildren(...models.map((id) => new Option(id, id)));
  if (models.includes(preferred)) picker.value = preferred;
  if (models.length === 0) showError("The server lists no models (GET /v1/models is empty).");
  else hideError();
  updateButtons();
}

// ---- conversation view ----------------------------------------------------------------------

function addMessage(role, text) {
  $("empty").hidden = true;
  const node = document.createElement("div");
  node.className = `message ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  node.append(content);
  $("conversation").append(node);
  scrollToEnd();
  return node;
}

function setMeta(node, text) {
  let meta = node.querySelector(".meta");
  if (!meta) { meta = document.createElement("div"); meta.className = "meta"; node.append(meta); }
  meta.textContent = text;
}

function scrollToEnd() {
  const view = $("conversation");
  view.scrollTop = view.scrollHeight;
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren($("empty"));
  $("empty").hidden = false;
  hideError();
  $("prompt").focus();
}

function updateButtons() {
  const streaming = state.controller !== null;
  $("send").hidden = streaming;
  $("stop").hidden = !streaming;
  $("send").disabled = !$("model").value;
}

// ---- streaming ------------------------------------------------------------------------------

// Reads server-sent events from a fetch body and calls onData with each parsed `data:` payload.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();  // the last piece may be an incomplete event
      for (const event of events) {
        const data = event.split(/\r?\n/).filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // on an error event, stop the server generating for nobody
  }
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.messages] : state.messages;
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    top_k: Math.max(0, Math.floor(Number($("top-k").value) || 0)),
    max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value) || 1)),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Math.floor(Number(seed));  // same seed + settings: same reply
  return body;
}

// Fit max_tokens into what is left of the model's context, so a long conversation or a small
// model gets a shorter reply instead of a refusal. Asks the server's /tokenize for the prompt's
// length; where that route is missing (another OpenAI server), the body goes as it is.
async function fitToContext(body) {
  const limit = state.contextLengths[body.model];
  if (!limit) return body;
  let count;
  try {
    const response = await fetch("tokenize", {
      method: "POST", headers: requestHeaders(), body: JSON.stringify({ model: body.model, messages: body.messages }),
    });
    if (!response.ok) return body;  // the chat request will report the problem itself
    count = (await response.json()).count;
  } catch (_) {
    return body;
  }
  if (count >= limit) {
    throw new Error(`This conversation (${count} tokens) fills the model's context of ${limit} tokens. Start a New chat.`);
  }
  return { ...body, max_tokens: Math.min(body.max_tokens, limit - count) };
}

function describeTiming(timing, usage) {
  const tokens = usage ? usage.completion_tokens : timing.chunks;
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (timing.first !== null) {
    parts.push(`first token ${((timing.first - timing.start) / 1000).toFixed(2)} s`);
    const decodeSeconds = (performance.now() - timing.first) / 1000;
    if (tokens > 1 && decodeSeconds > 0) parts.push(`${((tokens - 1) / decodeSeconds).toFixed(1)} tokens/s`);
  }
  return parts.join(" \u00b7 ");
}

async function streamReply(node, body, signal) {
  const content = node.querySelector(".content");
  const timing = { start: performance.now(), first: null, chunks: 0 };
  let usage = null;
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: requestHeaders(), body: JSON.stringify(await fitToContext(body)), signal,
  });
  if (!response.ok) throw await responseError(response);
  try {
    await readEvents(response.body, (chunk) => {
      if (chunk.error) throw new Error(`Server error: ${errorText(chunk) || "the stream failed"}`);
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (piece) {
        if (timing.first === null) timing.first = performance.now();
        timing.chunks += 1;
        content.textContent += piece;
        scrollToEnd();
      }
      if (chunk.usage) usage = chunk.usage;
    });
  } finally {
    setMeta(node, describeTiming(timing, usage));
  }
  return content.textContent;
}

async function send(text) {
  hideError();
  state.messages.push({ role: "user", content: text });
  const userNode = addMessage("user", text);
  const node = addMessage("assistant", "");
  node.classList.add("streaming");
  state.controller = new AbortController();
  updateButtons();
  try {
    const reply = await streamReply(node, requestBody(), state.controller.signal);
    state.messages.push({ role: "assistant", content: reply });
  } catch (err) {
    const partial = node.querySelector(".content").textContent;
    if (err.name === "AbortError") {
      node.classList.add("stopped");
      const meta = node.querySelector(".meta");
      setMeta(node, meta && meta.textContent ? `stopped \u00b7 ${meta.textContent}` : "stopped");
      state.messages.push({ role: "assistant", content: partial });  // keep what was shown
    } else if (partial) {
      showError(err.message);
      state.messages.push({ role: "assistant", content: partial });
    } else {
      // Nothing came back: take the turn out again and give the text back for a retry.
      showError(err instanceof TypeError ? `Cannot reach the server: ${err.message}` : err.message);
      state.messages.pop();
      userNode.remove();
      node.remove();
      if (!$("prompt").value) $("prompt").value = text;
    }
  } finally {
    node.classList.remove("streaming");
    state.controller = null;
    updateButtons();
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function autoSize() {
  const box = $("prompt");
  box.style.height = "auto";
  box.style.height = `${box.scrollHeight}px`;
}

function submitPrompt(event) {
  if (event) event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller || !$("model").value) return;
  $("prompt").value = "";
  autoSize();
  send(text);
}

function init() {
  const saved = loadSettings();
  showSettingValues();
  $("composer").addEventListener("submit", submitPrompt);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submitPrompt(event);
  });
  $("prompt").addEventListener("input", autoSize);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("toggle-settings").addEventListener("click", () => toggleSettings());
  $("error-close").addEventListener("click", hideError);
  $("settings").addEventListener("input", () => { showSettingValues(); saveSettings(); });
  $("model").addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", () => loadModels($("model").value || saved.model));
  updateButtons();
  loadModels(saved.model);
}

init();
