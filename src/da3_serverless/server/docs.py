"""The OpenAPI document: models that describe the hand-built responses, and the request bodies
that the routes read by hand."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from da3_serverless.api.schema import SOURCES, RunRequest, RunResponse
from da3_serverless.config import Settings


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
    status: int


class RunPodEnvelope(BaseModel):
    """RunPod's job form; `error` is the JSON text of `{"code", "status", "message"}`."""

    id: str
    status: str
    output: RunResponse | None = None
    error: str | None = None
    delayTime: int | None = None
    executionTime: int | None = None


class RunPodRequest(BaseModel):
    """A v1 request in RunPod's form: `{"input": {...}}` and nothing beside it."""

    model_config = ConfigDict(extra="forbid")
    input: RunRequest


class RunPodJobRequest(BaseModel):
    """RunPod's paths take `{"input": {...}}`; the input is checked as a job (a request our
    checks refuse is a FAILED job, HTTP 200, as on RunPod)."""

    model_config = ConfigDict(extra="forbid")
    input: dict[str, Any]


class RunPodJobCounts(BaseModel):
    completed: int
    failed: int
    inProgress: int
    inQueue: int
    retried: int


class RunPodWorkerCounts(BaseModel):
    idle: int
    initializing: int
    ready: int
    running: int
    throttled: int
    unhealthy: int


class RunPodHealth(BaseModel):
    jobs: RunPodJobCounts
    workers: RunPodWorkerCounts


class PurgeResult(BaseModel):
    removed: int
    status: str


class Ready(BaseModel):
    """`state`: loading, ready, draining or failed; `error`: the error code of a failed start;
    `model_id`: the default model when it is in the model table."""

    ready: bool
    state: str
    model_id: str | None = None
    error: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 404, 413, 500, 502, 503)
}
# Requests in RunPod's form fail in RunPod's form; 499: cancelled (the queue was purged, or
# the client went away).
RUN_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody | RunPodEnvelope} for s in (*ERRORS, 499)
}
# RunPod's paths: a failed job is a 200; a full queue is 429.
RUNPOD_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody | RunPodEnvelope} for s in (400, 401, 404, 413, 429, 500, 503)
}


def request_body_doc() -> dict[str, Any]:
    """`openapi_extra` for routes that take a v1 request, bare or in RunPod's form."""
    schema = {
        "anyOf": [
            {"$ref": "#/components/schemas/RunRequest"},
            {"$ref": "#/components/schemas/RunPodRequest"},
        ]
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def runpod_body_doc() -> dict[str, Any]:
    """`openapi_extra` for RunPod's paths that take a job: `{"input": {...}}`."""
    schema = {"$ref": "#/components/schemas/RunPodJobRequest"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# The request's image sources: exactly one is given (and not null).
IMAGE_SOURCES = SOURCES
# How a key is sent: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def _exactly_one(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """`oneOf` branches: each names one field as present and not null."""
    return [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names]


def _describe_what_the_server_does(doc: dict[str, Any]) -> None:
    """What FastAPI cannot infer: no 422 is ever sent (validation errors are 400), the routes
    that answer 401 take a key, a request has exactly one image source, and one 3x3
    `intrinsics` matrix may stand for every view, and extrinsics come with intrinsics."""
    components = doc["components"]
    for operations in doc["paths"].values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            if "401" in responses:
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
    for name in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(name, None)
    components["securitySchemes"] = SECURITY_SCHEMES
    schemas = components["schemas"]
    schemas["RunRequest"]["oneOf"] = _exactly_one(IMAGE_SOURCES)
    schemas["ImageRef"]["oneOf"] = _exactly_one(("url", "base64"))
    intrinsics = schemas["RunRequest"]["properties"]["intrinsics"]
    matrix = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
    intrinsics["anyOf"] = [matrix, *intrinsics.get("anyOf", [])]
    schemas["RunRequest"]["properties"]["outputs"]["description"] = (
        'Left out: ["depth"], or ["trajectory", "depth_frames"] for a sequence.'
    )
    # Poses condition the model only with cameras: extrinsics need intrinsics.
    no_poses = {"properties": {"extrinsics": {"type": "null"}}}
    schemas["RunRequest"]["allOf"] = [{"anyOf": [no_poses, *_exactly_one(("intrinsics",))]}]


def _publish_limits(doc: dict[str, Any], settings: Settings) -> None:
    """This server's own limits on a request (`check_limits`), as the schema's maxima."""
    fields = doc["components"]["schemas"]["RunRequest"]["properties"]
    process_res = fields["process_res"]
    process_res["maximum"] = settings.max_process_res
    process_res["default"] = min(process_res["default"], settings.max_process_res)
    fields["max_points"]["maximum"] = settings.max_points
    for branch in fields["max_frames"].get("anyOf", [fields["max_frames"]]):
        if branch.get("type") == "integer":
            branch["maximum"] = settings.max_video_frames


def openapi_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document plus the request models that the hand-read bodies use, what the
    server does beyond them (`_describe_what_the_server_does`) and this server's limits."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (RunRequest, RunPodRequest, RunPodJobRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        _describe_what_the_server_does(doc)
        _publish_limits(doc, settings)
        app.openapi_schema = doc
    return app.openapi_schema
