"""Backpressure and background jobs of the self-hosted server (no HTTP in here).

`Scheduler` lets `concurrency` inferences run per model and at most `max_queue` requests wait
(for a slot, or for a model to fit in memory); past that it refuses with `overloaded` instead of
piling work up. A batch of requests (`server/batching.py`) is one inference: it holds one slot.
`JobStore` keeps `/run` jobs in memory, bounded in count, age and the bytes of their results,
with RunPod's status names.
"""

from __future__ import annotations

import asyncio
import json
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

    `max_queue` counts requests admitted but not yet running (so it must be at least 1), plus
    those that `also_waiting` reports (requests waiting for a model to fit in memory).
    """

    def __init__(
        self,
        max_queue: int,
        concurrency: int = 1,
        retry_after_s: int = 5,
        also_waiting: Callable[[], int] = lambda: 0,
    ):
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.retry_after_s = retry_after_s
        self.also_waiting = also_waiting
        self.waiting = 0
        self.running = 0
        self._slots: dict[str, asyncio.Semaphore] = {}

    def admit(self) -> None:
        """Take a place in the waiting room, or raise `overloaded` (503) when it is full.

        Every successful `admit()` must be followed by exactly one `run()`.
        """
        if self.queued >= self.max_queue:
            raise ServiceError(
                "overloaded",
                f"the server is busy ({self.queued} requests waiting, limit {self.max_queue}); "
                f"retry in about {self.retry_after_s} s",
            )
        self.waiting += 1

    @property
    def queued(self) -> int:
        """Requests waiting: for a slot here, or for memory (`also_waiting`)."""
        return self.waiting + self.also_waiting()

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
    size: int = 0  # bytes of the output's JSON, counted against JobStore.max_bytes

    @property
    def done(self) -> bool:
        return self.status in (COMPLETED, FAILED)


def result_bytes(output: dict[str, Any]) -> int:
    """The size of a job's output as `/status` sends it (its JSON text)."""
    return len(json.dumps(output))


class JobStore:
    """Jobs by id: at most `max_jobs`, finished ones forgotten `ttl_s` seconds after the end,
    and finished results together at most `max_bytes` (the oldest finished go first). The ids
    of forgotten jobs are remembered (as many as `max_jobs`) so `/status` can say they expired.
    """

    def __init__(self, max_jobs: int, ttl_s: float, max_bytes: int = 200_000_000):
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()

    def _prune(self) -> None:
        now = time.monotonic()
        for job_id in [
            j.id for j in self._jobs.values() if j.done and now - j.finished > self.ttl_s
        ]:
            self._forget(job_id)
        # Over the count or byte limit the oldest finished jobs go first.
        finished = sorted((j for j in self._jobs.values() if j.done), key=lambda j: j.finished)
        stored = sum(j.size for j in finished)
        for job in finished:
            if len(self._jobs) < self.max_jobs and stored <= self.max_bytes:
                break
            stored -= job.size
            self._forget(job.id)

    def _forget(self, job_id: str) -> None:
        del self._jobs[job_id]
        self._expired[job_id] = None
        while len(self._expired) > self.max_jobs:
            self._expired.popitem(last=False)

    def finished(self, job: Job) -> None:
        """Count a finished job's result. One alone over `max_bytes` is replaced by an error
        (it would push every other result out and still not fit)."""
        if job.size > self.max_bytes:
            job.output, job.status, job.size = None, FAILED, 0
            job.error = ServiceError(
                "request_too_large",
                f"the result of job {job.id} is larger than this server keeps for /run jobs "
                f"(MAX_JOB_BYTES={self.max_bytes}): use /runsync, ask for fewer outputs, or "
                "set return_base64 to false",
            )
        self._prune()

    def expired(self, job_id: str) -> bool:
        """Whether `job_id` was a job here that has been forgotten (past its TTL or bounds)."""
        return job_id in self._expired

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
