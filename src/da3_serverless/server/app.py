"""The server assembled: the app and its routes over one `AppState` (server/state.py), its
lifespan (model load, drain) and `serve` for the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from da3_serverless import __version__
from da3_serverless.config import Settings
from da3_serverless.server.errors import RETRY_AFTER_S, add_error_handlers
from da3_serverless.server.files import add_file_routes
from da3_serverless.server.jobs import add_job_routes
from da3_serverless.server.logs import log_json_lines
from da3_serverless.server.middleware import ConnectionLimit, RequestLog
from da3_serverless.server.operations import add_operation_routes
from da3_serverless.server.pages import add_page_routes
from da3_serverless.server.runpod_api import add_runpod_routes
from da3_serverless.server.state import AppState
from da3_serverless.service import Service


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """The server as an ASGI app. Without `service`, one is built from `settings`.

    The model loads in a background thread at startup (unless `service.ready` already), so
    `/health` answers at once and `/ready` says 503 until the model is warm. The settings are
    the server's (`Settings.for_server`: a larger MAX_RESPONSE_BYTES unless set).
    """
    settings = settings.for_server()
    state = AppState.build(settings, service if service is not None else Service(settings))
    app = FastAPI(
        title="da3-serverless",
        version=__version__,
        summary="Depth Anything 3: metric depth, camera and extras from a photo (API v1)",
        lifespan=lambda app: _lifespan(state),
        docs_url=None,  # served by pages.py from vendored files
        redoc_url=None,
    )
    app.state.server = state
    app.state.drain = state.drain
    # The last added runs first: every request is logged, a refused one too.
    app.add_middleware(ConnectionLimit, limit=settings.max_connections, retry_after_s=RETRY_AFTER_S)
    app.add_middleware(RequestLog, metrics=state.metrics)
    add_error_handlers(app)
    add_job_routes(app, state)
    add_runpod_routes(app, state)
    add_file_routes(app, state)
    add_operation_routes(app, state)
    add_page_routes(app, settings)
    return app


@contextlib.asynccontextmanager
async def _lifespan(state: AppState) -> AsyncIterator[None]:
    state.draining = False  # an app may be started again after a shutdown (tests do)
    if not state.service.ready:
        threading.Thread(target=state.load_model, name="da3-model-load", daemon=True).start()
    yield
    state.drain()
    pending = state.jobs.unfinished_tasks()
    if pending:
        await asyncio.wait(pending, timeout=state.settings.shutdown_grace_s)


class _Server(uvicorn.Server):
    """uvicorn that stops taking new work (503) as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, state: AppState):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._state.drain()
        super().handle_exit(sig, frame)


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the server until SIGINT/SIGTERM, then drain and exit (`da3-serverless serve`).

    Limits: MAX_CONNECTIONS requests at once (ConnectionLimit, our 503; uvicorn's plain-text
    limit at twice that as a backstop), idle keep-alive connections closed after KEEP_ALIVE_S,
    an unfinished request line + headers refused past MAX_HEADER_BYTES (h11, whose limit this
    is: httptools has none). Slow clients that trickle their headers are not timed out here:
    put a reverse proxy in front (docs/DEPLOY.md)."""
    log_json_lines()
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        timeout_keep_alive=settings.keep_alive_s,
        http="h11", h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=2 * settings.max_connections,
    )  # fmt: skip
    _Server(config, app.state.server).run()
