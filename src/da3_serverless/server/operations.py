"""Routes for operators and orchestrators: liveness, readiness, the model table, metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from da3_serverless.server.docs import Ready

if TYPE_CHECKING:
    from da3_serverless.server.app import AppState


def add_operation_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        summary="Readiness: 200 once the default model is loaded, else 503",
        responses={200: {"model": Ready}, 503: {"model": Ready}},
    )
    async def ready() -> JSONResponse:
        ok = state.service.ready and not state.draining
        body = Ready(ready=ok, model_id=state.settings.model_id, error=state.start_error)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/models", summary="The model table: capabilities and licenses")
    async def models() -> list[dict[str, Any]]:
        return state.service.model_table()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        content, media_type = state.metrics.exposition()
        return Response(content, media_type=media_type)
