"""`hearth serve`: the HTTP server (uvicorn) for one or more checkpoints.

    hearth serve --model weights/default [--model weights/other] [--host 127.0.0.1] [--port 8080]
    hearth serve --model smollm2=SmolLM2-135M-Instruct.Q4_1.gguf   (a GGUF file: imported once into the cache)
    hearth serve --model weights/default --pooling last --no-embed-normalize   (embeddings: last token, raw vectors)
    hearth serve --models-dir weights/ [--keep-alive 5m] [--max-loaded-models 3]   (every model in it, on demand)

Flags and HEARTH_* variables come from `server.settings.ServerSettings`.
Before the port opens, every checkpoint's config.json is read and the port is
bound, so a typo or a taken port is a one-line error; the weights then load
in the background while /health answers 503. If loading fails, the server
stops and the command exits 1 with the reason.
"""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    from server.settings import add_settings_arguments

    parser = commands.add_parser("serve", help="serve checkpoints over OpenAI- and Ollama-compatible HTTP APIs")
    add_settings_arguments(parser)
    parser.set_defaults(handler=run_serve)


def bind_socket(host: str, port: int):
    """Bind the listening socket ourselves so "address in use" is a clean error, not a uvicorn exit."""
    import socket

    from model.errors import HearthError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise HearthError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def exit_zero_after_sigterm() -> None:
    """SIGTERM means "shut down gracefully", and a graceful shutdown exits 0.

    uvicorn drains connections on SIGTERM (stop accepting, let streams finish
    for `shutdown_timeout`, cancel the rest, run the lifespan shutdown), then
    re-raises the signal under the handler it found; with the default one the
    process would die by the signal (status 143). A no-op handler lets it return.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)


def gguf_entry(entry: str) -> str:
    """A --model entry naming a GGUF file -> NAME=its checkpoint folder, imported into the cache on first use
    (model/gguf_import.cached_import); the id is NAME= if given, else the file name without its suffix.
    Any other entry is returned as is."""
    from pathlib import Path

    from model.gguf_import import cached_import, is_gguf_file

    name, sep, path = entry.partition("=")
    if not sep:
        name, path = "", entry
    if not is_gguf_file(path):
        return entry
    print(f"importing {path} (GGUF) into the cache ...", flush=True)
    return f"{name or Path(path).stem}={cached_import(path)}"


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from model.checkpoint import read_metadata
    from model.errors import HearthError
    from server.app import create_app
    from server.settings import settings_from_args

    settings = settings_from_args(args)
    settings.models = [gguf_entry(entry) for entry in settings.models]
    for _, path in settings.model_entries():
        read_metadata(path)  # CheckpointError names the folder or file
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    print(settings.describe())
    failures: list[Exception] = []
    server: uvicorn.Server | None = None

    def stop_on_failure(exc: Exception) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings=settings, on_load_failure=stop_on_failure)
    sock = bind_socket(settings.host, settings.port)
    # access_log=False: server/metrics.py writes one structured line per request instead.
    config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=settings.shutdown_timeout,
                            access_log=False)
    server = uvicorn.Server(config)
    exit_zero_after_sigterm()
    served = [name for name, _ in settings.model_entries()]
    served += [f"{settings.models_dir} (on demand)"] if settings.models_dir else []
    print(f"serving {', '.join(served)} on http://{settings.host}:{settings.port}")
    server.run(sockets=[sock])
    if failures:
        raise HearthError(str(failures[0]))
    return 0
