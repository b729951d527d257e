"""Gathering requests that may share a forward into batches (no HTTP in here).

Requests with the same batch key (`Service.batch_key`: model and forward flags) queue in one
lane. A lane's dispatcher waits until it holds `max_batch` requests or its oldest one has
waited `wait_s`, then takes one of the model's `Scheduler` slots and, once it has it, every
request that queued meanwhile (at most `max_batch`): so under load batches fill while the
model is busy, and a lone request never waits longer than the window for company. One batch
holds one slot and runs `Service.handle_batch` in a worker thread. A request whose job is
cancelled (or whose waiting task is) while it is gathered leaves its lane at once, and the
waiting room, raising `Cancelled`; one cancelled after its batch started stops at its own next
check, and the batch's shared forward stops once all of its requests are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio.to_thread

from da3_serverless.api.errors import ServiceError
from da3_serverless.inference.cancel import Cancelled
from da3_serverless.server.queue import IN_PROGRESS, Job, Scheduler

log = logging.getLogger(__name__)

HandleBatch = Callable[[Sequence[tuple]], list]


@dataclass
class BatchItem:
    """One admitted request: its v1 payload, the key from its headers, its `Job` (cancel flag
    and status: IN_PROGRESS once its batch starts) and `on_start(size)`, called on the event
    loop when its batch (of `size` requests) starts."""

    payload: object
    api_key: str | None
    job: Job | None = None
    on_start: Callable[[int], None] | None = None


@dataclass
class _Entry:
    item: BatchItem
    future: asyncio.Future
    arrived: float


@dataclass
class _Lane:
    """The requests of one batch key waiting for their batch, and the task dispatching them."""

    key: tuple
    model_key: str
    entries: deque[_Entry] = field(default_factory=deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class Batcher:
    """Runs admitted requests in batches of up to `max_batch`, gathered for at most `wait_s`.

    Every submitted request must have been admitted by `scheduler.admit()`; the batcher takes
    it out of the waiting room when its batch starts or when it is cancelled before.
    """

    def __init__(
        self, scheduler: Scheduler, handle_batch: HandleBatch, max_batch: int, wait_s: float
    ):
        self.scheduler = scheduler
        self.handle_batch = handle_batch
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._lanes: dict[tuple, _Lane] = {}
        self._running: set[asyncio.Task] = set()

    async def submit(self, key: tuple, model_key: str, item: BatchItem) -> dict:
        """The response of `item`, run with whatever requests of the same `key` come along;
        raises its `ServiceError` (or unexpected error), or `Cancelled` when its job was
        cancelled before its batch started."""
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key, model_key)
        entry = _Entry(item, loop.create_future(), loop.time())
        lane.entries.append(entry)
        lane.changed.set()
        if lane.task is None:
            lane.task = asyncio.create_task(self._dispatch(lane))
        try:
            await _until_done_or_stopped(entry.future, item.job)
            if not entry.future.done() and entry in lane.entries:  # cancelled while gathered
                self._leave(lane, entry)
                raise Cancelled(item.job.cancel.reason)
            return await entry.future  # in a batch: it ends with its own answer or error
        except asyncio.CancelledError:
            self._leave(lane, entry)
            raise

    def _leave(self, lane: _Lane, entry: _Entry) -> None:
        """A gathered request goes without holding its batch up (one already in a batch
        stays: its own check stops it)."""
        if entry in lane.entries:
            lane.entries.remove(entry)
            self.scheduler.withdraw()
            lane.changed.set()

    async def _dispatch(self, lane: _Lane) -> None:
        """Form and start the lane's batches until it is empty, then close the lane."""
        try:
            while lane.entries:
                await self._gathered(lane)
                if not lane.entries:
                    break
                slot = self.scheduler.slot(lane.model_key)
                await slot.acquire()
                count = min(self.max_batch, len(lane.entries))
                batch = [lane.entries.popleft() for _ in range(count)]
                if not batch:
                    slot.release()
                    continue
                self.scheduler.withdraw(len(batch))
                task = asyncio.create_task(self._run(lane.model_key, batch, slot))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        except asyncio.CancelledError:
            self._fail_waiting(lane)
            raise
        finally:
            if self._lanes.get(lane.key) is lane:
                del self._lanes[lane.key]

    async def _gathered(self, lane: _Lane) -> None:
        """Until the lane holds a full batch or its oldest request has waited the window."""
        loop = asyncio.get_running_loop()
        while lane.entries and len(lane.entries) < self.max_batch:
            remaining = lane.entries[0].arrived + self.wait_s - loop.time()
            if remaining <= 0:
                return
            lane.changed.clear()
            try:
                await asyncio.wait_for(lane.changed.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self, model_key: str, batch: list[_Entry], slot: asyncio.Semaphore) -> None:
        """One batch in a worker thread, holding one slot; each answer to its request."""
        loop = asyncio.get_running_loop()
        for entry in batch:  # cancelled between the gathering and the start: never runs
            if entry.item.job is not None and entry.item.job.cancel.cancelled:
                _settle(entry.future, Cancelled(entry.item.job.cancel.reason))
        live = [entry for entry in batch if not entry.future.done()]
        waited_ms = round((loop.time() - min(e.arrived for e in batch)) * 1000, 1)
        log.info(
            "batch formed",
            extra={"fields": {"model": model_key, "batch": len(live), "waited_ms": waited_ms}},
        )
        for entry in live:
            _started(entry.item, len(live))
        self.scheduler.running += 1
        try:
            items = [_request(entry.item) for entry in live]
            # Not abandoned on cancel: the model stays busy until the thread is done.
            results = await anyio.to_thread.run_sync(self.handle_batch, items) if live else []
        except BaseException as error:
            for entry in live:
                _settle(entry.future, error)
            raise
        finally:
            self.scheduler.running -= 1
            slot.release()
        for entry, result in zip(live, results, strict=True):
            _settle(entry.future, result)

    def _fail_waiting(self, lane: _Lane) -> None:
        """The dispatcher stopped (the server is going down): its gathered requests fail."""
        error = ServiceError("model_unavailable", "the server is shutting down; retry elsewhere")
        while lane.entries:
            _settle(lane.entries.popleft().future, error)
            self.scheduler.withdraw()


async def _until_done_or_stopped(future: asyncio.Future, job: Job | None) -> None:
    """Wait until `future` is done or `job` is cancelled (its `stop` event), whichever first."""
    if job is None:
        await asyncio.wait((future,))
        return
    stopping = asyncio.ensure_future(job.stop.wait())
    try:
        await asyncio.wait((future, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


def _started(item: BatchItem, size: int) -> None:
    """The request's batch (of `size`) starts: its job is IN_PROGRESS (unless cancelled)."""
    if item.job is not None and not item.job.done:
        item.job.status, item.job.started = IN_PROGRESS, time.monotonic()
    if item.on_start is not None:
        item.on_start(size)


def _request(item: BatchItem) -> tuple:
    """The request as `Service.handle_batch` takes it: payload, key, cancel flag, JobInfo."""
    if item.job is None:
        return (item.payload, item.api_key, None, None)
    return (item.payload, item.api_key, item.job.cancel, item.job.info)


def _settle(future: asyncio.Future, result: object) -> None:
    """Give `future` its result or error, unless its request was cancelled meanwhile."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    elif isinstance(result, BaseException):  # the batch itself was cancelled
        future.cancel()
    else:
        future.set_result(result)
