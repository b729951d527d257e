"""Stopping a job part way: one `CancelToken` per job, passed explicitly down the stack.

Whoever runs a job (a transport) keeps the token and calls `cancel()`; the code doing the work
calls `check()` at its stopping points (between views while decoding, between the network's
blocks, before encoding and saving), which raises `Cancelled` once the job is cancelled. The
network itself (`model/`) only sees `token.check`, a plain callable. `commit()` marks the point
of no return (files are about to be written): past it `cancel()` says no and the job finishes,
so a job either stops before writing anything or completes (docs/ARCHITECTURE.md §7).
Work shared by a batch of jobs checks a `CancelGroup` of their tokens.
"""

from __future__ import annotations

import threading


class Cancelled(Exception):
    """The job was cancelled; whatever it held is dropped as this exception unwinds."""


class CancelToken:
    """A thread-safe cancel flag for one job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._committed = False
        self.reason = "the job was cancelled"

    def cancel(self, reason: str | None = None) -> bool:
        """Ask the job to stop; False when it is past `commit()` (too late: it will finish)."""
        with self._lock:
            if self._committed:
                return False
            if not self._cancelled and reason:
                self.reason = reason
            self._cancelled = True
            return True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        """Raise `Cancelled` if the job was cancelled; else return at once."""
        if self._cancelled:
            raise Cancelled(self.reason)

    def commit(self) -> None:
        """The last `check()`: past it the job can no longer be cancelled."""
        with self._lock:
            self.check()
            self._committed = True


class CancelGroup:
    """The cancel flag of work that several jobs share (one batch's forward): it stops once
    every one of the jobs is cancelled. A job cancelled alone stops at its own next check."""

    def __init__(self, tokens: list[CancelToken | CancelGroup]) -> None:
        self.tokens = tokens

    @property
    def cancelled(self) -> bool:
        return all(token.cancelled for token in self.tokens)

    @property
    def reason(self) -> str:
        """The jobs' reason when they share one (a group of one job is that job), else a
        generic one."""
        reasons = {token.reason for token in self.tokens}
        return reasons.pop() if len(reasons) == 1 else "every job of the batch was cancelled"

    def check(self) -> None:
        """Raise `Cancelled` once every job of the group is cancelled."""
        if self.tokens and self.cancelled:
            raise Cancelled(self.reason)
