"""The worker SDK: register handlers by task type, get a context while running.

    from worker.handlers import Handlers, PermanentError, TaskContext

    handlers = Handlers(namespace="default")

    @handlers.task("report.build")
    async def build(ctx: TaskContext) -> bytes:
        ctx.report_progress(50, "half way")
        if ctx.cancelled:          # cancel requested, or the lease can no longer be proven
            return b""
        return b"done"

Handlers may be ``async def`` (run on the worker's loop, stopped by task
cancellation), plain ``def`` (run in a thread: stop them by checking
``ctx.cancelled``), or ``mode="process"`` (run in a child process that can be
killed when it does not stop in time). Raise ``PermanentError`` for a failure
that retrying cannot fix; ``RetryAfter(seconds, message)`` for one that may be
retried, but not before the remote side said (an HTTP Retry-After);
``RateLimited(retry_after, message)`` when the remote side refused the call
for its rate: the task's gate closes until then (its other tasks wait too) and
the task runs again then without using an attempt; any other exception is
retried per the task's policy.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from leasesched.limits import RETRY_INTERVAL

HandlerFn = Callable[["TaskContext"], Any]


class PermanentError(Exception):
    """A failure that must not be retried (bad input, missing resource)."""


class RetryAfter(Exception):
    """A retryable failure whose next attempt must not start before ``seconds`` from now.

    For a remote side that said when to come back (HTTP 429 / 503 with
    Retry-After): the report carries the wait (``FailTaskRequest.retry_after``)
    and the task is due again after max(its backoff, the wait); a wait that
    ends past the task's schedule_to_close fails it instead. Still one
    attempt used, like any failure. ``seconds`` is cut to
    ``limits.RETRY_INTERVAL`` (a year) here rather than refused there: the
    report must land, or the task would wait for its lease to expire.

    ``error_type`` is what the task records (and what
    ``non_retryable_error_types`` matches), e.g. ``HTTP429``."""

    def __init__(self, seconds: float, message: str = "", error_type: str = "RetryAfter") -> None:
        if not math.isfinite(seconds):
            raise ValueError(f"RetryAfter needs a finite number of seconds, not {seconds}")
        self.seconds = min(max(0.0, float(seconds)), RETRY_INTERVAL.high / 1000)
        self.error_type = error_type
        super().__init__(message or f"retry after {self.seconds:g} s")

    @property
    def milliseconds(self) -> int:
        """The wait as the report sends it (rounded up: never earlier than asked)."""
        return math.ceil(self.seconds * 1000)


class RateLimited(RetryAfter):
    """The remote side refused the call for its rate (HTTP 429, or 503 with
    Retry-After): nothing is wrong with the task, the *gate* is too fast.

    The report (``FailTaskRequest.rate_limited`` with ``retry_after``) closes
    the task's gate until now + ``retry_after`` seconds, so that no task of the
    gate starts before then on any worker, and the task is due again then as
    the same attempt (no attempt used). A task without a gate is retried as
    for ``RetryAfter`` (an attempt used: nothing would bound the retries).
    A ``RetryAfter`` subclass, so code that catches ``RetryAfter`` still does.
    ``retry_after`` must be > 0."""

    def __init__(self, retry_after: float, message: str = "", error_type: str = "RateLimited") -> None:
        if not math.isfinite(retry_after) or retry_after <= 0:
            raise ValueError(f"RateLimited needs retry_after > 0 seconds, not {retry_after}")
        super().__init__(retry_after, message or f"rate limited for {retry_after:g} s", error_type)


class LeaseLost(Exception):
    """``ctx.ensure_lease()``: this worker can no longer prove it holds the task's lease.

    Raised out of a handler it ends the execution without a report (the
    lease is gone; the task runs again after it expired)."""


class Mode(enum.StrEnum):
    """Where a handler runs, which decides how it can be stopped (README, "What is promised")."""

    ASYNC = "async"  # on the worker's event loop: cancelled at its next await
    THREAD = "thread"  # in a thread: cannot be stopped by force (fail-stop is the backstop)
    PROCESS = "process"  # in a child process: killed by force


@dataclass(frozen=True)
class Handler:
    type: str
    fn: HandlerFn
    mode: Mode


class Handlers:
    """A set of handlers for one namespace; pass it to the worker runner."""

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self._by_type: dict[str, Handler] = {}

    def task(self, task_type: str, mode: Mode | str | None = None) -> Callable[[HandlerFn], HandlerFn]:
        def register(fn: HandlerFn) -> HandlerFn:
            if mode is None:
                chosen = Mode.ASYNC if inspect.iscoroutinefunction(fn) else Mode.THREAD
            elif mode in set(Mode):
                chosen = Mode(mode)
            else:
                raise ValueError(f"mode must be async, thread or process, not {mode!r}")
            if chosen == Mode.ASYNC and not inspect.iscoroutinefunction(fn):
                raise ValueError(f"handler for {task_type!r}: mode 'async' needs an async def")
            if task_type in self._by_type:
                raise ValueError(f"a handler for {task_type!r} is already registered")
            self._by_type[task_type] = Handler(task_type, fn, chosen)
            return fn

        return register

    def get(self, task_type: str) -> Handler | None:
        return self._by_type.get(task_type)

    @property
    def types(self) -> list[str]:
        return sorted(self._by_type)


@dataclass(frozen=True)
class TaskTimings:
    """When this execution's dispatch passed each step on its way here: diagnostics
    for benchmarks (the load report's per-stage breakdown), decided on by nothing.

    Wall-clock seconds since the epoch (comparable only on one machine or with
    synchronised clocks); None when unknown (a trigger that predates them).
    ``due_seen_at``: the trigger learned the task was due (hint or scan);
    ``dispatched_at``: the trigger put the dispatch on the stream;
    ``received_at``: this worker received it; ``claim_sent_at``: it sent
    ClaimTask; ``claimed_at``: the claim's answer came."""

    due_seen_at: float | None = None
    dispatched_at: float | None = None
    received_at: float | None = None
    claim_sent_at: float | None = None
    claimed_at: float | None = None


@dataclass
class TaskContext:
    """What a handler knows about the task it runs. Safe to use from threads."""

    task_id: str
    type: str
    namespace: str
    payload: bytes
    attempt: int
    lease_token: int  # fencing token: pass it to systems that can reject stale writers
    worker_id: str
    # The task's start_to_close in seconds (0: none): the worker stops the
    # handler then, so a handler bounds its own waits (an HTTP timeout) below it.
    start_to_close_s: float = 0.0
    # Read-only diagnostics: where the time to this start went (benchmarks).
    timings: TaskTimings = field(default_factory=TaskTimings)
    _lease_deadline: Callable[[], float] = field(repr=False, default=lambda: float("inf"))
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel_reason: str = ""
    progress_percent: float = 0.0
    progress_message: str = ""
    # Called after each progress change (the heartbeat thread sends it soon, coalesced).
    _on_progress: Callable[[], None] = field(repr=False, default=lambda: None)

    def report_progress(self, percent: float, message: str = "") -> None:
        """Recorded now and sent soon: with an early heartbeat, at most one per
        second per execution (``worker.heartbeats.PROGRESS_COALESCE_S``), or
        with the next regular one (every lease/3), whichever comes first."""
        self.progress_percent = max(0.0, min(100.0, float(percent)))
        self.progress_message = message[:1000]
        self._on_progress()

    @property
    def cancelled(self) -> bool:
        """True once the handler should stop: cancel requested, lease lost, or
        the lease can no longer be proven (checked against the clock now)."""
        return self._cancel.is_set() or not self.holds_lease()

    def holds_lease(self) -> bool:
        return time.monotonic() < self._lease_deadline()

    def ensure_lease(self) -> None:
        """Raise ``LeaseLost`` unless the lease can still be proven at this instant.

        The last-moment check before an in-process side effect. It narrows the
        window but cannot close it: a pause (GC, SIGSTOP, a blocked loop, a
        slow disk) can fall between this check and the action, and by then
        the task may run elsewhere. Side effects that must happen at most once
        therefore have to be fenced at the resource itself with
        ``ctx.lease_token`` (a larger token wins; see ``worker/fencing.py``).
        """
        if not self.holds_lease():
            raise LeaseLost(f"task {self.task_id}: lease {self.lease_token} can no longer be proven")

    def wait_cancelled(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s, waking early on cancel; True if cancelled."""
        end = time.monotonic() + timeout
        while True:
            if self.cancelled:
                return True
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            self._cancel.wait(min(remaining, 0.05))

    async def sleep(self, seconds: float) -> bool:
        """Async sleep that wakes early on cancel; True if cancelled."""
        end = time.monotonic() + seconds
        while not self.cancelled:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(remaining, 0.05))
        return True

    def _request_stop(self, reason: str) -> None:
        if not self._cancel.is_set():
            self.cancel_reason = reason
            self._cancel.set()
