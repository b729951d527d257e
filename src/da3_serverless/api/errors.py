"""The service's own errors: a code, an HTTP status and a message that says how to fix it."""

from __future__ import annotations

import json
from typing import Any

# code -> HTTP status (docs/ARCHITECTURE.md §4)
STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    # 499 "client closed request", as gRPC's CANCELLED maps to HTTP: the job was cancelled
    # (by /cancel, or its client went away) and stopped without a result.
    "cancelled": 499,
    "image_too_large": 413,
    "request_too_large": 413,
    "unsupported_model": 400,
    "fetch_failed": 502,
    "model_unavailable": 503,
    "out_of_memory": 503,
    "overloaded": 503,
    "internal": 500,
}


class ServiceError(Exception):
    """An error a client can act on. The message never holds secrets or stack traces."""

    def __init__(self, code: str, message: str, status: int | None = None):
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_BY_CODE[code]

    def fields(self) -> dict[str, Any]:
        """The error object's fields, `{"code", "status", "message"}`: what a RunPod job's
        `error` carries (as JSON text, `to_json`) and what a `/run` job records."""
        return {"code": self.code, "status": self.status, "message": self.message}

    def to_json(self) -> str:
        """`fields()` as JSON text: RunPod models a job's `error` as a string."""
        return json.dumps(self.fields())

    def to_dict(self) -> dict[str, Any]:
        """The self-hosted v1 error body: `{"error": {"code", "message"}, "status"}`."""
        return {"error": {"code": self.code, "message": self.message}, "status": self.status}

    def __repr__(self) -> str:
        return f"ServiceError({self.code!r}, {self.message!r}, status={self.status})"
