"""Backpressure and background jobs of the self-hosted server (no HTTP in here).

`Scheduler` lets `concurrency` inferences run per model and at most `max_queue` requests wait;
past that it refuses with `overloaded` instead of piling work up. A batch of requests
(`server/batching.py`) is one inference: it holds one slot. `JobStore` keeps `/run` jobs
in memory, bounded in count and age, with RunPod's status names.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread

from da3_serverless.api.errors import ServiceError

T = TypeVar("T")

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED"


class Scheduler:
    """Per-model concurrency limit with one bounded waiting room shared by all models.

    `max_queue` counts requests admitted but not yet running (so it must be at least 1).
    """

    def __init__(self, max_queue: int, concurrency: int = 1, retry_after_s: int = 5):
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.retry_after_s = retry_after_s
        self.waiting = 0
        self.running = 0
        self._slots: dict[str, asyncio.Semaphore] = {}

    def admit(self) -> None:
        """Take a place in the waiting room, or raise `overloaded` (503) when it is full.

        Every successful `admit()` must be followed by exactly one `run()`.
        """
        if self.waiting >= self.max_queue:
            raise ServiceError(
                "overloaded",
                f"the server is busy ({self.waiting} requests waiting, limit {self.max_queue}); "
                f"retry in about {self.retry_after_s} s",
            )
        self.waiting += 1

    async def run(self, model_key: str, fn: Callable[[], T]) -> T:
        """Wait for a slot of `model_key`, then run the blocking `fn` in a worker thread."""
        slot = self.slot(model_key)
        try:
            await slot.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            # Not abandoned on cancel: a disconnected client must not leave the model busy
            # behind the semaphore's back.
            return await anyio.to_thread.run_sync(fn)
        finally:
            self.running -= 1
            slot.release()

    def slot(self, model_key: str) -> asyncio.Semaphore:
        """The `concurrency` slots of `model_key`'s inferences (a batch takes one)."""
        return self._slots.setdefault(model_key, asyncio.Semaphore(self.concurrency))

    def withdraw(self, requests: int = 1) -> None:
        """Admitted requests leave the waiting room without `run()`: they start as a batch
        that holds its own slot, or were cancelled before they started."""
        self.waiting -= requests


@dataclass
class Job:
    """One `/run` job: RunPod's status name, times (monotonic), the output or the error."""

    id: str
    status: str = IN_QUEUE
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    output: dict[str, Any] | None = None
    error: ServiceError | None = None
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.status in (COMPLETED, FAILED)


class JobStore:
    """Jobs by id: at most `max_jobs`, finished ones forgotten `ttl_s` seconds after the end."""

    def __init__(self, max_jobs: int, ttl_s: float):
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def _prune(self) -> None:
        now = time.monotonic()
        for job_id in [
            j.id for j in self._jobs.values() if j.done and now - j.finished > self.ttl_s
        ]:
            del self._jobs[job_id]
        # Over the count limit the oldest finished jobs go first.
        for job_id in [j.id for j in self._jobs.values() if j.done]:
            if len(self._jobs) < self.max_jobs:
                break
            del self._jobs[job_id]

    def new(self) -> Job:
        """A new job in IN_QUEUE. Unfinished jobs are never dropped (the scheduler bounds them)."""
        self._prune()
        job = Job(id=uuid.uuid4().hex)
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        self._prune()
        return self._jobs.get(job_id)

    def unfinished_tasks(self) -> list[asyncio.Task[None]]:
        return [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
