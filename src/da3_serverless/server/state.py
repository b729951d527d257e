"""What the server's routes share: `AppState` (settings, the service, the queue, the jobs, the
metrics, the batcher, the link signer, the phase). Its own module, below the route modules and
`app.py` alike, so every route module imports it without a loop back to the app."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.links import LinkSigner
from da3_serverless.config import Settings
from da3_serverless.server.batching import Batcher
from da3_serverless.server.errors import RETRY_AFTER_S
from da3_serverless.server.metrics import Metrics
from da3_serverless.server.queue import JobStore, Scheduler
from da3_serverless.service import Service

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """What the routes share: settings, the service, the queue, the jobs and the metrics;
    `draining` once a stop signal arrived, `start_error` the error code when the default model
    failed (the reason itself goes to the log only); `batcher` gathers requests into batches
    (None with `MAX_BATCH=1`); `links` signs the download links to stored outputs."""

    settings: Settings
    service: Service
    scheduler: Scheduler
    jobs: JobStore
    metrics: Metrics
    links: LinkSigner
    draining: bool = False
    start_error: str | None = None
    batcher: Batcher | None = None

    @classmethod
    def build(cls, settings: Settings, service: Service) -> AppState:
        scheduler = Scheduler(
            settings.max_queue, settings.model_concurrency, RETRY_AFTER_S,
            also_waiting=lambda: service.waiting_for_memory,
        )  # fmt: skip
        metrics = Metrics(
            waiting=lambda: scheduler.queued,
            running=lambda: scheduler.running,
            ready=lambda: float(service.ready),
        )
        jobs = JobStore(settings.max_jobs, settings.job_ttl_s, settings.max_job_bytes)
        batcher = None
        if settings.max_batch > 1:
            wait_s = settings.batch_wait_ms / 1000
            batcher = Batcher(scheduler, service.handle_batch, settings.max_batch, wait_s)
        links = LinkSigner.from_settings(settings)
        return cls(settings, service, scheduler, jobs, metrics, links, batcher=batcher)

    def drain(self) -> None:
        """Stop taking new work (answered 503) while running jobs finish."""
        self.draining = True

    def load_model(self) -> None:
        """Load and warm the default model; on failure keep serving /health and /ready with
        the reason."""
        try:
            self.service.start()
        except Exception as exc:
            self.start_error = _error_code(exc)
            model = self.settings.model_id
            log.exception("model load failed", extra={"fields": {"model": model}})

    @property
    def phase(self) -> str:
        """`loading`, `ready`, `draining` or `failed`: what /ready tells anyone who asks."""
        if self.draining:
            return "draining"
        if self.start_error is not None:
            return "failed"
        return "ready" if self.service.ready else "loading"


def _error_code(exc: Exception) -> str:
    """The error code of a failed start: a ServiceError's own, `out_of_memory`, or
    `model_unavailable` for anything else (the weights are missing, damaged, ...)."""
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out_of_memory"
    return "model_unavailable"
