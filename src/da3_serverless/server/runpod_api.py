"""RunPod's endpoint API on the self-hosted server, whatever the endpoint id, so RunPod's own
clients (its SDK with `runpod.endpoint_url_base = "http://host:8000/v2"`) work unchanged:
`POST /v2/<id>/run`, `POST /v2/<id>/runsync?wait=<ms>`, `GET|POST /v2/<id>/status/<job>`,
`POST /v2/<id>/cancel/<job>`, `GET /v2/<id>/health`, `POST /v2/<id>/purge-queue`.

HTTP as RunPod answers it: the body is `{"input": {...}}`; a job that fails, a request our
checks refuse included, is HTTP 200 with `status: "FAILED"` and our error object as JSON text
in `error`; a missing or wrong key is 401 (from `Authorization`, as the SDK sends it), an
unknown job 404, a full queue 429 (the SDK retries it). `/runsync` waits `wait` milliseconds
(RunPod's default and range) and then answers the job as it stands, IN_QUEUE or IN_PROGRESS,
with an id to poll; its client disconnecting before that cancels the job.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from da3_serverless.api.auth import check_api_key, key_from_headers
from da3_serverless.api.errors import ServiceError
from da3_serverless.server.docs import (
    ERRORS,
    RUNPOD_ERRORS,
    PurgeResult,
    RunPodEnvelope,
    RunPodHealth,
    runpod_body_doc,
)
from da3_serverless.server.jobs import (
    Admitted,
    cancel_job,
    check_request,
    detached,
    find_job,
    job_body,
    read_request,
    start_job,
    wait_for_job,
)
from da3_serverless.server.queue import COMPLETED, FAILED, TIMED_OUT, Job
from da3_serverless.server.runpod_policy import FIELDS, RunPodOptions, follow, parse_options
from da3_serverless.server.state import AppState

PREFIX = "/v2/{endpoint_id}"
_FOLLOWERS: set[asyncio.Task] = set()  # each /v2 job's follower, held until it ends
# RunPod's /runsync wait: 90 s by default, 1 s to 300 s (milliseconds in `?wait=`).
DEFAULT_WAIT_MS, MIN_WAIT_MS, MAX_WAIT_MS = 90_000, 1_000, 300_000


async def submit(request: Request, state: AppState, keep: bool = True) -> Job:
    """The request as a job: queued, or already FAILED when our checks refuse the input.
    HTTP errors: not RunPod's form (400), the key (401), a body over RunPod's limit (413: 10 MB
    on /run, 20 MB on /runsync), a full queue (429), shutting down."""
    request.state.envelope = True  # errors in RunPod's form
    settings = state.settings
    limit = (
        (settings.max_run_body_bytes, "MAX_RUN_BODY_BYTES, as RunPod's /run")
        if keep
        else (settings.max_runsync_body_bytes, "MAX_RUNSYNC_BODY_BYTES, as RunPod's /runsync")
    )
    admitted = await read_request(request, state, limit, FIELDS)
    request.state.envelope = True
    if not admitted.envelope or not isinstance(admitted.payload, dict):
        raise ServiceError(
            "invalid_input", 'RunPod\'s paths take the request as {"input": {...}}, an object'
        )
    options = parse_options(admitted.beside)
    return launch(request, state, admitted, options, keep=keep)


def launch(
    request: Request,
    state: AppState,
    admitted: Admitted,
    options: RunPodOptions,
    job_id: str | None = None,
    keep: bool = True,
) -> Job:
    """Check and queue an admitted request as job `job_id` (a new id by default), followed
    until it ends (`runpod_policy.follow`): time limits, /retry, webhook."""
    try:
        admitted.model_key = check_request(request, state, admitted)
    except ServiceError as err:
        if err.code == "unauthorized":
            raise
        job = failed_job(state, err, job_id)
    else:
        try:
            state.scheduler.admit()
        except ServiceError as err:
            raise ServiceError(err.code, err.message, status=429) from None
        job = start_job(state, admitted, job_id, keep=keep)
        assert job.info is not None
        job.info.bucket = options.bucket  # before the job's task first runs
    follower = asyncio.create_task(follow(state, job, admitted, options))
    _FOLLOWERS.add(follower)
    follower.add_done_callback(_FOLLOWERS.discard)
    return job


def retry(request: Request, state: AppState, job_id: str) -> Job:
    """RunPod's /retry: a FAILED or TIMED_OUT job runs again under its id, with its request."""
    request.state.envelope = True
    job = find_job(request, state, job_id)
    if job.status not in (FAILED, TIMED_OUT) or job.retry is None:
        raise ServiceError(
            "invalid_input",
            f"job {job.id} is {job.status}: only a FAILED or TIMED_OUT job is retried "
            "(while it is kept: RUNSYNC_TTL_S, JOB_TTL_S)",
        )
    admitted, options = job.retry
    again = launch(request, state, admitted, options, job.id)
    state.jobs.tally["retried"] += 1
    return again


def failed_job(state: AppState, err: ServiceError, job_id: str | None = None) -> Job:
    """A job that failed before it queued (RunPod reports those as FAILED jobs too)."""
    job = state.jobs.new(job_id)
    job.status, job.error, job.finished = FAILED, detached(err), time.monotonic()
    state.jobs.tally[FAILED] += 1
    return job


def health(state: AppState) -> dict[str, Any]:
    """RunPod's health: jobs by state (finished ones since the start) and this one worker."""
    scheduler, tally = state.scheduler, state.jobs.tally
    loaded = state.service.ready and not state.draining
    busy = scheduler.running > 0
    # Jobs waiting for a model to fit in memory hold a slot but count as queued; a cancelled
    # job leaves the queue's count as soon as it is cancelled.
    for_memory = scheduler.also_waiting()
    in_progress = max(0, scheduler.running - for_memory)
    in_queue = len(state.jobs.queued()) + for_memory
    return {
        "jobs": {"completed": tally[COMPLETED], "failed": tally[FAILED],
                 "inProgress": in_progress, "inQueue": in_queue, "retried": tally["retried"]},
        "workers": {"idle": int(loaded and not busy), "running": int(busy),
                    "initializing": int(not state.service.ready and state.start_error is None),
                    "ready": int(loaded), "throttled": 0,
                    "unhealthy": int(state.start_error is not None)},
    }  # fmt: skip


def add_runpod_routes(app: FastAPI, state: AppState) -> None:
    job_doc = {200: {"model": RunPodEnvelope}, **RUNPOD_ERRORS}
    _add_stream_route(app, state, job_doc)

    @app.post(f"{PREFIX}/run", summary="RunPod's /run: queue a job", responses=job_doc,
              openapi_extra=runpod_body_doc())  # fmt: skip
    async def runpod_run(request: Request, endpoint_id: str) -> JSONResponse:
        job = await submit(request, state)
        return JSONResponse({"id": job.id, "status": job.status})

    @app.post(f"{PREFIX}/runsync", summary="RunPod's /runsync: run a job, wait for it",
              responses=job_doc, openapi_extra=runpod_body_doc())  # fmt: skip
    async def runpod_runsync(
        request: Request,
        endpoint_id: str,
        wait: int | None = Query(None, description="milliseconds to wait (1000 to 300000)"),
    ) -> JSONResponse:
        job = await submit(request, state, keep=False)
        seconds = min(max(wait or DEFAULT_WAIT_MS, MIN_WAIT_MS), MAX_WAIT_MS) / 1000
        if job.task is None or await wait_for_job(request, state, job, seconds):
            # Answered: kept RUNSYNC_TTL_S for /status, as RunPod keeps it a minute.
            job.ttl_s = state.settings.runsync_ttl_s
            if job.size > state.jobs.max_bytes:
                state.jobs.forget(job.id)
        else:
            job.keep = True  # it outlasted the wait: polled at /status like a /run job
        return JSONResponse(job_body(job))

    @app.get(f"{PREFIX}/status/{{job_id}}", summary="RunPod's /status", responses=job_doc)
    @app.post(f"{PREFIX}/status/{{job_id}}", summary="RunPod's /status", responses=job_doc)
    async def runpod_status(request: Request, endpoint_id: str, job_id: str) -> JSONResponse:
        return JSONResponse(job_body(find_job(request, state, job_id)))

    @app.post(f"{PREFIX}/cancel/{{job_id}}", summary="RunPod's /cancel", responses=job_doc)
    async def runpod_cancel(request: Request, endpoint_id: str, job_id: str) -> JSONResponse:
        job = find_job(request, state, job_id)
        return JSONResponse(cancel_job(job, f"POST /v2/{endpoint_id[:64]}/cancel"))

    @app.post(f"{PREFIX}/retry/{{job_id}}", summary="RunPod's /retry: run a FAILED or "
              "TIMED_OUT job again, same id", responses=job_doc)  # fmt: skip
    async def runpod_retry(request: Request, endpoint_id: str, job_id: str) -> JSONResponse:
        again = retry(request, state, job_id)
        return JSONResponse({"id": again.id, "status": again.status})

    @app.get(f"{PREFIX}/health", summary="RunPod's /health: jobs and workers",
             response_model=RunPodHealth, responses=ERRORS)  # fmt: skip
    async def runpod_health(request: Request, endpoint_id: str) -> dict[str, Any]:
        check_api_key(key_from_headers(request.headers), state.settings)
        return health(state)

    @app.post(f"{PREFIX}/purge-queue", summary="RunPod's /purge-queue: drop the queued jobs",
              response_model=PurgeResult, responses=ERRORS)  # fmt: skip
    async def runpod_purge(request: Request, endpoint_id: str) -> dict[str, Any]:
        check_api_key(key_from_headers(request.headers), state.settings)
        queued = state.jobs.queued()
        for job in queued:
            job.request_cancel("the queue was purged (POST .../purge-queue)")
        return {"removed": len(queued), "status": "completed"}


def _add_stream_route(app: FastAPI, state: AppState, job_doc: dict) -> None:
    """RunPod's `/stream/<job>`: the job's progress updates since the last call, then its
    output (`Job.take_stream`), as runpod-python's `Job.stream()` reads them."""

    @app.get(f"{PREFIX}/stream/{{job_id}}", summary="RunPod's /stream: the job's progress "
             "updates since the last call, then its output", responses=job_doc)  # fmt: skip
    async def runpod_stream(request: Request, endpoint_id: str, job_id: str) -> JSONResponse:
        job = find_job(request, state, job_id)
        return JSONResponse({"id": job.id, "status": job.status, "stream": job.take_stream()})
