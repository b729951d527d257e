"""Backpressure and background jobs of the self-hosted server (no HTTP in here).

`Scheduler` lets `concurrency` inferences run per model and at most `max_queue` requests wait
(for a slot, or for a model to fit in memory); past that it refuses with `overloaded` instead of
piling work up. A batch of requests (`server/batching.py`) is one inference: it holds one slot.
`JobStore` keeps jobs in memory, bounded in count, age and the bytes of their results, with
RunPod's status names. A `Job` carries its cancel flag: cancelled while queued it leaves the
queue without running; while running, it stops at its next check (docs/ARCHITECTURE.md §7).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import JobInfo
from da3_serverless.inference.cancel import Cancelled, CancelToken

T = TypeVar("T")

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED"
CANCELLED, TIMED_OUT = "CANCELLED", "TIMED_OUT"


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

    async def run(self, model_key: str, fn: Callable[[], T], job: Job | None = None) -> T:
        """Wait for a slot of `model_key`, then run the blocking `fn` in a worker thread.

        With `job`: it is IN_PROGRESS once it holds a slot, and cancelled while it waits it
        leaves the queue at once without running (raising `Cancelled`)."""
        slot = self.slot(model_key)
        try:
            taken = await _take(slot, job.stop if job is not None else None)
        finally:
            self.waiting -= 1
        if not taken:
            assert job is not None
            raise Cancelled(job.cancel.reason)
        if job is not None:
            job.status, job.started = IN_PROGRESS, time.monotonic()
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


async def _take(slot: asyncio.Semaphore, stop: asyncio.Event | None) -> bool:
    """Acquire `slot`, unless `stop` is set first: then False, and the slot is not held."""
    if stop is None:
        await slot.acquire()
        return True
    taking = asyncio.ensure_future(slot.acquire())
    stopping = asyncio.ensure_future(stop.wait())
    held = False
    try:
        await asyncio.wait((taking, stopping), return_when=asyncio.FIRST_COMPLETED)
        held = taking.done() and not taking.cancelled() and not stop.is_set()
    finally:
        stopping.cancel()
        taking.cancel()  # a waiter cancelled in time gives its turn on (asyncio.Semaphore)
        if not held and taking.done() and not taking.cancelled():
            slot.release()
    return held


# Progress updates a job keeps for /stream, and RunPod's largest stream item.
MAX_STREAM_BACKLOG = 256
STREAM_CHUNK_BYTES = 1_000_000


@dataclass
class Job:
    """One job (`/run`, `/runsync` and RunPod's paths): RunPod's status name, times
    (monotonic), the output or the error, and its cancel flag (`cancel` for the thread that
    runs it, `stop` for the queue it waits in)."""

    id: str
    status: str = IN_QUEUE
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    output: dict[str, Any] | None = None
    error: ServiceError | None = None
    task: asyncio.Task[None] | None = None
    size: int = 0  # bytes of the output's JSON, counted against JobStore.max_bytes
    keep: bool = True  # the result is kept for /status (not when a /runsync caller takes it)
    ttl_s: float | None = None  # how long it stays once finished (None: the store's TTL)
    cancel: CancelToken = field(default_factory=CancelToken)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    info: JobInfo | None = None  # what the service is told about it (JobInfo(id) by default)
    retry: Any = None  # what RunPod's /retry runs again: a FAILED or TIMED_OUT job's request
    progress: dict[str, Any] | None = None  # the latest progress update (a sequence's chunk)
    # Progress updates not yet fetched from RunPod's /stream (at most MAX_STREAM_BACKLOG).
    backlog: list[dict[str, Any]] = field(default_factory=list)
    streamed_output: bool = False  # /stream has sent the final output

    def __post_init__(self) -> None:
        if self.info is None:
            self.info = JobInfo(self.id, progress=self.report)

    def report(self, update: dict[str, Any]) -> None:
        """The job's latest progress (from the thread running it); `/status` shows it as the
        output while the job runs, as RunPod does."""
        self.progress = update
        self.backlog = [*self.backlog[-(MAX_STREAM_BACKLOG - 1) :], update]

    def take_stream(self) -> list[dict[str, Any]]:
        """RunPod's /stream items since the last call: each progress update once, then the
        final output once (when it fits RunPod's 1 MB stream chunk)."""
        items, self.backlog = [{"output": update} for update in self.backlog], []
        if self.status == COMPLETED and self.output is not None and not self.streamed_output:
            self.streamed_output = True
            if self.size <= STREAM_CHUNK_BYTES:
                items.append({"output": self.output})
        return items

    @property
    def done(self) -> bool:
        return self.status in (COMPLETED, FAILED, CANCELLED, TIMED_OUT)

    def request_cancel(self, reason: str, status: str = CANCELLED) -> None:
        """Cancel the job (from the event loop): `status` (CANCELLED, or TIMED_OUT for a job
        past its time limits) at once, unless it has finished or is past its last check (then
        it completes). A queued job leaves the queue; a running one stops at its next check
        and frees the worker."""
        if self.done or not self.cancel.cancel(reason):
            return
        self.status = status
        self.stop.set()


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
        self.tally: Counter[str] = Counter()  # finished jobs by status, since the start

    def _prune(self) -> None:
        now = time.monotonic()
        # Finished: its task has ended (a cancelled job may still be stopping).
        finished = sorted(
            (j for j in self._jobs.values() if j.done and j.finished is not None),
            key=lambda j: j.finished,
        )
        for job in [j for j in finished if now - j.finished > self._ttl(j)]:
            self._forget(job.id)
        # Over the count or byte limit the oldest finished jobs go first.
        finished = [j for j in finished if j.id in self._jobs]
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

    def _ttl(self, job: Job) -> float:
        return job.ttl_s if job.ttl_s is not None else self.ttl_s

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

    def new(self, job_id: str | None = None) -> Job:
        """A new job in IN_QUEUE. Unfinished jobs are never dropped (the scheduler bounds them)."""
        self._prune()
        job = Job(id=job_id or uuid.uuid4().hex)
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        self._prune()
        return self._jobs.get(job_id)

    def forget(self, job_id: str) -> None:
        """Drop a job whose answer was delivered (a `/runsync` that finished in time)."""
        self._jobs.pop(job_id, None)

    def queued(self) -> list[Job]:
        """The jobs waiting for the model, oldest first."""
        return [job for job in self._jobs.values() if job.status == IN_QUEUE]

    def unfinished_tasks(self) -> list[asyncio.Task[None]]:
        return [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
