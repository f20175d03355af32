"""An execution never gives its task back while the handler still runs, and
gives a claim back at once when its answer came too late. No servers: fake
TaskUpdater clients record every call with its time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any, Iterator

import pytest

from leasesched.v1 import scheduler_pb2 as pb
from tests.unit.test_watchdog import ExitRecorder, FakeSyncUpdater
from worker import execution as execution_module
from worker.execution import Execution
from worker.handlers import Handler, TaskContext
from worker.heartbeats import HeartbeatThread
from worker.watchdog import Watchdog


class FakeUpdater:
    """The async client: answers the claim with ``lease_s``/``start_to_close_s``, records reports."""

    def __init__(self, lease_s: float, start_to_close_s: float = 0.0, claim_delay_s: float = 0.0) -> None:
        self.lease_s = lease_s
        self.start_to_close_s = start_to_close_s
        self.claim_delay_s = claim_delay_s
        self.calls: list[tuple[float, str, Any]] = []

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.calls.append((time.monotonic(), method, request))
        if method == "ClaimTask":
            await asyncio.sleep(self.claim_delay_s)
            reply = pb.ClaimTaskResponse(task_id=request.task_id, lease_token=9, attempt=1, type="t.work", namespace="ns")
            reply.lease_duration.FromMilliseconds(int(self.lease_s * 1000))
            reply.start_to_close.FromMilliseconds(int(self.start_to_close_s * 1000))
            return reply
        if method == "FailTask":
            return pb.FailTaskResponse(status=pb.SCHEDULED)
        return pb.CompleteTaskResponse(status=pb.SUCCEEDED)

    def reports(self) -> list[tuple[float, str, Any]]:
        return [c for c in self.calls if c[1] in ("FailTask", "CompleteTask")]


class Harness:
    def __init__(self) -> None:
        self.threads = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.sync = FakeSyncUpdater()
        self.beats = HeartbeatThread(self.sync, tick_s=0.01)
        self.exited = ExitRecorder()
        self.watchdog = Watchdog(exit=self.exited, write=lambda line: None, tick_s=0.02)
        self.beats.start()
        self.watchdog.start()

    def execution(self, fn: Any, updater: FakeUpdater, mode: str = "thread") -> Execution:
        dispatch = pb.Dispatch(task_id="task-1", type="t.work", attempt=1)
        return Execution(dispatch, Handler("t.work", fn, mode), updater, "w", self.threads, self.beats, self.watchdog)  # type: ignore[arg-type]

    def close(self) -> None:
        self.beats.stop()
        self.watchdog.stop()
        self.threads.shutdown(wait=True)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


class Stubborn:
    """A thread handler that ignores ctx and returns at a known time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.finished_at = 0.0

    def __call__(self, ctx: TaskContext) -> str:
        time.sleep(self.seconds)
        self.finished_at = time.monotonic()
        return "late"


async def test_timeout_report_waits_for_the_thread_and_the_lease_is_kept_meanwhile(harness: Harness) -> None:
    handler = Stubborn(1.5)
    updater = FakeUpdater(lease_s=0.9, start_to_close_s=0.3)  # heartbeat every 0.3 s; the claim alone lapses at 0.675 s
    execution = harness.execution(handler, updater)
    started = time.monotonic()
    await execution.run()
    (at, method, request), = updater.reports()
    assert method == "FailTask" and request.error_type == "StartToCloseTimeout"
    assert at >= handler.finished_at > started + 1.4, "the task was given back while its handler still ran"
    assert execution.outcome == "timeout" and execution.handler_stopped.is_set()
    beats_while_stopping = [req for t, req in harness.sync.calls if started + 0.3 < t < handler.finished_at]
    assert len(beats_while_stopping) >= 3, "the lease was not renewed while waiting for the handler"
    assert any(req.progress.message == "stopping: start_to_close exceeded" for req in beats_while_stopping)
    assert not harness.exited.codes


async def test_release_report_waits_for_the_thread(harness: Harness) -> None:
    handler = Stubborn(1.2)
    updater = FakeUpdater(lease_s=0.9)
    execution = harness.execution(handler, updater)
    run = asyncio.create_task(execution.run())
    await asyncio.sleep(0.2)
    execution.release()
    await run
    (at, method, request), = updater.reports()
    assert method == "FailTask" and request.released
    assert at >= handler.finished_at > 0


async def test_cancel_report_waits_for_the_thread(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execution_module, "CANCEL_GRACE_S", 0.1)
    harness.sync._cancel_after = 0  # every heartbeat answers "cancel requested"
    handler = Stubborn(1.5)
    updater = FakeUpdater(lease_s=0.9)
    execution = harness.execution(handler, updater)
    await execution.run()
    (at, method, request), = updater.reports()
    assert method == "FailTask" and request.cancelled
    assert at >= handler.finished_at > 0


async def test_fenced_thread_gets_no_report_and_the_watchdog_fires(harness: Harness) -> None:
    harness.sync._lost_after = 0  # the server says the lease is gone at the first heartbeat
    handler = Stubborn(1.0)
    updater = FakeUpdater(lease_s=0.9)
    execution = harness.execution(handler, updater)
    await execution.run()
    assert execution.outcome == "fenced" and not updater.reports()
    assert harness.exited.codes == [75] and harness.exited.at < handler.finished_at


async def test_a_blocked_loop_keeps_its_lease_and_completes(harness: Harness) -> None:
    async def careless(ctx: TaskContext) -> str:
        time.sleep(1.5)  # blocks the loop for 5 heartbeat intervals, longer than the lease
        return "done"

    updater = FakeUpdater(lease_s=0.9)
    execution = harness.execution(careless, updater, mode="async")
    await execution.run()
    (_, method, _), = updater.reports()
    assert method == "CompleteTask" and execution.outcome == "ok" and not harness.exited.codes


async def test_a_claim_answered_too_late_is_given_back_at_once(harness: Harness) -> None:
    ran = threading.Event()
    updater = FakeUpdater(lease_s=1.0, claim_delay_s=0.6)  # the clock's deadline is sent + 0.5 s
    execution = harness.execution(lambda ctx: ran.set(), updater)
    await execution.run()
    (at, method, request), = updater.reports()
    assert method == "FailTask" and request.released and request.lease_token == 9
    assert execution.outcome == "late_claim" and not ran.is_set()
    assert execution.handler_done.done(), "the slot is free again"


async def test_a_completion_carries_the_last_progress_for_the_history(harness: Harness) -> None:
    """Issue 17: the TaskUpdater that granted the claim writes the attempt's
    history entry from it without reading the task; a handler that reported
    nothing still sends the (empty) progress, so it is never read either."""
    async def progressing(ctx: TaskContext) -> str:
        ctx.report_progress(60, "uploaded 3 of 5")
        return "done"

    for handler, expected in ((progressing, "uploaded 3 of 5"), (lambda ctx: "done", "")):
        updater = FakeUpdater(lease_s=5.0)
        execution = harness.execution(handler, updater, mode="async" if handler is progressing else "thread")
        await execution.run()
        (_, method, request), = updater.reports()
        assert method == "CompleteTask" and request.HasField("progress") and request.progress.message == expected
