"""Prometheus metrics and structured access logs for the HTTP server.

    metrics = Metrics()
    engines = {name: MeteredEngine(engine, name, metrics) for name, engine in engines.items()}
    metrics.watch_engines(lambda: engines)              # queue/KV gauges read at scrape time
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_route("/metrics", metrics.endpoint)

Design choices:
- One `CollectorRegistry` per app, not prometheus-client's global one, so two
  apps in one process (tests) never collide or double count.
- Request counts are labelled by the route *template* (`/v1/chat/completions`,
  `/api/show`), never the raw path, so a scanner hitting random URLs cannot
  blow up the label cardinality; unknown paths share `route="unmatched"`.
- Token counts and latencies are observed by wrapping the engine's
  `generate()` stream (`MeteredEngine`), so they are measured the same way for
  the OpenAI and Ollama protocols without either knowing about metrics.
  Embedding requests (`embed()`) count their prompt tokens only.
  Time to first token runs from the `generate()` call (queue + prefill) to the
  first output carrying tokens; inter-token latency is the gap between
  outputs, split evenly over the tokens a choice gained in that output.
- Queue depth, running requests, KV blocks and prefix-cache hits are read
  from `engine.stats()` when Prometheus scrapes (a custom collector), so they
  cost nothing between scrapes and are never stale; so is the number of
  asyncio tasks alive (a leak of per-request tasks shows there first).
- The access log is one JSON object per request on the `hearth.access`
  logger: request id (the client's `X-Request-Id` or a fresh one, echoed back),
  method, path, status, model, token counts and timings. The stream wrapper
  fills in model and tokens through a context variable that the middleware
  set, because the protocol layer sits between the two.
- Both middlewares here are plain ASGI, so streamed bodies pass through chunk
  by chunk and client disconnects still cancel the engine request.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The `*_created` timestamp series double the output and no dashboard uses them (process-wide switch).
disable_created_metrics()

access_log = logging.getLogger("hearth.access")

# Buckets from 1 ms to 60 s: CPU prefill of a long prompt can take seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class RequestRecord:
    """What the access log line says about one HTTP request; filled in as it runs."""

    request_id: str  # client's X-Request-Id or a fresh hex id; echoed in the response
    method: str
    path: str
    status: int = 0  # 0 until the response starts
    model: str | None = None  # set by MeteredEngine when the request reaches an engine
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache
    completion_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)  # one per finished choice
    ttft_ms: float | None = None  # generate() call -> first token
    duration_ms: float = 0.0  # request start -> last body byte sent


_current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("hearth_request", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being handled (for response ids and error logs), if any."""
    record = _current_request.get()
    return record.request_id if record else None


class Metrics:
    """The registry and every metric the server exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hearth_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("hearth_http_request_duration_seconds", "HTTP request time, whole stream included",
                                         ["route"], buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hearth_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("hearth_generation_tokens", "tokens generated", ["model"], registry=r)
        self.finished = Counter("hearth_request_finished", "engine requests by outcome (stop, length, cancelled, error)",
                                ["model", "reason"], registry=r)
        self.ttft = Histogram("hearth_time_to_first_token_seconds", "time from request to first generated token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hearth_inter_token_latency_seconds", "time between consecutive generated tokens",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self._engine_sources: list[Callable[[], dict[str, Any]]] = []
        self.registry.register(_EngineStatsCollector(self._engine_sources))

    def watch_engines(self, engines: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """Export `engine.stats()` of each model at every scrape; a callable is asked afresh each time
        (models that finish loading later show up without re-registering)."""
        self._engine_sources.append(engines if callable(engines) else (lambda: engines))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)


class _EngineStatsCollector:
    """Gauges read from each engine's `stats()` snapshot when scraped."""

    def __init__(self, sources: list[Callable[[], dict[str, Any]]]):
        self.sources = sources

    def describe(self) -> list:
        return []  # unknown until the first scrape; tells the registry not to call collect() at register time

    def collect(self):
        families = {
            "waiting": GaugeMetricFamily("hearth_num_requests_waiting", "requests waiting for a free slot (what --max-waiting bounds)", labels=["model"]),
            "running": GaugeMetricFamily("hearth_num_requests_running", "requests being decoded", labels=["model"]),
            "used": GaugeMetricFamily("hearth_kv_cache_blocks_used", "KV cache blocks in use", labels=["model"]),
            "free": GaugeMetricFamily("hearth_kv_cache_blocks_free", "KV cache blocks free", labels=["model"]),
            "hits": CounterMetricFamily("hearth_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                        labels=["model"]),
        }
        tasks = GaugeMetricFamily("hearth_event_loop_tasks", "asyncio tasks alive in the server's event loop")
        tasks.add_metric([], _event_loop_tasks())
        yield tasks
        engines = {name: engine for source in self.sources for name, engine in source().items()}
        for name, engine in engines.items():
            stats = engine.stats()
            families["waiting"].add_metric([name], stats.num_waiting)
            families["running"].add_metric([name], stats.num_running)
            families["used"].add_metric([name], stats.kv_blocks_used)
            families["free"].add_metric([name], stats.kv_blocks_total - stats.kv_blocks_used)
            families["hits"].add_metric([name], stats.prefix_cache_hit_tokens)
        yield from families.values()


def _event_loop_tasks() -> int:
    """Tasks of the running loop (scrapes run on it); 0 when collected outside one."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


class MeteredEngine:
    """An engine whose `generate()` streams are counted and timed; everything else passes through."""

    def __init__(self, engine: Any, model_name: str, metrics: Metrics):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        record = _current_request.get()
        if record is not None:
            record.model = self.model_name
        stream = self.engine.generate(request)
        observer = _StreamObserver(self.model_name, self.metrics, record)
        try:
            async for output in stream:
                observer.observe(output)
                yield output
        except BaseException as exc:
            # GeneratorExit / CancelledError: the consumer left (client gone, or shutdown).
            observer.failure = "cancelled" if isinstance(exc, (GeneratorExit, asyncio.CancelledError)) else "error"
            raise
        finally:
            observer.finish()
            close = getattr(stream, "aclose", None)
            if close is not None:  # propagate a client disconnect to the engine now, not at GC time
                await close()


    async def embed(self, request: Any) -> Any:
        """An embedding request counts its prompt tokens (it generates none); the access log sums a request's inputs."""
        record = _current_request.get()
        if record is not None:
            record.model = self.model_name
        output = await self.engine.embed(request)
        self.metrics.prompt_tokens.labels(self.model_name).inc(output.prompt_tokens)
        if record is not None:
            record.prompt_tokens = (record.prompt_tokens or 0) + output.prompt_tokens
        return output


class _StreamObserver:
    """Per-stream timing state for MeteredEngine."""

    def __init__(self, model: str, metrics: Metrics, record: RequestRecord | None):
        self.model, self.metrics, self.record = model, metrics, record
        self.started = self.last_token_time = time.perf_counter()
        self.num_generated = 0
        self.finish_reasons: list[str] = []
        self.finished = False  # the engine sent its final output
        self.failure: str | None = None  # "cancelled" or "error" when the stream ended early

    def observe(self, output: Any) -> None:
        now = time.perf_counter()
        tokens_per_choice = max((len(delta.token_ids) for delta in output.deltas), default=0)
        num_tokens = sum(len(delta.token_ids) for delta in output.deltas)
        self.finish_reasons += [delta.finish_reason for delta in output.deltas if delta.finish_reason]
        if num_tokens:
            if self.num_generated == 0:
                ttft = now - self.started
                self.metrics.ttft.labels(self.model).observe(ttft)
                if self.record is not None:
                    self.record.ttft_ms = round(ttft * 1000, 2)
            else:
                gap = (now - self.last_token_time) / tokens_per_choice
                for _ in range(tokens_per_choice):
                    self.metrics.itl.labels(self.model).observe(gap)
            self.last_token_time = now
            self.num_generated += num_tokens
            self.metrics.generation_tokens.labels(self.model).inc(num_tokens)
        if output.usage is not None:
            self._observe_usage(output.usage)
        self.finished = self.finished or output.finished

    def _observe_usage(self, usage: Any) -> None:
        self.metrics.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)
        # The usage is authoritative: a stop token is counted there but carried by no delta.
        uncounted = usage.completion_tokens - self.num_generated
        if uncounted > 0:
            self.metrics.generation_tokens.labels(self.model).inc(uncounted)
            self.num_generated += uncounted
        if self.record is not None:
            self.record.prompt_tokens = usage.prompt_tokens
            self.record.cached_tokens = usage.cached_tokens
            self.record.completion_tokens = usage.completion_tokens

    def finish(self) -> None:
        # A stream closed after its final output finished normally, whatever closed it.
        reasons = (self.finish_reasons or ["stop"]) if self.finished else [self.failure or "cancelled"]
        for reason in reasons:
            self.metrics.finished.labels(self.model, reason).inc()
        if self.record is not None:
            self.record.finish_reasons = reasons
            if self.record.completion_tokens is None:  # cancelled before the final usage
                self.record.completion_tokens = self.num_generated


class RequestMetricsMiddleware:
    """Counts and times every HTTP request, tags it with a request id and writes the access log line."""

    def __init__(self, app: Callable, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = RequestRecord(_request_id(scope["headers"]), scope["method"], scope["path"])
        arrival_scope = dict(scope)  # routing rewrites path/root_path in place (mounts); keep the original
        token = _current_request.set(record)
        started = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", record.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            _current_request.reset(token)
            record.duration_ms = round((time.perf_counter() - started) * 1000, 2)
            self._record(scope.get("route"), arrival_scope, record)

    def _record(self, route_object: Any, arrival_scope: dict, record: RequestRecord) -> None:
        route = getattr(route_object, "path", None) or _route_template(arrival_scope)
        status = str(record.status or 499)  # 499: the client went away before any response
        self.metrics.requests.labels(route, record.method, status).inc()
        self.metrics.request_seconds.labels(route).observe(record.duration_ms / 1000)
        # Successful probes and scrapes come every few seconds and would drown the log: debug level.
        routine = record.path in ("/health", "/metrics") and record.status == 200
        line = json.dumps({"event": "request", **{k: v for k, v in asdict(record).items() if v not in (None, [])}})
        access_log.log(logging.DEBUG if routine else logging.INFO, line)


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id":
            given = value.decode("latin-1").strip()
            if 0 < len(given) <= 128 and given.isprintable():
                return given
    return uuid.uuid4().hex


def _route_template(scope: dict) -> str:
    """The route template a request (as it arrived) matches; for requests no route handled (401, 404)."""
    app = scope.get("app")
    for candidate in getattr(app, "routes", ()):  # plain routes and mounts (/, /metrics, /static)
        template = getattr(candidate, "path", None)
        if template and candidate.matches(scope)[0].name != "NONE":
            return template
    for template, pattern in _schema_paths(app):  # the API routes, from the OpenAPI schema (public API)
        if pattern.match(scope["path"]):
            return template
    return "unmatched"


def _schema_paths(app: Any) -> list[tuple[str, Any]]:
    cached = getattr(getattr(app, "state", None), "metrics_schema_paths", None)
    if cached is None:
        from starlette.routing import compile_path

        openapi = getattr(app, "openapi", None)
        paths = openapi().get("paths", {}) if openapi else {}
        cached = [(template, compile_path(template)[0]) for template in paths]
        if hasattr(app, "state"):
            app.state.metrics_schema_paths = cached
    return cached
