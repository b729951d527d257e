"""Routes that run requests: `POST /runsync` (answer when done), `POST /run` + `GET
/status/{id}` (a background job with RunPod's status names)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from da3_serverless.api.auth import check_api_key, key_from_headers
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import RunResponse
from da3_serverless.server.batching import BatchItem
from da3_serverless.server.body import in_runpod_form, max_json_structure, read_json, unwrap
from da3_serverless.server.docs import ERRORS, RUN_ERRORS, RunPodEnvelope, request_body_doc
from da3_serverless.server.queue import COMPLETED, FAILED, IN_PROGRESS, Job, result_bytes
from da3_serverless.service import check_finite

if TYPE_CHECKING:
    from da3_serverless.server.app import AppState

log = logging.getLogger(__name__)


@dataclass
class Admitted:
    """A request that passed the key and format checks and holds a place in the queue."""

    payload: object  # the v1 request object
    envelope: bool  # it came in RunPod's form
    header_key: str | None
    model_key: str
    batch_key: tuple | None = None  # may share a forward with others of the same key


async def admit(request: Request, state: AppState) -> Admitted:
    """Read, unwrap, check the key and the request, and take a place in the queue.

    Bad keys and malformed requests are refused before they queue (so /run refuses them at
    once); `Service.handle` checks them again the same way."""
    if state.draining:
        raise ServiceError("model_unavailable", "the server is shutting down; retry elsewhere")
    settings = state.settings
    body = await read_json(
        request, settings.max_body_bytes, settings.body_timeout_s,
        max_json_structure(settings.max_views),
    )  # fmt: skip
    request.state.envelope = envelope = in_runpod_form(body)
    payload = unwrap(body)
    header_key = key_from_headers(request.headers)
    parsed = state.service.authorize(payload, header_key)
    model_key = state.service.model_key(parsed)
    request.state.log["model"] = model_key
    state.scheduler.admit()
    return Admitted(payload, envelope, header_key, model_key, state.service.batch_key(parsed))


async def execute(state: AppState, admitted: Admitted, on_start: Callable[[int], None]) -> dict:
    """Run an admitted request: in a batch when it may share a forward and batching is on
    (`MAX_BATCH` > 1), else alone. `on_start(batch size)` is called as it starts."""
    if admitted.batch_key is not None and state.batcher is not None:
        item = BatchItem(admitted.payload, admitted.header_key, on_start)
        return await state.batcher.submit(admitted.batch_key, admitted.model_key, item)

    def work() -> dict[str, Any]:
        on_start(1)
        return state.service.handle(admitted.payload, api_key=admitted.header_key)

    return await state.scheduler.run(admitted.model_key, work)


def add_job_routes(app: FastAPI, state: AppState) -> None:
    @app.post(
        "/runsync",
        summary="Run one request and answer with the result",
        description='Body: the v1 request object, or RunPod\'s `{"input": {...}}` form.',
        responses={200: {"model": RunResponse | RunPodEnvelope}, **RUN_ERRORS},
        openapi_extra=request_body_doc(),
    )
    async def runsync(request: Request) -> JSONResponse:
        request.state.job_id = uuid.uuid4().hex
        admitted = await admit(request, state)
        log_fields = request.state.log
        result = await execute(state, admitted, lambda size: log_fields.update(batch=size))
        request.state.log.update(_result_log(result))
        check_finite(result)  # JSON cannot carry NaN: a clear `internal`, never a broken answer
        if admitted.envelope:
            return JSONResponse({"id": request.state.job_id, "status": COMPLETED, "output": result})
        return JSONResponse(result)

    @app.post(
        "/run",
        summary="Queue one request as a background job",
        description='Answers `{"id", "status": "IN_QUEUE"}`; poll `GET /status/{id}`.',
        responses={200: {"model": RunPodEnvelope}, **RUN_ERRORS},
        openapi_extra=request_body_doc(),
    )
    async def run(request: Request) -> JSONResponse:
        admitted = await admit(request, state)
        job = state.jobs.new()
        job.task = asyncio.create_task(_run_job(state, job, admitted))
        return JSONResponse({"id": job.id, "status": job.status})

    @app.get(
        "/status/{job_id}",
        summary="A `/run` job's status (RunPod's IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED)",
        responses={200: {"model": RunPodEnvelope}, **ERRORS},
    )
    async def status(request: Request, job_id: str) -> JSONResponse:
        # Outputs hold file paths and results: key holders only, as on RunPod.
        check_api_key(key_from_headers(request.headers), state.settings)
        job = state.jobs.get(job_id)
        if job is None:
            raise _missing_job(state, job_id)
        return JSONResponse(job_body(job))


def _missing_job(state: AppState, job_id: str) -> ServiceError:
    if not state.jobs.expired(job_id):
        return ServiceError("not_found", f"no job {job_id[:64]!r} (unknown, or older than the TTL)")
    settings = state.settings
    return ServiceError(
        "not_found",
        f"job {job_id!r} expired: finished results are kept for JOB_TTL_S "
        f"({settings.job_ttl_s:g} s) and, all together, up to MAX_JOB_BYTES "
        f"({settings.max_job_bytes} bytes), the oldest dropped first; poll /status sooner, "
        "or use /runsync",
    )


async def _run_job(state: AppState, job: Job, admitted: Admitted) -> None:
    def started(size: int) -> None:
        job.status, job.started = IN_PROGRESS, time.monotonic()

    try:
        output = await execute(state, admitted, started)
        job.size = await anyio.to_thread.run_sync(_checked_size, output)  # off the event loop
        job.output, job.status = output, COMPLETED
    except ServiceError as err:
        job.error, job.status = err, FAILED
    except Exception:
        log.exception("unexpected error in job", extra={"fields": {"job_id": job.id}})
        job.error = ServiceError("internal", f"job {job.id} failed; see logs")
        job.status = FAILED
    finally:
        job.finished = time.monotonic()
        state.jobs.finished(job)
        code = job.error.code if job.error is not None else None
        state.metrics.observe("/run (job)", job.status, code, job.finished - job.created)


def _checked_size(output: dict[str, Any]) -> int:
    """The output's size in bytes of JSON, once it is known to be JSON at all (no NaN: else
    every /status poll would fail to encode it)."""
    check_finite(output)
    return result_bytes(output)


def job_body(job: Job) -> dict[str, Any]:
    """A job in RunPod's form: id, status, delay and execution times (ms), output or error."""
    body: dict[str, Any] = {"id": job.id, "status": job.status}
    if job.started is not None:
        body["delayTime"] = round((job.started - job.created) * 1000)
    if job.finished is not None and job.started is not None:
        body["executionTime"] = round((job.finished - job.started) * 1000)
    if job.output is not None:
        body["output"] = job.output
    if job.error is not None:
        body["error"] = job.error.to_json()
    return body


def _result_log(result: dict[str, Any]) -> dict[str, Any]:
    """What one line of log may say about a result: sizes and timings, no data."""
    views = result.get("views") or [result]
    return {
        "model": result.get("model_id"),
        "images": [[v.get("width"), v.get("height")] for v in views],
        "timings_ms": result.get("timings_ms"),
    }
