"""Request log and metrics as a pure ASGI middleware.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which runs the app in a task of its own
and hides the client's disconnect from it: the routes below must see a client that gives up.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from da3_serverless.server.metrics import Metrics

log = logging.getLogger(__name__)
# Paths polled by machines: counted in the metrics, not logged.
QUIET_PATHS = ("/metrics", "/health", "/static")


def request_id(headers: Mapping[str, str]) -> str:
    """The client's X-Request-ID when it is short and plain, else a new one."""
    given = headers.get("x-request-id", "")
    if 0 < len(given) <= 64 and all(c.isalnum() or c in "-_." for c in given):
        return given
    return uuid.uuid4().hex


class RequestLog:
    """Gives each HTTP request an id (echoed as X-Request-ID) and a `log` dict in its state
    that routes fill, then counts the request in `metrics` and logs one JSON line of it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope))
        state = scope.setdefault("state", {})
        state["request_id"], state["log"] = rid, {}
        status = 500  # unless a response starts
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status, time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        fields = scope["state"]["log"]
        path = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.observe(path, str(status), fields.get("code"), elapsed)
        if path not in QUIET_PATHS:
            line = {"request_id": scope["state"]["request_id"], "method": scope["method"],
                    "path": path, "status": status, "duration_ms": round(elapsed * 1000, 1),
                    **fields}  # fmt: skip
            log.info("request", extra={"fields": line})
