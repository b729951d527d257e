"""Routes for operators and orchestrators: liveness, readiness, the model table, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from da3_serverless.inference.catalog import lookup_model
from da3_serverless.server.docs import Ready
from da3_serverless.server.state import AppState


def add_operation_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        summary="Readiness: 200 once the default model is loaded, else 503",
        description="Unauthenticated, so it says the state and an error code only; the "
        "reason for a failed start is in the server log.",
        responses={200: {"model": Ready}, 503: {"model": Ready}},
    )
    async def ready() -> JSONResponse:
        phase = state.phase
        info = lookup_model(state.settings.model_id)  # a local folder's path is not said
        body = Ready(
            ready=phase == "ready",
            state=phase,
            model_id=info.repo_id if info else None,
            error=state.start_error,
        )
        return JSONResponse(body.model_dump(), status_code=200 if phase == "ready" else 503)

    @app.get("/models", summary="The model table: capabilities and licenses")
    async def models() -> list[dict[str, Any]]:
        return state.service.model_table()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        content, media_type = state.metrics.exposition()
        return Response(content, media_type=media_type)
