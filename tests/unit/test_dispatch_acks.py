"""The trigger's read-saving shortcuts, over the in-memory store (pure logic):
workers' claimed/finished acks and TaskService's creation hints.

Each shortcut replaces a read of the task row; these tests count the reads
and check that an ack is honoured only from the stream the task was
dispatched on (a worker speaks only for work it was given).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from leasesched.lifecycle import Lifecycle, lease_entry
from leasesched.model import DueEntry, Task, now_ms
from leasesched.store.memory import MemoryStore
from tests.unit.waiting import wait_until
from trigger.dispatcher import Dispatcher, Ready
from trigger.scanner import ScanSettings, ShardScanner

CLAIM_TIMEOUT_S = 0.05


class Checks:
    """The dispatcher's claim check: records which dispatches it had to look at."""

    def __init__(self) -> None:
        self.checked: list[uuid.UUID] = []

    async def __call__(self, ready: Ready) -> bool:
        self.checked.append(ready.task_id)
        return False  # claimed


def ready_for(dispatcher: Dispatcher, done: list[uuid.UUID], token: int = 0) -> Ready:
    task_id = uuid.uuid4()
    return dispatcher.make_ready(task_id, "ns", "t", 1, token, 5, now_ms(), 0, on_done=lambda: done.append(task_id))


async def test_claimed_ack_from_the_dispatch_stream_replaces_the_claim_check() -> None:
    checks = Checks()
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, checks)
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 2)
    done: list[uuid.UUID] = []
    ready = ready_for(dispatcher, done, token=3)
    dispatcher.offer(ready)
    dispatch = link.outbox.get_nowait()
    assert dispatch.lease_token == 3  # echoed back in the ack
    dispatcher.claimed(link, ready.task_id, dispatch.attempt, dispatch.lease_token)
    assert done == [ready.task_id]
    await asyncio.sleep(CLAIM_TIMEOUT_S * 4)
    assert checks.checked == []  # no read after the claim timeout
    assert dispatcher.stats()["inflight"] == 0


async def test_acks_from_another_stream_or_for_another_version_are_ignored() -> None:
    checks = Checks()
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, checks)
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 1)
    other = dispatcher.connect("w2", "ns", frozenset({"t"}), 0)
    done: list[uuid.UUID] = []
    ready = ready_for(dispatcher, done)
    dispatcher.offer(ready)
    assert link.outbox.qsize() == 1
    dispatcher.claimed(other, ready.task_id, 1, 0)  # not dispatched on that stream
    dispatcher.claimed(link, ready.task_id, 2, 0)  # another attempt
    dispatcher.finished(link, ready.task_id, 1)  # never acked as claimed
    assert not dispatcher.lease_finished(ready.task_id, 1)
    await asyncio.sleep(CLAIM_TIMEOUT_S * 4)
    assert checks.checked == [ready.task_id]  # the claim check still ran
    assert done == [ready.task_id]


async def test_finished_ack_marks_exactly_the_claimed_lease() -> None:
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, Checks())
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 1)
    other = dispatcher.connect("w2", "ns", frozenset({"t"}), 0)
    ready = ready_for(dispatcher, [], token=4)
    dispatcher.offer(ready)
    dispatcher.claimed(link, ready.task_id, 1, 4)  # the claim raised the token to 5
    dispatcher.finished(other, ready.task_id, 5)  # another stream cannot speak for it
    dispatcher.finished(link, ready.task_id, 4)  # not the claimed lease
    assert not dispatcher.lease_finished(ready.task_id, 5)
    dispatcher.finished(link, ready.task_id, 5)
    assert dispatcher.lease_finished(ready.task_id, 5)
    assert not dispatcher.lease_finished(ready.task_id, 6)


def settings() -> ScanSettings:
    return ScanSettings(
        bucket_s=10, interval_s=0.05, lookahead_ms=2000, settle_ms=100, orphan_grace_ms=30_000, lease_grace_ms=0, start_ms=0
    )


async def running_task(store: MemoryStore, lease_ms: int) -> tuple[Task, int]:
    now = now_ms()
    task = Task(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=0, created_at=now, run_at=now, lease_ms=lease_ms)
    life = Lifecycle(store, lease_grace_ms=0)
    await life.schedule(task)
    lease = await life.claim(task.task_id, "w1", attempt=1)
    return task, lease.token


async def test_lease_check_of_a_finished_lease_needs_no_read() -> None:
    store = MemoryStore()
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, Checks())
    scanner = ShardScanner(0, Lifecycle(store, lease_grace_ms=0), dispatcher, settings())
    task, token = await running_task(store, lease_ms=1)
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 1)
    dispatcher.offer(dispatcher.make_ready(task.task_id, "ns", "t", 1, token - 1, 5, task.run_at, 0, on_done=lambda: None))
    dispatcher.claimed(link, task.task_id, 1, token - 1)
    dispatcher.finished(link, task.task_id, token)
    store.reads = 0
    entry = lease_entry(task, now_ms() - 1, 0, token)
    scanner.notify_entry(entry)
    await wait_until(lambda: scanner.stats()["pending"] == 0)
    assert store.reads == 0
    # Without the ack the same check reads the row (and re-queues the expired lease).
    other, other_token = await running_task(store, lease_ms=1)
    scanner.notify_entry(lease_entry(other, now_ms() - 1, 0, other_token))
    await wait_until(lambda: store.tasks[other.task_id].status.value == "SCHEDULED")
    assert store.reads > 0


async def test_creation_hint_dispatches_without_a_read_and_the_scan_does_not_repeat_it() -> None:
    store = MemoryStore()
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, Checks())
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 5)
    scanner = ShardScanner(0, Lifecycle(store), dispatcher, settings())
    now = now_ms()
    task = Task(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=0, created_at=now, run_at=now)
    await Lifecycle(store).schedule(task)
    entry = DueEntry(shard=0, due_at=now_ms(), task_id=task.task_id, kind=DueEntry.RUN, attempt=1, type="t")
    scanner.offer_created(entry, "ns", task.run_at)
    assert link.outbox.qsize() == 1 and store.reads == 0
    scanner.offer_created(entry, "ns", task.run_at)  # a repeated hint
    runner = asyncio.create_task(scanner.run())  # the scan finds the stored entry of the same task
    try:
        await wait_until(lambda: store.reads == 0 and scanner.stats()["checkpoint"] > 0)
        await asyncio.sleep(0.2)
        assert link.outbox.qsize() == 1  # dispatched once
    finally:
        scanner.stop()
        runner.cancel()


async def test_lease_check_looked_at_early_comes_back_instead_of_ending(monkeypatch) -> None:
    """A lease entry handled before its time by the trigger's clock (the clock
    stepped back between the scan and the check) must come back at its time:
    its follow-up would be the same entry, already seen, and resolving it
    would leave the task RUNNING for good once its worker is gone."""
    import trigger.scanner as scanner_module

    store = MemoryStore()
    scanner = ShardScanner(0, Lifecycle(store, lease_grace_ms=0), Dispatcher(CLAIM_TIMEOUT_S, Checks()), settings())
    task, token = await running_task(store, lease_ms=300)
    expires = store.tasks[task.task_id].lease_expires_at
    assert expires is not None
    entry = lease_entry(task, expires, 0, token)  # as the claim wrote it: nobody renews the lease
    offset = [1000]
    monkeypatch.setattr(scanner_module, "now_ms", lambda: now_ms() + offset[0])
    scanner.notify_entry(entry)  # due by the scanner's clock: handled at once ...
    offset[0] = 0  # ... by which time the clock has stepped back before the expiry
    await wait_until(lambda: store.tasks[task.task_id].status.value == "SCHEDULED", timeout_s=5)  # re-queued


async def test_a_task_created_after_its_orphan_entry_was_dropped_is_still_dispatched() -> None:
    """A ScheduleTask with an unknown outcome leaves an entry without a task;
    the scanner drops it after orphan_grace. When the client's retry (same
    idempotency key) then creates the task, its new entry has the same key
    (task, attempt, token) and must not count as already seen."""
    store = MemoryStore()
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, Checks())
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 5)
    scanner = ShardScanner(0, Lifecycle(store), dispatcher, replace(settings(), orphan_grace_ms=0))
    now = now_ms()
    task = Task(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=0, created_at=now, run_at=now)
    orphan = DueEntry(shard=0, due_at=now - 1, task_id=task.task_id, kind=DueEntry.RUN, attempt=1, type="t")
    scanner.notify_entry(orphan)
    await wait_until(lambda: scanner.stats()["pending"] == 0)  # dropped: no task
    await Lifecycle(store).schedule(task)  # the retry creates it
    scanner.offer_created(DueEntry(shard=0, due_at=now_ms(), task_id=task.task_id, kind=DueEntry.RUN, attempt=1, type="t"),
                          "ns", task.run_at)  # fmt: skip
    assert link.outbox.qsize() == 1


async def test_the_checkpoint_stays_behind_a_pending_entry_timed_late() -> None:
    """A creation hint is timed by the trigger's clock on arrival, a little
    after the stored entry's time. While that task waits (no worker), the
    checkpoint must not pass the stored entry, or a new owner of the shard
    reading from the checkpoint would never see the task."""
    store = MemoryStore()
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, Checks())  # no worker: the task stays pending
    scanner = ShardScanner(0, Lifecycle(store), dispatcher, settings())  # settle 100 ms
    stored_at = now_ms() - 1000
    task = Task(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=0, created_at=stored_at, run_at=stored_at)
    await Lifecycle(store).schedule(task)
    hinted = DueEntry(shard=0, due_at=stored_at + 50, task_id=task.task_id, kind=DueEntry.RUN, attempt=1, type="t")
    scanner.offer_created(hinted, "ns", task.run_at)
    runner = asyncio.create_task(scanner.run())
    try:
        await wait_until(lambda: scanner.stats()["checkpoint"] > 0)
        await asyncio.sleep(0.3)  # a few passes
        assert scanner.stats()["pending"] == 1
        assert 0 < scanner.stats()["checkpoint"] <= stored_at
    finally:
        scanner.stop()
        runner.cancel()


async def test_tasks_refused_by_a_full_limit_are_held_back_and_offered_one_at_a_time() -> None:
    """A refused claim's task is not dispatched again at once (nor after the
    claim timeout): one of its group goes out when a task of the group ends."""
    checks = Checks()
    dispatcher = Dispatcher(CLAIM_TIMEOUT_S, checks)
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 10)
    done: list[uuid.UUID] = []
    readies = [
        dispatcher.make_ready(uuid.uuid4(), "ns", "t", 1, 0, 5, now_ms(), 0, on_done=lambda: None, group="partner")
        for _ in range(4)
    ]
    for ready in readies:
        dispatcher.offer(ready)
    sent = [link.outbox.get_nowait() for _ in range(4)]
    running = readies[0]
    dispatcher.claimed(link, running.task_id, sent[0].attempt, sent[0].lease_token)
    dispatcher.limited_all({r.task_id for r in readies[1:]})
    assert dispatcher.stats()["limited"] == 3
    await asyncio.sleep(CLAIM_TIMEOUT_S * 4)
    assert link.outbox.empty() and checks.checked == []  # held back: no re-dispatch, no claim check
    dispatcher.finished(link, running.task_id, sent[0].lease_token + 1)
    again = link.outbox.get_nowait()
    assert again.task_id == str(readies[1].task_id) and link.outbox.empty()  # the longest waiting, alone
    assert dispatcher.stats()["limited"] == 2
    dispatcher.drop_shards(frozenset())  # shard lost: the held-back tasks are let go
    assert dispatcher.stats()["limited"] == 0 and done == []
