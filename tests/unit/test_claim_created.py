"""The claim of a task untouched since its creation, without reading it
(``Lifecycle.claim(created=...)``, ``CreatedTask``): one conditional write on
exactly the creation row; anything else goes the usual way, from a read."""

from __future__ import annotations

import uuid

import pytest

from leasesched.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from leasesched.config import Config
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, Task, Timeouts, now_ms
from leasesched.server.validation import created_task
from leasesched.states import TaskStatus
from leasesched.store.base import Untouched
from leasesched.store.memory import MemoryStore
from services.convert import created_pb


def new_task(**kw: object) -> Task:
    now = now_ms()
    base = dict(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"p", shard=3, created_at=now, run_at=now,
                first_run_at=now, lease_ms=20_000)  # fmt: skip
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


async def create(life: Lifecycle, task: Task, **kw: object) -> Untouched:
    """Schedule ``task``; what its hint's ticket says of it."""
    done = await life.schedule(task, **kw)  # type: ignore[arg-type]
    assert done.created and done.write_id is not None
    return Untouched(done.task, done.write_id)


async def test_a_created_task_is_claimed_without_a_read(store: MemoryStore, life: Lifecycle) -> None:
    ticket = await create(life, new_task())
    task = ticket.task
    reads = store.reads
    lease = await life.claim(task.task_id, "w1", 1, namespace="ns", created=ticket)
    assert store.reads == reads, "the row was read"
    assert lease.token == 1 and lease.task.payload == b"p" and lease.task.status == TaskStatus.RUNNING
    stored = await life.get(task.task_id)
    assert (stored.status, stored.lease_token, stored.lease_owner, stored.lease_expires_at) == (
        TaskStatus.RUNNING, 1, "w1", lease.expires_at,
    )  # fmt: skip
    # Its lease check entry, as for any claim.
    assert any(e.kind == DueEntry.LEASE and e.task_id == task.task_id and e.lease_token == 1 for e in store.due)


async def test_a_second_claim_with_the_same_ticket_is_refused(store: MemoryStore, life: Lifecycle) -> None:
    ticket = await create(life, new_task())
    task = ticket.task
    await life.claim(task.task_id, "w1", 1, created=ticket)
    with pytest.raises(FailedPrecondition, match="RUNNING"):
        await life.claim(task.task_id, "w2", 1, created=ticket)
    assert (await life.get(task.task_id)).lease_owner == "w1"


async def test_a_ticket_that_lies_changes_nothing_but_the_path(store: MemoryStore, life: Lifecycle) -> None:
    """A longer lease, an earlier run time, no deadline: the write does not
    apply, and the claim goes the usual way with the row's own values."""
    ticket = await create(life, new_task(run_at=now_ms() + 60_000, first_run_at=now_ms() + 60_000))
    task = ticket.task
    for forged in (task.replace(run_at=now_ms()), task.replace(lease_ms=3_600_000)):
        reads = store.reads
        with pytest.raises(FailedPrecondition, match="not due"):
            await life.claim(task.task_id, "w1", 1, created=Untouched(forged, ticket.write_id))
        assert store.reads == reads + 1  # the usual way read it
    due = await create(life, new_task(deadline_at=now_ms() + 100_000))
    forged_due = Untouched(due.task.replace(lease_ms=3_600_000, deadline_at=None), due.write_id)
    lease = await life.claim(due.task.task_id, "w1", 1, created=forged_due)
    assert lease.expires_at - lease.task.started_at == 20_000  # type: ignore[operator]


async def test_a_task_changed_since_its_creation_goes_the_usual_way(store: MemoryStore, life: Lifecycle) -> None:
    ticket = await create(life, new_task())
    await life.cancel(ticket.task.task_id)
    with pytest.raises(FailedPrecondition, match="CANCELLED"):
        await life.claim(ticket.task.task_id, "w1", 1, created=ticket)
    # Released back to SCHEDULED at token 1: no longer its creation row.
    other = await create(life, new_task())
    first = await life.claim(other.task.task_id, "w1", 1)
    await life.release(other.task.task_id, first.token)
    reads = store.reads
    again = await life.claim(other.task.task_id, "w2", 0, created=other)
    assert again.token == 2 and store.reads > reads


async def test_the_ticket_must_name_the_creations_write_id(store: MemoryStore, life: Lifecycle) -> None:
    """A task created with an idempotency key (a conditional insert) has a
    write id of its own: its ticket carries it; a ticket with another one
    (here the one a key-less creation would have written) is not its
    creation row, and the claim reads."""
    from leasesched.store.base import creation_write_id

    keyed = await create(life, new_task(), idempotency_key="k-1", request_hash=b"h")
    assert keyed.write_id != creation_write_id(keyed.task.task_id)
    reads = store.reads
    assert (await life.claim(keyed.task.task_id, "w1", 1, created=keyed)).token == 1
    assert store.reads == reads
    other = await create(life, new_task(), idempotency_key="k-2", request_hash=b"h")
    wrong = Untouched(other.task, creation_write_id(other.task.task_id))
    assert (await life.claim(other.task.task_id, "w1", 1, created=wrong)).token == 1
    assert store.reads == reads + 1


async def test_another_namespace_is_refused_as_without_a_ticket(store: MemoryStore, life: Lifecycle) -> None:
    ticket = await create(life, new_task())
    with pytest.raises((PermissionDenied, NotFound)):
        await life.claim(ticket.task.task_id, "w1", 1, namespace="other", created=ticket)
    assert (await life.get(ticket.task.task_id)).status == TaskStatus.SCHEDULED


def test_the_ticket_round_trips_and_bad_fields_are_named() -> None:
    task = new_task(priority=7, timeouts=Timeouts(schedule_to_start_ms=5_000, start_to_close_ms=9_000), deadline_at=now_ms() + 1)
    write_id = uuid.uuid4()
    ticket = created_task(task.task_id, created_pb(task, write_id), Config())
    back = ticket.task
    assert ticket.write_id == write_id
    assert back.shard == task.shard and back.namespace == task.namespace and back.type == task.type
    assert (back.priority, back.payload, back.lease_ms, back.run_at, back.deadline_at) == (
        7, b"p", 20_000, task.run_at, task.deadline_at,
    )  # fmt: skip
    assert (back.timeouts.schedule_to_start_ms, back.timeouts.start_to_close_ms) == (5_000, 9_000)
    assert created_task(task.task_id, created_pb(task.replace(deadline_at=None), write_id), Config()).task.deadline_at is None
    for field, change in (
        ("created.type", lambda c: setattr(c, "type", "")),
        ("created.namespace", lambda c: setattr(c, "namespace", "bad ns")),
        ("created.priority", lambda c: setattr(c, "priority", 42)),
        ("created.shard", lambda c: setattr(c, "shard", -1)),
        ("created.lease_duration", lambda c: c.lease_duration.FromMilliseconds(10)),
        ("created.run_at", lambda c: setattr(c.run_at, "nanos", -1)),
        ("created.write_id", lambda c: setattr(c, "write_id", "not-a-uuid")),
    ):
        bad = created_pb(task, write_id)
        change(bad)
        with pytest.raises(InvalidArgument, match=field):
            created_task(task.task_id, bad, Config())
