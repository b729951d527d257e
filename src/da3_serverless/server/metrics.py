"""Prometheus metrics of one app, in the app's own collector registry (several apps may live in
one process, as in the tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    """Requests by path and status, errors by code, latency, and live gauges for the queue
    depth, the inferences running and whether the default model is ready."""

    def __init__(
        self,
        waiting: Callable[[], float],
        running: Callable[[], float],
        ready: Callable[[], float],
    ):
        self.collectors = CollectorRegistry()
        r = self.collectors
        self.requests = Counter(
            "da3_http_requests", "HTTP requests", ["path", "status"], registry=r
        )
        self.errors = Counter("da3_errors", "Errors by code", ["code"], registry=r)
        self.latency = Histogram(
            "da3_request_duration_seconds", "Request latency", ["path"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip
        Gauge("da3_queue_depth", "Requests waiting", registry=r).set_function(waiting)
        Gauge("da3_inflight", "Inferences running", registry=r).set_function(running)
        Gauge("da3_model_ready", "Default model loaded", registry=r).set_function(ready)

    def observe(self, path: str, status: str, code: str | None, seconds: float) -> None:
        self.requests.labels(path, status).inc()
        self.latency.labels(path).observe(seconds)
        if code is not None:
            self.errors.labels(code).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its media type."""
        return generate_latest(self.collectors), CONTENT_TYPE_LATEST
