"""Request log and metrics, and the limit on requests at once, as pure ASGI middleware.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which runs the app in a task of its own
and hides the client's disconnect from it: the routes below must see a client that gives up.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from da3_serverless.api.errors import ServiceError
from da3_serverless.server.metrics import Metrics

log = logging.getLogger(__name__)
# Paths polled by machines: counted in the metrics, not logged.
QUIET_PATHS = ("/metrics", "/health", "/static")
# Cheap probes an orchestrator must reach on a busy server: not counted by ConnectionLimit.
PROBE_PATHS = ("/health", "/ready", "/metrics")


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


class ConnectionLimit:
    """At most `limit` HTTP requests at once (MAX_CONNECTIONS; bodies still uploading count);
    past it the answer is 503 `overloaded` in our error shape with a Retry-After, at once.
    Probes (PROBE_PATHS) are not counted. uvicorn's own `limit_concurrency`, set higher, stays
    as a backstop for what an ASGI app cannot see (idle connections); it answers plain text.
    """

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int):
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await self._refuse(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ServiceError(
            "overloaded",
            f"the server is handling {self.active} requests, its limit (MAX_CONNECTIONS); "
            f"retry in about {self.retry_after_s} s",
        )
        scope.get("state", {}).get("log", {})["code"] = error.code
        headers = {"Retry-After": str(self.retry_after_s)}
        await JSONResponse(error.to_dict(), error.status, headers)(scope, receive, send)
