"""What a transport tells the service about the job a request runs as (`JobInfo`): its id
(bucket keys carry it), the bucket its caller gave (RunPod's `s3Config`), and where its
progress goes (RunPod's `progress_update`, the self-hosted `/status`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.storage import Bucket

log = logging.getLogger(__name__)
S3_CONFIG_FIELDS = ("accessId", "accessSecret", "bucketName", "endpointUrl")
# A job's stages in order, each with its share of the overall percent (from, to).
STAGES = {"downloading": (0, 10), "decoding": (10, 20), "forward": (20, 85),
          "encoding": (85, 95), "uploading": (95, 100)}  # fmt: skip
MIN_STEP = 5  # within a stage, an update is sent once the percent rose this much


@dataclass
class JobInfo:
    """One job's id, its own bucket (None: the configured one) and its progress callback."""

    id: str | None = None
    bucket: Bucket | None = None
    progress: Callable[[dict[str, Any]], None] | None = None


class Progress:
    """A job's progress as one object per update, `{"stage", "percent", "message"}` (what the
    worker sends with RunPod's `progress_update` and `/status` shows as `output` while the job
    is IN_PROGRESS). The percent never goes back; a new stage is always sent, updates within a
    stage once the percent rose `MIN_STEP` (a few dozen updates a job at most). Thread-safe; a
    failing sink is logged, never raised."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None):
        self.sink = sink
        self._lock = threading.Lock()
        self._percent = -1
        self._stage = ""

    def update(self, stage: str, done: int = 0, total: int = 0) -> None:
        """Report `stage` (a `STAGES` name), `done` of `total` steps into it."""
        if self.sink is None:
            return
        start, end = STAGES[stage]
        share = min(done / total, 1.0) if total > 0 else 0.0
        with self._lock:
            percent = max(self._percent, int(start + (end - start) * share))
            if stage == self._stage and percent < self._percent + MIN_STEP:
                return
            self._percent, self._stage = percent, stage
        message = f"forward block {done} of {total}" if stage == "forward" and total else stage
        try:
            self.sink({"stage": stage, "percent": percent, "message": message})
        except Exception:
            log.exception("progress update failed")


def bucket_from_s3_config(config: object) -> Bucket | None:
    """RunPod's `s3Config` (`accessId`, `accessSecret`, `bucketName`, `endpointUrl`) as a
    `Bucket`; None when absent. Raises `invalid_input` naming what is missing."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ServiceError("invalid_input", "s3Config must be an object of " + _fields())
    missing = [name for name in S3_CONFIG_FIELDS if not isinstance(config.get(name), str)]
    if missing or not config["endpointUrl"].startswith(("http://", "https://")):
        raise ServiceError(
            "invalid_input",
            f"s3Config needs {_fields()} as text, endpointUrl an http(s) URL (missing or "
            f"wrong: {', '.join(missing) or 'endpointUrl'})",
        )
    return Bucket(
        config["endpointUrl"].rstrip("/"), config["bucketName"], config["accessId"],
        config["accessSecret"],
    )  # fmt: skip


def _fields() -> str:
    return ", ".join(S3_CONFIG_FIELDS)
