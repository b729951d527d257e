"""What a transport tells the service about the job a request runs as (`JobInfo`): its id
(bucket keys carry it), the bucket its caller gave (RunPod's `s3Config`), and where its
progress goes (RunPod's `progress_update`, the self-hosted `/status`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.storage import Bucket

log = logging.getLogger(__name__)
S3_CONFIG_FIELDS = ("accessId", "accessSecret", "bucketName", "endpointUrl")


@dataclass
class JobInfo:
    """One job's id, its own bucket (None: the configured one) and its progress callback."""

    id: str | None = None
    bucket: Bucket | None = None
    progress: Callable[[dict[str, Any]], None] | None = None


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
