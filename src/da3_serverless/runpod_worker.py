"""RunPod serverless worker: `python -m da3_serverless.runpod_worker [RunPod flags]`.

RunPod's own flags work: `--rp_serve_api --rp_api_port N` (local test API), `--test_input`
(or `test_input.json` in the working directory). The model named by MODEL_ID is loaded and
warmed before the first job.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import runpod

from da3_serverless.api.errors import ServiceError
from da3_serverless.config import SettingsError, load_settings
from da3_serverless.service import Service

log = logging.getLogger(__name__)


def make_handler(service: Service) -> Callable[[dict], dict]:
    """A RunPod handler: job `{"id", "input"}` -> the v1 response, or `{"error": "<JSON>"}`.

    RunPod models a job's `error` as a string, so our error object travels as JSON text (the
    client parses it back); RunPod then marks the job FAILED.
    """

    def handler(job: dict) -> dict:
        try:
            return service.handle(job.get("input"))
        except ServiceError as error:
            return {"error": error.to_json()}
        except Exception:
            log.exception("job %s failed", job.get("id"))
            internal = ServiceError("internal", "internal error: the failure was logged; retry")
            return {"error": internal.to_json()}

    return handler


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
