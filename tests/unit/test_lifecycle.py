"""The lifecycle policy over the in-memory store (pure logic; the same paths
run against the real Cassandra in tests/integration)."""

import uuid

import pytest

from leasesched.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, RetryPolicy, Task, now_ms, shard_of
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore


def new_task(**kw: object) -> Task:
    tid = uuid.uuid4()
    now = now_ms()
    base = dict(task_id=tid, namespace="ns", type="t", payload=b"p", shard=3, created_at=now, run_at=now, first_run_at=now)
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def life(store: MemoryStore) -> Lifecycle:
    return Lifecycle(store, lease_grace_ms=0)


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
    assert (await life.heartbeat(task.task_id, lease.token, 10, "")).cancel_requested
    outcome = await life.fail(task.task_id, lease.token, "stopped", cancelled=True)
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


async def test_delayed_task_cannot_be_claimed_early(life: Lifecycle) -> None:
    task = (await life.schedule(new_task(run_at=now_ms() + 60_000))).task
    with pytest.raises(FailedPrecondition, match="not due"):
        await life.claim(task.task_id, "w", 1)
