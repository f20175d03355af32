"""One execution: claim a dispatched task, run its handler under the lease, report.

The lease is proven, never assumed. A heartbeat every lease/3 renews it and
carries progress (``worker.heartbeats``: an OS thread, so a blocked event loop
does not stop it); the worker's own ``LeaseClock`` says until when it may
still believe it holds the lease. When that moment comes (heartbeats failing,
the process was paused, the server said "lease lost"), the execution is
stopped: cooperatively first (``ctx.cancelled`` turns true), then by force
(the asyncio task is cancelled, a child process is killed), and no result is
reported for that lease, ever. A handler that cannot be stopped (a thread
ignoring ``ctx``, an async handler blocking the loop) is ended by the
watchdog (``worker.watchdog``), which ends the whole worker process before
the trigger may re-queue the task. Somebody else may run the task after the
lease expired; nobody runs it while we still believe we hold it.

A task is never given back (FailTask: released, cancelled, timeout) while its
handler still runs: the report waits until the thread returned, the coroutine
finished or the child was reaped, and the lease is renewed meanwhile (the slot
stays busy; PollTask shows "stopping: <reason>"). A claim whose answer came
too late to prove its lease is given back at once (released, no attempt
charged) instead of being left to expire.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from leasesched.concurrency import LIMIT_REACHED
from leasesched.observability import metrics
from leasesched.observability.logs import bind
from leasesched.transport import SERVER_GONE_CODES
from leasesched.v1 import scheduler_pb2 as pb
from worker.handlers import Handler, LeaseLost, Mode, PermanentError, RateLimited, RetryAfter, TaskContext, TaskTimings
from worker.heartbeats import Beat, HeartbeatThread
from worker.lease import ClaimBudget, LeaseClock
from worker.process_mode import run_in_process
from worker.updater_client import UpdaterClient
from worker.watchdog import Watchdog, Watched

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 2.0  # after a cancel request, how long a handler may take to notice
SUPERVISE_POLL_S = 0.1  # the supervisor re-reads the flags the heartbeat thread sets this often
# A report answered with one of these may be sent again (same token) while the
# lease holds: the server was unreachable, slow, or shed the call unread.
RETRY_REPORT_CODES = SERVER_GONE_CODES | frozenset(
    {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


class Acks(Protocol):
    """Where to say what became of the dispatch: the stream it came on
    (``worker.subscriptions.TriggerLink``), so its trigger can skip a read."""

    def ack_claimed(self, dispatch: pb.Dispatch) -> None: ...

    def ack_finished(self, task_id: str, attempt: int, lease_token: int) -> None: ...

    def return_limited(self, task_id: str) -> None: ...


class Kind(enum.StrEnum):
    """How an execution ended, which decides its report (the values are metric labels)."""

    OK = "ok"  # CompleteTask
    ERROR = "error"  # FailTask: retried per the task's policy
    PERMANENT = "permanent"  # FailTask non_retryable (a PermanentError)
    CANCELLED = "cancelled"  # FailTask cancelled: the handler stopped after a cancel request
    TIMEOUT = "timeout"  # FailTask: start_to_close exceeded
    FENCED = "fenced"  # the lease could not be proven: no report at all
    RELEASED = "released"  # FailTask released: given back unrun (shutdown)
    # Ends without a handler run, for the metric only:
    NOT_CLAIMED = "not_claimed"
    LATE_CLAIM = "late_claim"


@dataclass
class Outcome:
    kind: Kind
    result: bytes = b""
    error: str = ""
    error_type: str = ""
    retry_after_ms: int = 0  # ERROR only: the next attempt not before this (a RetryAfter)
    rate_limited: bool = False  # ERROR only: a RateLimited (the gate closes, no attempt used)


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


def _seconds(stamp: Timestamp, present: bool) -> float | None:
    return stamp.seconds + stamp.nanos / 1e9 if present else None


def dispatch_timings(dispatch: pb.Dispatch, received_at: float, claim_sent_at: float, claimed_at: float) -> TaskTimings:
    """The handler's ``ctx.timings``: the trigger's two times from the dispatch
    (None when its trigger did not set them), the worker's own three."""
    return TaskTimings(
        due_seen_at=_seconds(dispatch.due_seen_at, dispatch.HasField("due_seen_at")),
        dispatched_at=_seconds(dispatch.dispatched_at, dispatch.HasField("dispatched_at")),
        received_at=received_at,
        claim_sent_at=claim_sent_at,
        claimed_at=claimed_at,
    )


class Execution:
    def __init__(
        self,
        dispatch: pb.Dispatch,
        handler: Handler,
        updater: UpdaterClient,
        worker_id: str,
        threads: concurrent.futures.ThreadPoolExecutor,
        heartbeats: HeartbeatThread,
        watchdog: Watchdog,
        ledger: Callable[[dict[str, Any]], None] | None = None,
        acks: Acks | None = None,
        claim_budget: ClaimBudget | None = None,
        received_at: float | None = None,
    ) -> None:
        self._dispatch = dispatch
        # Diagnostics for the handler's ctx.timings (benchmarks): wall times, not decisions.
        self._received_at = time.time() if received_at is None else received_at
        self._acks = acks
        self.task_id = dispatch.task_id
        self.attempt = dispatch.attempt
        self.type = dispatch.type
        self.outcome: Kind | None = None  # once decided
        self._handler = handler
        self._updater = updater
        self._worker_id = worker_id
        self._threads = threads
        self._heartbeats = heartbeats
        self._watchdog = watchdog
        self._ledger = ledger
        self._claim_budget = claim_budget
        self.token = 0
        self.ctx: TaskContext | None = None
        self._clock: LeaseClock | None = None
        self._cancel_requested = False
        self._release = asyncio.Event()
        # Set when the handler really stopped (thread returned, coroutine
        # finished, child reaped), from whichever thread saw it.
        self.handler_stopped = threading.Event()
        self._loop = asyncio.get_running_loop()
        # The same, for the event loop: the slot stays busy until then.
        self.handler_done: asyncio.Future[None] = self._loop.create_future()

    def release(self) -> None:
        """Shutdown: stop the handler and give the task back for an immediate re-run."""
        self._release.set()

    @property
    def handler_running(self) -> bool:
        return self.token != 0 and not self.handler_stopped.is_set()

    async def run(self) -> None:
        bind(task_id=self.task_id)  # this execution's lines (its own asyncio task) carry the task id
        try:
            await self._run()
        finally:
            metrics.worker_executions.labels(metrics.type_label(self.type), self.outcome or "crashed").inc()
            if self.ctx is None:  # no handler was started
                self.handler_stopped.set()
                if not self.handler_done.done():
                    self.handler_done.set_result(None)

    async def _run(self) -> None:
        timeout = self._claim_budget.timeout(self.type) if self._claim_budget is not None else None
        sent = time.monotonic()
        claim_sent_at = time.time()
        try:
            claim = await self._updater.call(
                "ClaimTask",
                pb.ClaimTaskRequest(
                    task_id=self.task_id, worker_id=self._worker_id, attempt=self.attempt,
                    # The task as created, when the dispatch has it: a claim without a read.
                    created=self._dispatch.created if self._dispatch.HasField("created") else None,
                ),  # fmt: skip
                timeout=timeout,
            )
        except grpc.RpcError as err:
            log.info("task %s: not claimed (%s: %s)", self.task_id, err.code().name, err.details())
            self.outcome = Kind.NOT_CLAIMED
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (err.details() or "").startswith(LIMIT_REACHED):
                if self._acks is not None:
                    self._acks.return_limited(self.task_id)  # its trigger holds it back until a slot may be free
            return
        claimed_at = time.time()
        lease_s = claim.lease_duration.ToMilliseconds() / 1000
        if self._claim_budget is not None:
            self._claim_budget.seen(self.type, lease_s)
        clock = self._clock = LeaseClock.from_claim(lease_s, sent)
        self.token = claim.lease_token
        bind(lease_token=claim.lease_token)
        if clock.remaining() < clock.lease_s / 3 and clock.valid():
            # Answered late (a blocked event loop, a slow TaskUpdater): too little
            # of the lease is left to start a handler that must see it held.
            # Prove it once more first; a handler would otherwise stop at its
            # first look and the task wait for the lease to expire.
            await self._renew_before_start(clock)
        if not clock.valid():
            self.outcome = Kind.LATE_CLAIM
            await self._give_back_claim(time.monotonic() - sent)
            return
        if self._acks is not None:
            self._acks.ack_claimed(self._dispatch)
        ctx = self.ctx = TaskContext(
            task_id=self.task_id,
            type=claim.type,
            namespace=claim.namespace,
            payload=claim.payload,
            attempt=claim.attempt,
            lease_token=claim.lease_token,
            worker_id=self._worker_id,
            start_to_close_s=claim.start_to_close.ToMilliseconds() / 1000,
            timings=dispatch_timings(self._dispatch, self._received_at, claim_sent_at, claimed_at),
            _lease_deadline=lambda: clock.deadline,
        )
        log.info("task %s: running attempt %d under lease token %d", self.task_id, claim.attempt, claim.lease_token)
        start_to_close = ctx.start_to_close_s
        started = time.monotonic()
        watched = Watched(self.task_id, self.token, self.type, self._handler.mode, clock)
        watched.stopped = self.handler_stopped
        beat = Beat(self.task_id, self.token, self._worker_id, clock, ctx)
        self._watchdog.watch(watched)
        self._heartbeats.add(beat)
        try:
            body = asyncio.ensure_future(self._invoke(ctx, watched))
            try:
                outcome = await self._supervise(body, ctx, clock, beat, started, start_to_close)
                self.outcome = outcome.kind
                metrics.worker_execution_seconds.observe(time.monotonic() - started)
                # The lease is renewed until the report is done: another handler
                # may block the event loop for 1-2.5 s between this handler's end
                # and its report, longer than a short lease's margin (a chaos run
                # with renewal stopping at the handler's end re-ran 4 of 300 tasks).
                await self._report(outcome, clock)
            finally:
                self._heartbeats.remove(beat)
        finally:
            # A handler that outlived its execution (fenced, or the execution
            # crashed) stays watched until it stops: the watchdog ends it.
            if self.handler_stopped.is_set():
                self._watchdog.unwatch(watched)
            else:
                self.handler_done.add_done_callback(lambda _: self._watchdog.unwatch(watched))

    async def _renew_before_start(self, clock: LeaseClock) -> None:
        """One heartbeat, answered before the handler starts: renews ``clock`` from its
        send time, or leaves it to lapse (then the claim is given back)."""
        sent = time.monotonic()
        request = pb.HeartbeatRequest(task_id=self.task_id, lease_token=self.token, worker_id=self._worker_id)
        try:
            await self._updater.call("Heartbeat", request, timeout=max(0.05, clock.remaining()))
        except grpc.RpcError as err:
            log.info("task %s: lease %d not renewed before the start (%s)", self.task_id, self.token, err.code().name)
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                clock.revoke()  # the lease is gone already
            return
        clock.renewed(sent)

    async def _give_back_claim(self, took: float) -> None:
        """The claim's answer came when its lease could no longer be proven:
        give it back now (released: no attempt charged) instead of leaving the
        task to wait for the lease to expire. A stale token is just refused."""
        log.warning("task %s: claim answered after %.2f s, too late to prove lease %d; giving it back", self.task_id, took, self.token)
        request = pb.FailTaskRequest(
            task_id=self.task_id,
            lease_token=self.token,
            error=f"claim answered after {took:.2f} s, too late to prove the lease",
            error_type="LateClaim",
            released=True,
        )
        try:
            reply = await self._updater.call("FailTask", request, timeout=5.0)
        except grpc.RpcError as err:
            log.info("task %s: give-back of lease %d refused: %s %s", self.task_id, self.token, err.code().name, err.details())
            return
        log.info("task %s: late claim given back, now %s", self.task_id, pb.TaskStatus.Name(reply.status))

    async def _supervise(
        self,
        body: asyncio.Future[Outcome],
        ctx: TaskContext,
        clock: LeaseClock,
        beat: Beat,
        started: float,
        start_to_close: float,
    ) -> Outcome:
        release_wait = asyncio.ensure_future(self._release.wait())
        cancel_deadline: float | None = None
        try:
            while not body.done():
                now = time.monotonic()
                if beat.cancel_requested.is_set():
                    self._cancel_requested = True
                if not clock.valid(now):
                    return await self._stop(body, ctx, clock, beat, Kind.FENCED, "lease can no longer be proven")
                if start_to_close and now - started >= start_to_close:
                    stopped = await self._stop(body, ctx, clock, beat, Kind.TIMEOUT, "start_to_close exceeded")
                    if stopped.kind != Kind.TIMEOUT:
                        return stopped
                    return Outcome(Kind.TIMEOUT, error=f"start_to_close of {start_to_close:.1f} s exceeded", error_type="StartToCloseTimeout")
                if release_wait.done():
                    return await self._stop(body, ctx, clock, beat, Kind.RELEASED, "worker shutting down")
                if self._cancel_requested:
                    cancel_deadline = cancel_deadline or now + CANCEL_GRACE_S
                    if now >= cancel_deadline:
                        return await self._stop(body, ctx, clock, beat, Kind.CANCELLED, "cancel requested")
                wait = min(clock.remaining(now), SUPERVISE_POLL_S)
                if start_to_close:
                    wait = min(wait, started + start_to_close - now)
                if cancel_deadline:
                    wait = min(wait, cancel_deadline - now)
                waiters: set[asyncio.Future[Any]] = {body, release_wait}
                await asyncio.wait(waiters, timeout=max(0.001, wait), return_when=asyncio.FIRST_COMPLETED)
            outcome = body.result()
            await self._wait_stopped()
            if outcome.kind == Kind.FENCED:
                clock.revoke()
                return outcome
            if self._cancel_requested or beat.cancel_requested.is_set():
                return Outcome(Kind.CANCELLED)  # the handler stopped after the request
            return outcome
        finally:
            release_wait.cancel()

    async def _stop(
        self, body: asyncio.Future[Outcome], ctx: TaskContext, clock: LeaseClock, beat: Beat, kind: Kind, reason: str
    ) -> Outcome:
        """Cooperative stop, then force, then wait until the handler really stopped.

        ``fenced``: the lease is given up for good (the clock is revoked, so the
        watchdog ends a handler that does not stop within its slack); the
        cooperative grace is short, an eighth of the margin, so that force
        comes before the watchdog. Any other kind keeps the lease (heartbeats
        go on) until the handler stopped, so that the report that gives the
        task back is never sent while it still runs; if the lease is lost
        meanwhile, the outcome becomes ``fenced`` (no report).
        """
        ctx._request_stop(reason)
        beat.stopping = reason
        if kind == Kind.FENCED:
            clock.revoke()
            grace = clock.margin / 8
        else:
            grace = clock.stop_grace
        log.warning("task %s: stopping execution (%s)", self.task_id, reason)
        done, _ = await asyncio.wait({body}, timeout=grace)
        if not done:
            body.cancel()  # async handler: CancelledError; process: killed and reaped; thread: cannot be stopped
            await asyncio.wait({body}, timeout=grace)
        if not self.handler_stopped.is_set():
            log.warning(
                "task %s: the %s handler has not stopped; %s until it does",
                self.task_id,
                self._handler.mode,
                "the watchdog ends it" if kind == Kind.FENCED else "keeping the lease and the slot",
            )
        await self._wait_stopped()
        if kind != Kind.FENCED and not clock.valid():
            log.warning("task %s: lease lost while the handler was stopping; no report", self.task_id)
            return Outcome(Kind.FENCED)
        return Outcome(kind)

    async def _wait_stopped(self) -> None:
        await asyncio.shield(self.handler_done)

    async def _invoke(self, ctx: TaskContext, watched: Watched) -> Outcome:
        fn = self._handler.fn
        try:
            if self._handler.mode == Mode.ASYNC:
                value = await fn(ctx)
            elif self._handler.mode == Mode.PROCESS:
                value = await run_in_process(self._handler, ctx, self._threads, watched)
            else:
                future = self._threads.submit(fn, ctx)
                # Runs in the handler's thread when it returns (or here if it never started).
                future.add_done_callback(lambda _: self._mark_handler_done())
                value = await asyncio.wrap_future(future)
            return Outcome(Kind.OK, result=_as_bytes(value))
        except PermanentError as exc:
            return Outcome(Kind.PERMANENT, error=str(exc) or type(exc).__name__, error_type=type(exc).__name__)
        except RetryAfter as exc:
            limited = isinstance(exc, RateLimited)
            log.info("task %s: handler %s %g s: %s", self.task_id, "rate limited for" if limited else "asked to retry after",
                     exc.seconds, exc)  # fmt: skip
            return Outcome(
                Kind.ERROR, error=str(exc), error_type=exc.error_type, retry_after_ms=exc.milliseconds, rate_limited=limited
            )
        except LeaseLost as exc:
            log.warning("task %s: handler gave up: %s", self.task_id, exc)
            return Outcome(Kind.FENCED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a handler error is a task failure, not ours
            log.info("task %s: handler raised %s", self.task_id, "".join(traceback.format_exception_only(exc)).strip())
            error_type = getattr(exc, "error_type", type(exc).__name__)
            return Outcome(Kind.ERROR, error=str(exc) or error_type, error_type=error_type)
        finally:
            if self._handler.mode != Mode.THREAD:
                self._mark_handler_done()

    def _mark_handler_done(self) -> None:
        """The handler stopped: tell the watchdog (now) and the loop (when it is free)."""
        self.handler_stopped.set()

        def done() -> None:
            if not self.handler_done.done():
                self.handler_done.set_result(None)

        try:
            self._loop.call_soon_threadsafe(done)
        except RuntimeError:  # the loop is closed: the process is ending
            pass

    async def _report(self, outcome: Outcome, clock: LeaseClock) -> None:
        if outcome.kind == Kind.FENCED:
            log.warning("task %s: abandoned lease %d without a report", self.task_id, self.token)
            return
        if outcome.kind == Kind.OK:
            request: Any = pb.CompleteTaskRequest(task_id=self.task_id, lease_token=self.token, result=outcome.result)
            if self.ctx is not None:  # the attempt's history entry takes it, without a read of the task
                request.progress.SetInParent()  # sent even as 0 and "": "no progress reported"
                request.progress.percent = self.ctx.progress_percent
                request.progress.message = self.ctx.progress_message
            method = "CompleteTask"
        else:
            request = pb.FailTaskRequest(
                task_id=self.task_id,
                lease_token=self.token,
                error=outcome.error or outcome.kind,
                error_type=outcome.error_type,
                non_retryable=outcome.kind == Kind.PERMANENT,
                cancelled=outcome.kind == Kind.CANCELLED,
                released=outcome.kind == Kind.RELEASED,
                rate_limited=outcome.rate_limited and outcome.retry_after_ms > 0,
            )
            if outcome.retry_after_ms:
                request.retry_after.FromMilliseconds(outcome.retry_after_ms)
            method = "FailTask"
        delay = 0.1
        sent = False
        while True:
            if not clock.valid():
                # Past our own deadline we no longer hold the lease: the result
                # is dropped and the task runs again after the lease expires.
                log.warning("task %s: lease deadline passed before the %s report; dropped", self.task_id, method)
                return
            if self._ledger is not None and method == "CompleteTask" and not sent:
                self._ledger(self._ledger_record("complete_sent"))  # audit: it really goes out now
            sent = True
            try:
                reply = await self._updater.call(method, request, timeout=max(0.1, min(5.0, clock.remaining())))
            except grpc.RpcError as err:
                if err.code() in RETRY_REPORT_CODES:
                    await asyncio.sleep(min(delay, max(0.0, clock.remaining())))
                    delay = min(delay * 2, 1.0)
                    continue
                log.warning("task %s: %s refused: %s %s", self.task_id, method, err.code().name, err.details())
                return
            status = pb.TaskStatus.Name(reply.status)
            log.info("task %s: %s accepted, now %s", self.task_id, method, status)
            if self._acks is not None:
                self._acks.ack_finished(self.task_id, self.attempt, self.token)
            if self._ledger is not None and method == "CompleteTask":
                self._ledger(self._ledger_record("complete"))
            return

    def _ledger_record(self, event: str) -> dict[str, Any]:
        return {
            "event": event,
            "task_id": self.task_id,
            "token": self.token,
            "worker": self._worker_id,
            "pid": os.getpid(),
            "t": time.time(),
        }

