"""Operations layer of the app: web page, /metrics, access log, API key, CORS.

    app = FastAPI(...); app.state.registry = registry     # server/app.py
    install_ops(app, settings)                            # after the app's own middleware

Design choices:
- One call wires everything so `create_app` stays an assembler and none of
  these features knows about the protocol routes.
- Middleware order, outermost first: metrics + access log (so refused
  requests are counted and logged too), CORS (so a browser can read a 401),
  API key, then the app's own (body limit, error handlers).
- Engines are instrumented where they become ready: the registry's
  `on_ready` hooks wrap each `ServedModel.engine` in a `MeteredEngine`, and
  the engine gauges read `registry.models` at every scrape, so models that
  finish loading after start-up are covered without any re-registration.
- The web page is three static files shipped in the package (no build step,
  no CDN): `/` is index.html, `/static/*` the rest. Both stay public under an
  API key: the page asks for the key itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

from server.auth import ApiKeyMiddleware
from server.metrics import MeteredEngine, Metrics, RequestMetricsMiddleware
from server.settings import ServerSettings

STATIC_DIR = Path(__file__).parent / "static"


def install_ops(app: Any, settings: ServerSettings) -> Metrics:
    """Add the page, /metrics and the operational middleware to `app` (a FastAPI app with a registry)."""
    metrics = Metrics()
    app.state.metrics = metrics
    instrument_registry(app.state.registry, metrics)
    app.add_route("/metrics", metrics.endpoint, methods=["GET"], include_in_schema=False)
    install_web_page(app)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "HEAD", "OPTIONS", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return metrics


def instrument_registry(registry: Any, metrics: Metrics) -> None:
    """Meter every engine of `registry`: those loaded now and those that load later."""

    def instrument(served: Any) -> None:
        if not isinstance(served.engine, MeteredEngine):
            served.engine = MeteredEngine(served.engine, served.model_id, metrics)

    for served in list(registry.models.values()):
        instrument(served)
    registry.on_ready.append(instrument)
    metrics.watch_engines(lambda: {model_id: served.engine for model_id, served in list(registry.models.items())})


def install_web_page(app: Any) -> None:
    async def index(request: Any) -> FileResponse:
        # no-cache: revalidate (ETag) on each load, so an upgraded server never serves a stale page.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_route("/", index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
