"""The lifecycle policy over the in-memory store (pure logic; the same paths
run against the real Cassandra in tests/integration)."""

import logging
import uuid
from typing import Any

import pytest

from leasesched.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, RetryPolicy, Task, now_ms, shard_of
from leasesched.observability import metrics
from leasesched.states import TaskStatus
from leasesched.store.base import ListQuery, RawCondition
from leasesched.store.memory import MemoryStore


def new_task(**kw: object) -> Task:
    tid = uuid.uuid4()
    now = now_ms()
    base = dict(task_id=tid, namespace="ns", type="t", payload=b"p", shard=3, created_at=now, run_at=now, first_run_at=now)
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


async def test_schedule_writes_index_before_task(store: MemoryStore, life: Lifecycle) -> None:
    task = new_task()
    store.fail_next.add("insert_task")
    with pytest.raises(Unavailable):
        await life.schedule(task)
    # The crash point leaves an orphan index entry and no task: nothing accepted, nothing lost.
    assert task.task_id not in store.tasks
    assert [e.task_id for e in store.due] == [task.task_id]


async def test_index_failure_writes_nothing(store: MemoryStore, life: Lifecycle) -> None:
    store.fail_next.add("add_due")
    with pytest.raises(Unavailable):
        await life.schedule(new_task())
    assert not store.tasks and not store.due


async def test_key_bound_then_crash_is_finished_by_the_retry(store: MemoryStore, life: Lifecycle) -> None:
    first = new_task()
    store.fail_next.add("insert_task")
    with pytest.raises(Unavailable):
        await life.schedule(first, "key-1", b"h")
    retry = new_task()  # the retried request gets a fresh id from validation
    outcome = await life.schedule(retry, "key-1", b"h", shards=64)
    assert outcome.task.task_id == first.task_id  # the id the key reserved
    assert outcome.task.shard == shard_of(first.task_id, 64)  # placed by its own id, not the retry's
    assert list(store.tasks) == [first.task_id]
    assert {e.shard for e in store.due if e.task_id == first.task_id} >= {shard_of(first.task_id, 64)}


async def test_idempotency(store: MemoryStore, life: Lifecycle) -> None:
    a = await life.schedule(new_task(), "k", b"h1")
    b = await life.schedule(new_task(), "k", b"h1")
    assert a.created and not b.created and a.task.task_id == b.task.task_id
    assert len(store.tasks) == 1
    with pytest.raises(AlreadyExists, match="different request"):
        await life.schedule(new_task(), "k", b"h2")
    assert len(store.tasks) == 1


async def test_cancel_scheduled_then_finished(life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    assert (await life.cancel(task.task_id)).status == TaskStatus.CANCELLED
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        await life.cancel(task.task_id)
    with pytest.raises(FailedPrecondition):
        await life.claim(task.task_id, "w", 1)
    with pytest.raises(NotFound):
        await life.cancel(uuid.uuid4())


async def test_claim_heartbeat_complete(life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    assert lease.token == 1
    with pytest.raises(FailedPrecondition):
        await life.claim(task.task_id, "w2", 1)  # at most one holder
    ack = await life.heartbeat(task.task_id, lease.token, 40.0, "almost")
    assert not ack.cancel_requested and ack.expires_at >= lease.expires_at
    assert (await life.get(task.task_id)).progress_message == "almost"
    assert await life.complete(task.task_id, lease.token, b"done") == TaskStatus.SUCCEEDED
    assert await life.complete(task.task_id, lease.token, b"done") == TaskStatus.SUCCEEDED  # retried report
    with pytest.raises(FailedPrecondition, match="lease lost"):
        await life.heartbeat(task.task_id, lease.token, 0, "")


async def test_running_cancel_reaches_worker_through_heartbeat(life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    assert (await life.cancel(task.task_id)).cancel_requested
    ack = await life.heartbeat(task.task_id, lease.token, 10, "", now=lease.expires_at)
    assert ack.cancel_requested
    # The lease is still renewed: a handler that ignores the cancel keeps it until it stops.
    assert ack.expires_at > lease.expires_at
    assert (await life.get(task.task_id)).lease_expires_at == ack.expires_at
    outcome = await life.acknowledge_cancel(task.task_id, lease.token, "stopped")
    assert outcome.status == TaskStatus.CANCELLED


async def test_retry_backoff_then_fail(store: MemoryStore, life: Lifecycle) -> None:
    policy = RetryPolicy(initial_interval_ms=1000, backoff_coefficient=2.0, maximum_interval_ms=1500, maximum_attempts=3)
    task = (await life.schedule(new_task(retry=policy))).task
    delays = []
    for attempt in (1, 2):
        current = await life.get(task.task_id)
        lease = await life.claim(task.task_id, "w", attempt, now=current.run_at)
        before = now_ms()
        outcome = await life.fail(task.task_id, lease.token, "boom", "IOError")
        assert outcome.status == TaskStatus.SCHEDULED
        delays.append(outcome.next_run_at - before)
        assert any(e.kind == DueEntry.RUN and e.attempt == attempt + 1 for e in store.due)
    assert 790 <= delays[0] <= 1010 and 1190 <= delays[1] <= 1510  # 1 s, then 2 s capped at 1.5 s (jitter ≤ 20 %)
    current = await life.get(task.task_id)
    lease = await life.claim(task.task_id, "w", 3, now=current.run_at)
    assert (await life.fail(task.task_id, lease.token, "boom")).status == TaskStatus.FAILED
    assert (await life.get(task.task_id)).attempt == 3


async def test_non_retryable(life: Lifecycle) -> None:
    policy = RetryPolicy(maximum_attempts=5, non_retryable_error_types=("BadInput",))
    for kwargs in ({"error_type": "BadInput"}, {"non_retryable": True}):
        task = (await life.schedule(new_task(retry=policy))).task
        lease = await life.claim(task.task_id, "w", 1)
        assert (await life.fail(task.task_id, lease.token, "no", **kwargs)).status == TaskStatus.FAILED


async def test_expired_lease_is_requeued_and_fences_the_old_holder(life: Lifecycle) -> None:
    task = (await life.schedule(new_task(lease_ms=1000))).task
    lease = await life.claim(task.task_id, "w1", 1)
    running = await life.get(task.task_id)
    assert await life.expire_lease(running, now=lease.expires_at - 1) is None  # not yet
    assert await life.expire_lease(running, now=lease.expires_at + 1) == TaskStatus.SCHEDULED
    again = await life.claim(task.task_id, "w2", 2, now=lease.expires_at + 1)
    assert again.token == lease.token + 1
    with pytest.raises(FailedPrecondition, match="lease lost"):
        await life.complete(task.task_id, lease.token, b"late")  # the old holder is fenced
    assert await life.complete(task.task_id, again.token, b"ok") == TaskStatus.SUCCEEDED


async def test_expiry_on_last_attempt_fails(life: Lifecycle) -> None:
    task = (await life.schedule(new_task(retry=RetryPolicy(maximum_attempts=1), lease_ms=1000))).task
    lease = await life.claim(task.task_id, "w1", 1)
    running = await life.get(task.task_id)
    assert await life.expire_lease(running, now=lease.expires_at + 1) == TaskStatus.FAILED
    assert "lease expired" in (await life.get(task.task_id)).error


async def test_expiry_of_a_task_with_a_cancel_request_cancels_it(life: Lifecycle) -> None:
    """Re-queued, it could never be claimed again (claims refuse a cancel
    request): the chaos run found 34 such tasks stuck SCHEDULED for ever."""
    task = (await life.schedule(new_task(lease_ms=1000))).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.cancel(task.task_id)  # RUNNING: cancel requested, the worker never acknowledges
    running = await life.get(task.task_id)
    assert running.cancel_requested and running.status == TaskStatus.RUNNING
    assert await life.expire_lease(running, now=lease.expires_at + 1) == TaskStatus.CANCELLED
    final = await life.get(task.task_id)
    assert final.status == TaskStatus.CANCELLED and final.finished_at is not None


async def test_delayed_task_cannot_be_claimed_early(life: Lifecycle) -> None:
    task = (await life.schedule(new_task(run_at=now_ms() + 60_000))).task
    with pytest.raises(FailedPrecondition, match="not due"):
        await life.claim(task.task_id, "w", 1)


# -- unreadable rows: quarantined once, then an ordinary FAILED task ----------

FAR = 300_000_000_000_000  # ms: year ~11 476, past what the driver can decode


def quarantined_count(reason: str) -> float:
    return metrics.tasks_quarantined.labels(reason)._value.get()  # type: ignore[attr-defined, no-any-return]


async def test_unreadable_task_is_quarantined_once_and_reads_as_failed(
    store: MemoryStore, life: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    task = new_task(lease_token=2)
    store.put_raw(task, deadline_at=FAR, priority=42)
    before = quarantined_count("time")
    with caplog.at_level(logging.ERROR, logger="leasesched.lifecycle"):
        got = await life.get(task.task_id)
    assert got.status == TaskStatus.FAILED and got.error_type == "Unreadable"
    assert got.error.startswith("unreadable: ") and f"deadline_at={FAR}" in got.error and "priority=42" in got.error
    assert got.deadline_at is None and got.priority == 5 and got.lease_expires_at is None  # repaired
    assert got.finished_at is not None and abs(got.finished_at - now_ms()) < 5000
    assert got.payload == task.payload and got.lease_token == 2  # the rest is kept
    assert quarantined_count("time") == before + 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(task.task_id) in errors[0].getMessage() and "deadline_at" in errors[0].getMessage()
    # From now on it is a plain FAILED task: no second quarantine, no error.
    assert (await life.get(task.task_id)).status == TaskStatus.FAILED
    with pytest.raises(FailedPrecondition, match="already FAILED"):
        await life.cancel(task.task_id)
    with pytest.raises(FailedPrecondition):
        await life.claim(task.task_id, "w", 1)
    assert [applied for *_, applied in store.quarantines] == [True]
    assert quarantined_count("time") == before + 1


async def test_quarantine_condition_is_the_raw_row_read(store: MemoryStore, life: Lifecycle) -> None:
    task = new_task(status=TaskStatus.RUNNING, lease_token=3, lease_owner="w1", lease_expires_at=now_ms() + 9000)
    store.put_raw(task, status="RUNNING", started_at=-5)
    assert await life.read(task.task_id) is not None
    [(task_id, expect, columns, applied)] = store.quarantines
    assert applied and task_id == task.task_id
    assert (expect.status, expect.lease_token, expect.write_id) == ("RUNNING", 3, None)
    assert columns["status"] == "FAILED" and columns["started_at"] is None and columns["lease_expires_at"] is None
    # The worker that held the lease is fenced: its heartbeat finds the task gone.
    with pytest.raises(FailedPrecondition, match="lease lost"):
        await life.heartbeat(task.task_id, 3, 50, "")


async def test_unknown_status_is_quarantined_too(store: MemoryStore, life: Lifecycle) -> None:
    task = new_task()
    store.put_raw(task, status="DISPATCHED")
    before = quarantined_count("status")
    got = await life.get(task.task_id)
    assert got.status == TaskStatus.FAILED and "status='DISPATCHED'" in got.error
    assert quarantined_count("status") == before + 1


async def test_a_concurrent_change_is_never_overwritten(store: MemoryStore, life: Lifecycle) -> None:
    """Between the read and the quarantine someone else writes the row: the
    quarantine does not apply; the lifecycle reads again and quarantines
    what is there now, keeping that change."""
    task = new_task()
    store.put_raw(task, run_at=FAR)
    original = store.quarantine_task
    concurrent_write_id = uuid.uuid4()

    async def raced(task_id: uuid.UUID, expect: RawCondition, columns: dict[str, Any]) -> bool:
        if len(store.quarantines) == 0:
            row = store.raw[task_id]
            row.cancel_requested, row.progress_message, row.write_id = True, "theirs", concurrent_write_id
        return await original(task_id, expect, columns)

    store.quarantine_task = raced  # type: ignore[method-assign]
    before = quarantined_count("time")
    got = await life.get(task.task_id)
    assert [applied for *_, applied in store.quarantines] == [False, True]
    assert store.quarantines[1][1].write_id == concurrent_write_id  # the retry expects what it read anew
    assert got.status == TaskStatus.FAILED and got.cancel_requested and got.progress_message == "theirs"
    assert quarantined_count("time") == before + 1  # counted once: only the write that applied


async def test_losing_the_quarantine_race_to_another_process_reads_its_result(store: MemoryStore, life: Lifecycle) -> None:
    task = new_task()
    store.put_raw(task, created_at=-1)
    original = store.quarantine_task

    async def other_process_first(task_id: uuid.UUID, expect: RawCondition, columns: dict[str, Any]) -> bool:
        if not store.quarantines:
            assert await original(task_id, expect, {**columns, "error": "theirs"})  # the other process wins
        return await original(task_id, expect, columns)

    store.quarantine_task = other_process_first  # type: ignore[method-assign]
    before = quarantined_count("time")
    got = await life.get(task.task_id)
    assert got.status == TaskStatus.FAILED and got.error == "theirs"
    assert [applied for *_, applied in store.quarantines] == [True, False]
    assert quarantined_count("time") == before  # the winner counted it, not us


async def test_a_terminal_row_keeps_its_outcome_and_only_is_repaired(store: MemoryStore, life: Lifecycle) -> None:
    task = new_task(status=TaskStatus.SUCCEEDED, result=b"done", finished_at=now_ms())
    store.put_raw(task, finished_at=FAR)
    got = await life.get(task.task_id)
    assert got.status == TaskStatus.SUCCEEDED and got.result == b"done" and got.error_type == ""
    assert got.finished_at is None


async def test_store_down_during_quarantine_is_unavailable_then_retried(store: MemoryStore, life: Lifecycle) -> None:
    task = new_task()
    store.put_raw(task, deadline_at=FAR)
    store.fail_next.add("quarantine_task")
    with pytest.raises(Unavailable):
        await life.get(task.task_id)
    assert (await life.get(task.task_id)).status == TaskStatus.FAILED


async def test_listing_quarantines_unreadable_rows_in_their_place(store: MemoryStore, life: Lifecycle) -> None:
    now = now_ms()
    older, poison, newer = (new_task(created_at=now - age) for age in (3000, 2000, 1000))
    for t in (older, newer):
        store.tasks[t.task_id] = t
    store.put_raw(poison, deadline_at=FAR)
    page = await life.list(ListQuery(namespace="ns", page_size=2))
    assert [t.task_id for t in page.tasks] == [newer.task_id, poison.task_id]  # counted in the page size
    assert page.tasks[1].status == TaskStatus.FAILED and page.tasks[1].error_type == "Unreadable"
    assert not page.unreadable
    rest = await life.list(ListQuery(namespace="ns", page_size=2, page_token=page.next_token))
    assert [t.task_id for t in rest.tasks] == [older.task_id]


async def test_listing_with_a_status_filter_drops_a_quarantined_row_of_another_status(
    store: MemoryStore, life: Lifecycle
) -> None:
    good, poison = new_task(), new_task()
    store.tasks[good.task_id] = good
    store.put_raw(poison, deadline_at=FAR)
    page = await life.list(ListQuery(namespace="ns", status=TaskStatus.SCHEDULED))
    assert [t.task_id for t in page.tasks] == [good.task_id]
    assert store.tasks[poison.task_id].status == TaskStatus.FAILED  # quarantined all the same


async def test_a_cancel_that_keeps_losing_races_is_aborted_not_unavailable(store: MemoryStore, life: Lifecycle) -> None:
    """Contention is not an outage: the answer is ABORTED (retry), never UNAVAILABLE."""
    from leasesched.errors import Aborted
    from leasesched.store.base import CasResult

    task = new_task()
    await life.schedule(task)

    async def always_raced(*args: Any, **kwargs: Any) -> CasResult:
        return CasResult(applied=False, current_status=TaskStatus.SCHEDULED, current_lease_token=0)

    store.update_task = always_raced  # type: ignore[method-assign]
    with pytest.raises(Aborted, match="kept changing"):
        await life.cancel(task.task_id)


async def test_a_listing_page_ends_early_past_its_byte_budget(store: MemoryStore, life: Lifecycle) -> None:
    """Big results make a page shorter (it must fit one gRPC message), and the
    next page continues where it stopped: nothing skipped, nothing twice."""
    ids = []
    for i in range(5):
        task = new_task(created_at=now_ms() + i, result=b"r" * 400_000)
        await life.schedule(task)
        ids.append(task.task_id)
    seen: list[uuid.UUID] = []
    token = ""
    pages = 0
    while True:
        page = await life.list(ListQuery("ns", page_size=100, page_token=token, max_bytes=1_000_000))
        assert 1 <= len(page.tasks) <= 3
        seen += [t.task_id for t in page.tasks]
        pages += 1
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(ids) and pages >= 2


async def test_a_task_waiting_for_its_next_attempt_shows_no_stale_progress(life: Lifecycle) -> None:
    """Released, retried or re-queued after its lease expired: the last attempt's progress
    is cleared; a retry keeps its error (why it waits), a release keeps none."""
    task = (await life.schedule(new_task(lease_ms=1000))).task

    async def run_to(percent: float) -> int:
        lease = await life.claim(task.task_id, "w1", 0)
        await life.heartbeat(task.task_id, lease.token, percent, f"{percent}% step 30 of 120")
        return lease.token

    token = await run_to(25)
    await life.release(task.task_id, token)
    view = await life.get(task.task_id)
    assert (view.status, view.progress_percent, view.progress_message, view.error) == (TaskStatus.SCHEDULED, 0.0, "", "")

    token = await run_to(50)
    await life.fail(task.task_id, token, "boom", "RuntimeError")
    view = await life.get(task.task_id)
    assert (view.progress_percent, view.progress_message, view.error) == (0.0, "", "boom")

    lease = await life.claim(task.task_id, "w1", 0, now=view.run_at)  # at the retry's time
    await life.heartbeat(task.task_id, lease.token, 75, "75%", now=view.run_at)
    running = await life.get(task.task_id)
    assert await life.expire_lease(running, now=(running.lease_expires_at or 0) + 10_000) == TaskStatus.SCHEDULED
    view = await life.get(task.task_id)
    assert (view.progress_percent, view.progress_message) == (0.0, "")


async def test_a_cancel_acknowledged_without_a_request_is_an_ordinary_failure(life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    outcome = await life.acknowledge_cancel(task.task_id, lease.token, "stopped", "Cancelled")
    assert outcome.status == TaskStatus.SCHEDULED and outcome.next_run_at is not None  # retried, not CANCELLED
    view = await life.get(task.task_id)
    assert (view.attempt, view.error_type) == (2, "Cancelled")


async def test_a_claim_past_the_deadline_fails_the_task_instead_of_starting_it(life: Lifecycle) -> None:
    """However long a task waited after the trigger looked (a dispatcher queue, re-dispatches
    after the claim timeout), it never starts past schedule_to_start / schedule_to_close."""
    from leasesched.model import Timeouts

    waited = (await life.schedule(new_task(timeouts=Timeouts(schedule_to_start_ms=1000)))).task
    with pytest.raises(FailedPrecondition, match="past its deadline: schedule_to_start of 1000 ms exceeded"):
        await life.claim(waited.task_id, "w1", 1, now=waited.run_at + 1000)
    view = await life.get(waited.task_id)
    assert (view.status, view.error_type) == (TaskStatus.FAILED, "DeadlineExceeded")

    closing = (await life.schedule(new_task(timeouts=Timeouts(schedule_to_close_ms=5000), deadline_at=now_ms() + 5000))).task
    assert (await life.claim(closing.task_id, "w1", 1)).token == 1  # in time: runs
    on_time = (await life.schedule(new_task(timeouts=Timeouts(schedule_to_start_ms=1000)))).task
    assert (await life.claim(on_time.task_id, "w1", 1, now=on_time.run_at + 999)).token == 1
