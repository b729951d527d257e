"""Routes that run requests: `POST /runsync` (answer when done), `POST /run` + `GET
/status/{id}` (a background job with RunPod's status names), `POST /cancel/{id}`; and the job
machinery RunPod's paths (`runpod_api.py`) share: admitting a request, running it as a `Job`,
waiting for it while watching the client (one that disconnects cancels its job)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from da3_serverless.api.auth import check_api_key, key_from_headers
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import RunResponse
from da3_serverless.inference.cancel import Cancelled
from da3_serverless.server.batching import BatchItem
from da3_serverless.server.body import in_runpod_form, max_json_structure, read_json, unwrap
from da3_serverless.server.docs import ERRORS, RUN_ERRORS, RunPodEnvelope, request_body_doc
from da3_serverless.server.files import deliver
from da3_serverless.server.queue import (
    CANCELLED,
    COMPLETED,
    FAILED,
    TIMED_OUT,
    Job,
    result_bytes,
)
from da3_serverless.server.state import AppState
from da3_serverless.service import check_finite

log = logging.getLogger(__name__)
# This server is one worker: its id in RunPod's `workerId`, new at each start.
WORKER_ID = uuid.uuid4().hex[:14]


@dataclass
class Admitted:
    """A request read from its body; once admitted, it passed the key and format checks
    (`model_key` is set) and holds a place in the queue."""

    payload: object  # the v1 request object
    envelope: bool  # it came in RunPod's form
    header_key: str | None
    model_key: str
    path: str = ""  # the route, for the job's metrics
    batch_key: tuple | None = None  # may share a forward with others of the same key
    beside: dict = field(default_factory=dict)  # RunPod's fields beside `input` (/v2 paths)
    base_url: str = "/"  # where the request came to: the base of its download links


async def admit(request: Request, state: AppState) -> Admitted:
    """Read, unwrap, check the key and the request, and take a place in the queue.

    Bad keys and malformed requests are refused before they queue (so /run refuses them at
    once); `Service.handle` checks them again the same way."""
    admitted = await read_request(request, state)
    admitted.model_key = check_request(request, state, admitted)
    state.scheduler.admit()
    return admitted


async def read_request(
    request: Request,
    state: AppState,
    limit: tuple[int, str] | None = None,
    beside: frozenset[str] = frozenset(),
) -> Admitted:
    """The body read and unwrapped, and the key from the headers; not checked yet. `limit`:
    the most bytes the body may have and the setting's name (default MAX_BODY_BYTES);
    `beside`: RunPod's fields the body may carry beside `input` (kept in `Admitted.beside`)."""
    if state.draining:
        raise ServiceError("model_unavailable", "the server is shutting down; retry elsewhere")
    settings = state.settings
    most, name = limit or (settings.max_body_bytes, "MAX_BODY_BYTES")
    body = await read_json(
        request, most, settings.body_timeout_s, max_json_structure(settings.max_views), name
    )
    request.state.envelope = envelope = in_runpod_form(body)
    payload = unwrap(body, beside)
    path = getattr(request.scope.get("route"), "path", "?")
    admitted = Admitted(payload, envelope, key_from_headers(request.headers), "", path)
    if envelope:
        assert isinstance(body, dict)
        admitted.beside = {name: body[name] for name in beside if name in body}
    admitted.base_url = str(request.base_url)
    return admitted


def check_request(request: Request, state: AppState, admitted: Admitted) -> str:
    """Check the key, then the request (ServiceError); the model's queue key. Also notes
    whether the request may share a forward (`admitted.batch_key`)."""
    request_ = state.service.authorize(admitted.payload, admitted.header_key)
    model_key = state.service.model_key(request_)
    admitted.batch_key = state.service.batch_key(request_)
    request.state.log["model"] = model_key
    return model_key


def start_job(
    state: AppState, admitted: Admitted, job_id: str | None = None, keep: bool = True
) -> Job:
    """A job for an admitted request, running in the background as soon as the queue lets it.
    `keep`: its result is kept for `/status` (bounded by MAX_JOB_BYTES); a `/runsync` caller
    waiting for it gets it directly instead."""
    job = state.jobs.new(job_id)
    job.keep = keep
    job.task = asyncio.create_task(_run_job(state, job, admitted))
    return job


async def wait_for_job(
    request: Request, state: AppState, job: Job, timeout: float | None = None
) -> bool:
    """Wait until `job` ends (True) or `timeout` seconds pass (False). A client that
    disconnects meanwhile cancels the job; once the job has stopped this raises `cancelled`
    (having dropped the job and its files, should it have finished past its last check)."""
    assert job.task is not None
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            (job.task, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:  # the request itself was abandoned
        job.request_cancel("the request was abandoned")
        raise
    finally:
        gone.cancel()
    if gone in done:
        job.request_cancel("the client disconnected")
        await asyncio.shield(job.task)
        state.jobs.forget(job.id)
        if job.output is not None:  # off the event loop: bucket deletes are network calls
            await anyio.to_thread.run_sync(state.service.discard, job.output)
        raise ServiceError("cancelled", "the client disconnected before the answer was ready")
    return job.task.done()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def find_job(request: Request, state: AppState, job_id: str) -> Job:
    """The job `job_id`, for key holders (outputs hold file paths and results, as on RunPod);
    `not_found` when unknown or past its TTL."""
    check_api_key(key_from_headers(request.headers), state.settings)
    job = state.jobs.get(job_id)
    if job is None:
        raise _missing_job(state, job_id)
    return job


def cancel_job(job: Job, how: str) -> dict[str, Any]:
    """Cancel `job` (`how`: the call that asked, for the message); `{"id", "status"}`."""
    job.request_cancel(f"the job was cancelled ({how})")
    return {"id": job.id, "status": job.status}


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
        job = start_job(state, admitted, request.state.job_id, keep=False)
        await wait_for_job(request, state, job)
        state.jobs.forget(job.id)
        if job.error is not None:
            raise job.error
        result = job.output
        assert result is not None
        request.state.log.update(_result_log(result))  # finite: checked as the job ended
        if admitted.envelope:
            return JSONResponse({"id": job.id, "status": COMPLETED, "output": result})
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
        job = start_job(state, admitted)
        return JSONResponse({"id": job.id, "status": job.status})

    @app.get(
        "/status/{job_id}",
        summary="A job's status (RunPod's IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)",
        responses={200: {"model": RunPodEnvelope}, **ERRORS},
    )
    async def status(request: Request, job_id: str) -> JSONResponse:
        return JSONResponse(job_body(find_job(request, state, job_id)))

    @app.post(
        "/cancel/{job_id}",
        summary="Cancel a job: a queued one never runs, a running one stops at its next check",
        responses={200: {"model": RunPodEnvelope}, **ERRORS},
    )
    async def cancel(request: Request, job_id: str) -> JSONResponse:
        return JSONResponse(cancel_job(find_job(request, state, job_id), "POST /cancel"))


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
    def work() -> dict[str, Any]:
        output = state.service.handle(
            admitted.payload, api_key=admitted.header_key, cancel=job.cancel, job=job.info
        )
        return _finished(job, deliver(state, admitted.base_url, output))  # off the event loop

    try:
        if admitted.batch_key is not None and state.batcher is not None:
            item = BatchItem(admitted.payload, admitted.header_key, job)
            output = await state.batcher.submit(admitted.batch_key, admitted.model_key, item)
            output = deliver(state, admitted.base_url, output)
            job.output = await anyio.to_thread.run_sync(_finished, job, output)
        else:
            job.output = await state.scheduler.run(admitted.model_key, work, job)
        job.status = COMPLETED
    except Cancelled as stop:  # cancelled while queued: it never ran
        job.error = ServiceError("cancelled", f"{stop}: it left the queue without running")
    except ServiceError as err:
        job.error = err
    except Exception:
        log.exception("unexpected error in job", extra={"fields": {"job_id": job.id}})
        job.error = ServiceError("internal", f"job {job.id} failed; see logs")
    finally:
        if job.error is not None:
            job.error = detached(job.error)
            cancelled = job.error.code == "cancelled" or job.cancel.cancelled
            timed_out = job.status == TIMED_OUT  # stopped by its time limits, not a caller
            job.status = (TIMED_OUT if timed_out else CANCELLED) if cancelled else FAILED
        job.finished = time.monotonic()
        if job.done:
            state.jobs.tally[job.status] += 1
        if job.keep:
            state.jobs.finished(job)
        code = job.error.code if job.error is not None else None
        elapsed = job.finished - job.created
        state.metrics.observe(f"{admitted.path} (job)", job.status, code, elapsed)


def detached(err: ServiceError) -> ServiceError:
    """The error without its traceback and context, whose frames hold the request's images
    and tensors: a job keeps its error for the TTL."""
    err.__context__ = err.__cause__ = None
    return err.with_traceback(None)


def _finished(job: Job, output: dict[str, Any]) -> dict[str, Any]:
    """A job's output once known to be JSON at all (no NaN: else every /status poll would
    fail to encode it), its size counted."""
    check_finite(output)
    job.size = result_bytes(output)
    return output


def job_body(job: Job) -> dict[str, Any]:
    """A job in RunPod's form: id, status, `delayTime` (ms from its submission until it
    started, or until now or its end while it never started), `executionTime` (ms running),
    `workerId` once it started, output or error."""
    body: dict[str, Any] = {"id": job.id, "status": job.status}
    waited_until = job.started or job.finished or time.monotonic()
    body["delayTime"] = max(0, round((waited_until - job.created) * 1000))
    if job.started is not None:
        body["workerId"] = WORKER_ID
    if job.finished is not None and job.started is not None:
        body["executionTime"] = round((job.finished - job.started) * 1000)
    if job.output is not None:
        body["output"] = job.output
    elif job.progress is not None and not job.done:
        body["output"] = job.progress  # RunPod's progress_update: the output while it runs
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
