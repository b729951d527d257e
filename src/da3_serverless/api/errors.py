"""The service's own errors: a code, an HTTP status and a message that says how to fix it."""

from __future__ import annotations

from typing import Any

# code -> HTTP status (DESIGN §4)
STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    "image_too_large": 413,
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

    def to_dict(self) -> dict[str, Any]:
        """The v1 error object: `{"error": {"code", "message"}, "status"}`."""
        return {"error": {"code": self.code, "message": self.message}, "status": self.status}

    def __repr__(self) -> str:
        return f"ServiceError({self.code!r}, {self.message!r}, status={self.status})"
