"""The fail-stop watchdog, the thread-safe lease clock and the heartbeat thread, without servers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import grpc
import pytest

from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import wait_for
from worker.handlers import LeaseLost, TaskContext
from worker.heartbeats import Beat, HeartbeatThread
from worker.lease import ClaimBudget, LeaseClock
from worker.watchdog import EXIT_FAIL_STOP, Watchdog, Watched, fail_stop_slack


class ExitRecorder:
    """Stands in for os._exit: records the code and when it was called."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()
        self.at = 0.0

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.at = time.monotonic()
        self.called.set()


def make_watchdog(**kwargs: Any) -> tuple[Watchdog, ExitRecorder, list[str]]:
    recorder, lines = ExitRecorder(), []
    return Watchdog(exit=recorder, write=lines.append, **kwargs), recorder, lines


def watched(clock: LeaseClock, mode: str = "thread") -> Watched:
    return Watched("task-1", 42, "t.work", mode, clock)


def test_fires_for_an_expired_deadline_while_the_handler_runs() -> None:
    dog, exited, lines = make_watchdog()
    clock = LeaseClock(3.0, deadline=1000.0)
    dog.watch(watched(clock))
    dog.check(now=999.0)
    dog.check(now=1000.01)  # past the deadline, within the slack: the handler may still stop by itself
    assert not exited.codes
    dog.check(now=1000.0 + fail_stop_slack(clock) + 0.01)
    assert exited.codes == [EXIT_FAIL_STOP] == [75]
    record = json.loads(lines[0])
    assert len(lines) == 1 and record["task_id"] == "task-1" and record["lease_token"] == 42 and "lease" in record["msg"]
    dog.check(now=1010.0)
    assert exited.codes == [75], "acts once per execution"


def test_slack_is_a_small_part_of_the_margin() -> None:
    # The trigger re-queues no earlier than sent + lease + grace; the clock's
    # deadline is sent + lease - margin; the watchdog acts at deadline + margin/4.
    for lease in (1.0, 3.0, 30.0):
        clock = LeaseClock.from_claim(lease, sent_at=0.0)
        acts_at = clock.deadline + fail_stop_slack(clock)
        assert lease - acts_at >= 0.75 * clock.margin - 1e-9


def test_no_fire_when_the_handler_stopped() -> None:
    dog, exited, _ = make_watchdog()
    entry = watched(LeaseClock(3.0, deadline=1000.0))
    dog.watch(entry)
    dog.check(now=1000.0)
    entry.stopped.set()  # the thread returned
    dog.check(now=2000.0)
    assert not exited.codes


def test_no_fire_when_the_lease_was_renewed() -> None:
    dog, exited, _ = make_watchdog()
    now = time.monotonic()
    clock = LeaseClock(3.0, deadline=now - 0.01)
    dog.watch(watched(clock))
    dog.check(now=now)  # seen expired
    clock.renewed(now)  # then an acknowledged heartbeat: valid until now + 2.25 s
    for step in range(20):
        dog.check(now=now + 0.1 * step)
    assert not exited.codes


def test_after_a_freeze_the_handler_gets_stop_grace_before_the_fail_stop() -> None:
    dog, exited, _ = make_watchdog()
    clock = LeaseClock(3.0, deadline=1000.0)
    dog.watch(watched(clock))
    dog.check(now=1005.0)  # first look long after the deadline: the process was frozen
    dog.check(now=1005.0 + clock.stop_grace / 2)
    assert not exited.codes
    dog.check(now=1005.0 + clock.stop_grace + 0.01)
    assert exited.codes == [75]


def test_a_process_handler_child_is_killed_not_the_worker() -> None:
    dog, exited, _ = make_watchdog()
    entry = watched(LeaseClock(3.0, deadline=1000.0), mode="process")
    killed = []
    entry.kill_child = lambda: killed.append(True)
    dog.watch(entry)
    dog.check(now=1000.0)
    dog.check(now=1001.0)
    assert killed == [True] and not exited.codes


def test_fires_while_the_event_loop_is_blocked() -> None:
    """An async handler calls time.sleep: the loop is frozen, the watchdog thread is not."""
    dog, exited, _ = make_watchdog(tick_s=0.02, loop_late_s=0.3)
    loop = asyncio.new_event_loop()
    unblocked = threading.Event()
    blocking = threading.Event()

    def block() -> None:
        blocking.set()
        time.sleep(3.0)  # what a careless async handler does
        unblocked.set()

    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        dog.attach_loop(loop)
        dog.start()
        clock = LeaseClock(1.0, deadline=time.monotonic() + 0.3)
        dog.watch(watched(clock, mode="async"))
        loop.call_soon_threadsafe(block)
        assert blocking.wait(2)
        assert exited.called.wait(1.5), "the watchdog did not fire while the loop was blocked"
        assert not unblocked.is_set(), "fired only after the loop was free again"
        assert exited.at <= clock.deadline + fail_stop_slack(clock) + 0.2
        assert dog.stalls == 1, "the stall was not noticed"
        assert unblocked.wait(5)
    finally:
        dog.stop()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


def test_lease_clock_is_thread_safe_and_a_revoke_sticks() -> None:
    clock = LeaseClock.from_claim(3.0, sent_at=time.monotonic())
    seen: list[float] = []
    errors: list[str] = []

    def renew() -> None:
        for _ in range(2000):
            clock.renewed(time.monotonic())

    def read() -> None:
        last = 0.0
        for _ in range(2000):
            deadline = clock.deadline
            if deadline < last:
                errors.append(f"deadline went back from {last} to {deadline}")
            last = deadline
        seen.append(last)

    threads = [threading.Thread(target=renew) for _ in range(4)] + [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and seen
    assert clock.valid()
    clock.revoke()
    assert not clock.valid() and clock.revoked
    clock.renewed(time.monotonic())  # a late answer to a heartbeat sent before the revoke
    assert not clock.valid()


def test_claim_budget_fits_the_lease() -> None:
    budget = ClaimBudget(default_lease_s=30.0, claim_timeout_s=5.0)
    assert budget.timeout("x") == 5.0
    budget.seen("x", 3.0)
    assert budget.timeout("x") == pytest.approx(2.25)
    budget.seen("y", 1.0)
    assert budget.timeout("y") == pytest.approx(0.5)


def test_ensure_lease_raises_once_the_lease_cannot_be_proven() -> None:
    deadline = [time.monotonic() + 10]
    ctx = TaskContext("t", "x", "ns", b"", 1, 7, "w", _lease_deadline=lambda: deadline[0])
    ctx.ensure_lease()
    deadline[0] = time.monotonic() - 0.001
    with pytest.raises(LeaseLost, match="lease 7"):
        ctx.ensure_lease()


class FakeSyncUpdater:
    """Answers heartbeats from the heartbeat thread's callers; records when."""

    def __init__(self, cancel_after: int | None = None, lost_after: int | None = None) -> None:
        self.calls: list[tuple[float, Any]] = []
        self._cancel_after = cancel_after
        self._lost_after = lost_after
        self._lock = threading.Lock()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        assert method == "Heartbeat"
        with self._lock:
            self.calls.append((time.monotonic(), request))
            n = len(self.calls)
        if self._lost_after is not None and n > self._lost_after:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "lease token does not match")
        return pb.HeartbeatResponse(cancel_requested=self._cancel_after is not None and n > self._cancel_after)


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def make_beat(lease_s: float) -> tuple[Beat, LeaseClock, TaskContext]:
    clock = LeaseClock.from_claim(lease_s, time.monotonic())
    ctx = TaskContext("task-1", "t.work", "ns", b"", 1, 42, "w", _lease_deadline=lambda: clock.deadline)
    return Beat("task-1", 42, "w", clock, ctx), clock, ctx


def test_heartbeat_thread_renews_while_the_event_loop_is_blocked() -> None:
    updater = FakeSyncUpdater()
    beats = HeartbeatThread(updater, tick_s=0.01)
    # A heartbeat every 0.8 s; the clock alone would lapse after 0.4 s. (With a
    # 0.6 s lease the margins were 0.1 s, and a machine busy with Cassandra
    # nodes delayed the heartbeat thread past them.)
    beat, clock, ctx = make_beat(2.4)
    ctx.report_progress(30, "a third")
    beats.start()
    beats.add(beat)

    async def careless_handler() -> None:
        time.sleep(4.0)  # blocks the loop for more than the lease

    started = time.monotonic()
    try:
        asyncio.run(careless_handler())
        assert clock.valid(), "the lease lapsed while the loop was blocked"
        during = [t for t, _ in updater.calls if started < t < started + 4.0]
        assert len(during) >= 4, len(during)
        assert updater.calls[-1][1].progress.message == "a third" and updater.calls[-1][1].lease_token == 42
    finally:
        beats.stop()


def test_heartbeat_thread_passes_cancel_and_lease_lost_on() -> None:
    updater = FakeSyncUpdater(cancel_after=1, lost_after=3)
    beats = HeartbeatThread(updater, tick_s=0.01)
    beat, clock, ctx = make_beat(0.6)
    beat.stopping = "cancel requested"
    beats.start()
    beats.add(beat)
    try:
        assert beat.cancel_requested.wait(2) and ctx.cancelled and ctx.cancel_reason == "cancel requested"
        assert beat.lost.wait(2)
        assert not clock.valid() and clock.revoked
        assert updater.calls[0][1].progress.message == "stopping: cancel requested"
        sent = len(updater.calls)
        time.sleep(0.5)
        assert len(updater.calls) == sent, "a lost lease is not renewed any more"
    finally:
        beats.stop()


def test_a_lease_registered_late_is_renewed_at_once() -> None:
    """A claim answered while the loop was blocked registers its execution late: its
    first renewal counts from the claim's send time, so it is sent at once, before the
    deadline, not a whole interval after registration."""
    updater = FakeSyncUpdater()
    beats = HeartbeatThread(updater, tick_s=0.01)
    lease_s = 6.0  # a heartbeat every 2 s
    sent = time.monotonic() - 3.0  # the claim went out 3 s ago; its deadline is 1.5 s away
    clock = LeaseClock.from_claim(lease_s, sent)
    ctx = TaskContext("task-1", "t.work", "ns", b"", 1, 42, "w", _lease_deadline=lambda: clock.deadline)
    registered = time.monotonic()
    beats.start()
    beats.add(Beat("task-1", 42, "w", clock, ctx))
    try:
        wait_for(lambda: updater.calls, 2.0, "a first heartbeat")
        first = updater.calls[0][0] - registered
        assert first < 1.0, f"the first renewal came {first:.2f} s after registration"  # not 2 s
        assert clock.deadline > registered + 4.0  # renewed from that heartbeat's send time
    finally:
        beats.stop()


def test_progress_is_sent_soon_and_coalesced() -> None:
    """With a 30 s lease the regular heartbeat is 10 s away; a progress change goes out
    at once, and a burst of changes costs one more heartbeat a second later, carrying
    the latest values."""
    updater = FakeSyncUpdater()
    beats = HeartbeatThread(updater, tick_s=0.01)
    beat, clock, ctx = make_beat(30.0)
    beats.start()
    beats.add(beat)
    try:
        started = time.monotonic()
        ctx.report_progress(10, "step 1")
        wait_for(lambda: updater.calls, 2.0, "the first progress heartbeat")
        assert updater.calls[0][0] - started < 1.0 and updater.calls[0][1].progress.message == "step 1"  # not 10 s
        for n in range(2, 50):  # a tight loop of progress reports
            ctx.report_progress(n, f"step {n}")
        wait_for(lambda: len(updater.calls) >= 2, 3.0, "the coalesced progress heartbeat")
        second_at, second = updater.calls[1]
        assert second_at - updater.calls[0][0] >= 0.9, "progress heartbeats are not coalesced"
        assert second.progress.message == "step 49" and second.progress.percent == 49
        time.sleep(1.5)  # nothing changed since: no more heartbeats until the regular one
        assert len(updater.calls) == 2, [c[1].progress.message for c in updater.calls]
    finally:
        beats.stop()
