"""RunPod serverless worker: `python -m da3_serverless.runpod_worker [RunPod flags]`.

RunPod's own flags work: `--rp_serve_api --rp_api_port N` (local test API), `--test_input`
(or `test_input.json` in the working directory). The model named by MODEL_ID is loaded and
warmed before the first job.

The handler is async: each job runs `Service.handle` in a worker thread with its own
`CancelToken`, so the event loop stays free for RunPod's stop signals (and for several jobs at
once, given a concurrency modifier). RunPod cancels a job (`/cancel`, a timeout) by cancelling
the handler's task (`JobScaler.stop_job`): the token is cancelled, the computation stops at its
next check, and the task ends once the thread is done, so the worker is then really free.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable

import runpod

from da3_serverless.api.errors import ServiceError
from da3_serverless.config import SettingsError, load_settings
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.service import Service

log = logging.getLogger(__name__)


def make_handler(service: Service) -> Callable[[dict], Awaitable[dict]]:
    """A RunPod handler: job `{"id", "input"}` -> the v1 response, or `{"error": "<JSON>"}`.

    RunPod models a job's `error` as a string, so our error object travels as JSON text (the
    client parses it back); RunPod then marks the job FAILED.
    """

    async def handler(job: dict) -> dict:
        cancel = CancelToken()
        work = asyncio.ensure_future(asyncio.to_thread(run_job, service, job, cancel))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await stop_job(service, job, cancel, work)
            raise

    return handler


def run_job(service: Service, job: dict, cancel: CancelToken) -> dict:
    """One job, in a worker thread: the v1 response, or RunPod's `{"error": "<JSON text>"}`."""
    try:
        return service.handle(job.get("input"), cancel=cancel)
    except ServiceError as error:
        return {"error": error.to_json()}
    except Exception:
        log.exception("job %s failed", job.get("id"))
        internal = ServiceError("internal", "internal error: the failure was logged; retry")
        return {"error": internal.to_json()}


async def stop_job(
    service: Service, job: dict, cancel: CancelToken, work: asyncio.Future[dict]
) -> None:
    """RunPod cancelled `job`: stop its computation and wait until its thread is done. A result
    that was past its last check (it completed anyway) is dropped with its files."""
    cancel.cancel("RunPod cancelled the job")
    started = time.monotonic()
    try:
        result = await asyncio.shield(work)
    except asyncio.CancelledError:  # cancelled again (the worker is stopping): wait no longer
        return
    if "error" not in result:
        service.discard(result)
    log.info("job %s stopped %.2f s after its cancel", job.get("id"), time.monotonic() - started)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = load_settings()
    except SettingsError as error:  # a worker with impossible settings must not take jobs
        log.error("%s", error)
        sys.exit(2)
    service = Service(settings)
    try:
        service.start()
    except Exception:  # a worker that cannot serve must fail loudly, not take jobs
        log.exception("model %s could not be loaded and warmed; exiting", settings.model_id)
        sys.exit(1)
    if settings.ready_file is not None:
        settings.ready_file.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    runpod.serverless.start({"handler": make_handler(service)})


if __name__ == "__main__":
    main()
