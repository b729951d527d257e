"""RunPod serverless worker: `python -m da3_serverless.runpod_worker [RunPod flags]`.

RunPod's own flags work: `--rp_serve_api --rp_api_port N` (local test API), `--test_input`
(or `test_input.json` in the working directory). The model named by MODEL_ID is loaded and
warmed before the first job.

The handler is async and the worker takes up to `MAX_BATCH` jobs at once (RunPod's
`concurrency_modifier`, bounded by the request budget): jobs that may share a forward are
gathered into batches as on the self-hosted server (`server/batching.py`), the others run
alone; forwards take the model's slot in turn (`server/queue.py`), each in a worker thread,
so the event loop stays free for RunPod's stop signals. Each job has its own cancel flag (a
`Job`): RunPod cancels a job (`/cancel`, a timeout) by cancelling the handler's task
(`JobScaler.stop_job`); the job then leaves its queue or batch, or stops at its next check, and
the task ends once its thread is done, so the worker is then really free.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import runpod

from da3_serverless.api.budget import MIN_BUDGET_TOKENS
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import JobInfo, bucket_from_s3_config
from da3_serverless.config import Settings, SettingsError, load_settings
from da3_serverless.inference.cancel import Cancelled
from da3_serverless.server.batching import Batcher, BatchItem
from da3_serverless.server.queue import Job, Scheduler
from da3_serverless.service import Service
from da3_serverless.startup import StartupError, check_start, workspace_line

log = logging.getLogger(__name__)


def make_handler(service: Service) -> Callable[[dict], Awaitable[dict]]:
    """A RunPod handler: job `{"id", "input"}` -> the v1 response, or `{"error": "<JSON>"}`.

    RunPod models a job's `error` as a string, so our error object travels as JSON text (the
    client parses it back); RunPod then marks the job FAILED. Concurrent jobs batch where they
    can (`MAX_BATCH`, `BATCH_WAIT_MS`); the key and format are checked before a job waits.
    """
    settings = service.settings
    # RunPod bounds the jobs in flight (concurrency_modifier); its local test API does not.
    waiting_room = max(settings.max_queue, jobs_at_once(service))
    scheduler = Scheduler(max_queue=waiting_room, concurrency=settings.model_concurrency)
    batcher = None
    if settings.max_batch > 1:
        wait_s = settings.batch_wait_ms / 1000
        batcher = Batcher(scheduler, service.handle_batch, settings.max_batch, wait_s)

    async def serve(payload: Any, task: Job) -> dict:
        request = service.authorize(payload)
        model_key, batch_key = service.model_key(request), service.batch_key(request)
        scheduler.admit()
        if batch_key is not None and batcher is not None:
            return await batcher.submit(batch_key, model_key, BatchItem(payload, None, task))
        return await scheduler.run(
            model_key, lambda: service.handle(payload, cancel=task.cancel, job=task.info), task
        )

    async def handler(job: dict) -> dict:
        task = Job(id=str(job.get("id")))
        try:  # RunPod passes the request's s3Config on: that job's outputs go to its bucket
            bucket = bucket_from_s3_config(job.get("s3Config"))
            task.info = JobInfo(task.id, bucket, progress=lambda update: _progress(job, update))
        except ServiceError as error:
            return {"error": error.to_json()}
        work = asyncio.ensure_future(run_job(serve, job, task))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await stop_job(service, job, task, work)
            raise

    return handler


def _progress(job: dict, update: dict) -> None:
    """A job's progress (its stages, a sequence's chunk summaries) to RunPod's job progress
    (`/status` shows it as the output while the job runs); runpod-python sends it from a
    thread of its own."""
    runpod.serverless.progress_update(job, update)


async def run_job(serve: Callable[[Any, Job], Awaitable[dict]], job: dict, task: Job) -> dict:
    """One job: the v1 response, or RunPod's `{"error": "<JSON text>"}`."""
    try:
        return await serve(job.get("input"), task)
    except Cancelled as stop:  # cancelled while it waited: it never ran
        error = ServiceError("cancelled", f"{stop}: it left the queue without running")
        return {"error": error.to_json()}
    except ServiceError as error:
        return {"error": error.to_json()}
    except Exception:
        log.exception("job %s failed", job.get("id"))
        internal = ServiceError("internal", "internal error: the failure was logged; retry")
        return {"error": internal.to_json()}


async def stop_job(service: Service, job: dict, task: Job, work: asyncio.Future[dict]) -> None:
    """RunPod cancelled `job`: it leaves its queue or batch, or its computation stops; wait
    until its thread is done. A result that was past its last check (it completed anyway) is
    dropped with its files."""
    task.request_cancel("RunPod cancelled the job")
    started = time.monotonic()
    try:
        result = await asyncio.shield(work)
    except asyncio.CancelledError:  # cancelled again (the worker is stopping): wait no longer
        return
    if "error" not in result:  # off the event loop: bucket deletes are network calls
        await asyncio.to_thread(service.discard, result)
    log.info("job %s stopped %.2f s after its cancel", job.get("id"), time.monotonic() - started)


def jobs_at_once(service: Service) -> int:
    """How many jobs the worker takes at once: `MAX_BATCH` (1 without batching), and no more
    than the request budget holds square views at the native 504 px (`MIN_BUDGET_TOKENS`
    each), so that the jobs it holds can mostly run as one batch."""
    within_budget = service.budget.tokens // MIN_BUDGET_TOKENS
    return max(1, min(service.settings.max_batch, within_budget))


def worker_config(service: Service) -> dict[str, Any]:
    """The configuration `runpod.serverless.start` takes: the handler and how many jobs the
    worker takes at once."""
    at_once = jobs_at_once(service)
    return {"handler": make_handler(service), "concurrency_modifier": lambda current: at_once}


# A run of base64 long enough to be a file (a photo, a depth map), never an id or a word.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")


def without_base64(text: str) -> str:
    """`text` with each run of 200+ base64 characters replaced by `<N base64 chars>`."""
    return BASE64_RUN.sub(lambda run: f"<{len(run.group())} base64 chars>", text)


def quiet_runpod_logs() -> None:
    """RunPod's SDK logs each handler output (and a local test input) at DEBUG, its default
    level: the photos and depth maps as base64, kilobytes a line. Its one logger (a process
    singleton) keeps logging everything, each base64 run shortened to its length."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    logger = RunPodLogger()
    original = logger.log

    def log_without_base64(message: object, message_level: str = "INFO", job_id=None) -> None:
        original(without_base64(str(message)), message_level, job_id)

    logger.log = log_without_base64  # type: ignore[method-assign]


def worker_settings(settings: Settings) -> Settings:
    """The worker's settings: without DA3_API_KEY it serves every request, because RunPod
    itself refuses any request to the endpoint without the account's API key before a job
    reaches a worker (a Hub deployment with the default form works at once; DA3_API_KEY adds
    a second key). The self-hosted server, which nothing stands in front of, keeps refusing."""
    if settings.api_key:
        return settings
    log.info("DA3_API_KEY is empty: RunPod's own API key authenticates every request")
    return settings.model_copy(update={"allow_unauthenticated": True})


def main() -> None:
    quiet_runpod_logs()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = worker_settings(load_settings())
    except SettingsError as error:  # a worker with impossible settings must not take jobs
        log.error("%s", error)
        sys.exit(2)
    log.info("%s", workspace_line(settings))
    try:
        check_start(settings)  # three lines that say what to do, not a traceback
    except StartupError as error:
        log.error("%s", error)
        sys.exit(1)
    service = Service(settings)
    try:
        service.start()
    except Exception:  # a worker that cannot serve must fail loudly, not take jobs
        log.exception("model %s could not be loaded and warmed; exiting", settings.model_id)
        sys.exit(1)
    if settings.ready_file is not None:
        settings.ready_file.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    runpod.serverless.start(worker_config(service))


if __name__ == "__main__":
    main()
