"""A claim without a read on the real Cassandra (``CreatedTask``,
``Untouched``): the conditional write's IF on the creation write id, a null
deadline, times as ms and the other creation columns holds for a task just
created, and fails (so the claim reads) for one changed since or for a
ticket that lies."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from leasesched.config import Config
from leasesched.errors import FailedPrecondition
from leasesched.lifecycle import Lifecycle
from leasesched.model import Task, Timeouts, now_ms
from leasesched.states import TaskStatus
from leasesched.store.base import Untouched, creation_write_id
from leasesched.store.cassandra import CassandraStore


class CountingStore(CassandraStore):
    """The real store, counting the task reads."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.reads = 0

    async def get_task(self, task_id: uuid.UUID, serial: bool = False) -> Task | None:
        self.reads += 1
        return await super().get_task(task_id, serial)


def new_task(**kw: object) -> Task:
    now = now_ms()
    base = dict(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"p", shard=3, created_at=now, run_at=now,
                first_run_at=now, lease_ms=20_000)  # fmt: skip
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


def test_a_created_task_is_claimed_by_one_write_and_a_changed_one_is_read(module_config: Config) -> None:
    async def create(life: Lifecycle, task: Task, **kw: object) -> Untouched:
        done = await life.schedule(task, **kw)  # type: ignore[arg-type]
        assert done.created and done.write_id is not None
        return Untouched(done.task, done.write_id)

    async def run() -> None:
        store = CountingStore(module_config)
        await store.connect()
        try:
            life = Lifecycle(store)
            # No deadline (a null column in the condition), and one with every timeout set.
            for task in (new_task(), new_task(deadline_at=now_ms() + 600_000,
                                              timeouts=Timeouts(schedule_to_start_ms=60_000, start_to_close_ms=5_000))):  # fmt: skip
                ticket = await create(life, task)
                reads = store.reads
                lease = await life.claim(task.task_id, "w1", 1, namespace="ns", created=ticket)
                assert store.reads == reads, "claimed by reading the row"
                stored = await life.read(task.task_id, serial=True)
                assert stored is not None and (stored.status, stored.lease_token, stored.lease_owner) == (
                    TaskStatus.RUNNING, 1, "w1",
                )  # fmt: skip
                assert lease.expires_at - lease.task.started_at == 20_000  # type: ignore[operator]
            # A ticket that lies about the lease: the usual way, the row's own lease.
            ticket = await create(life, new_task())
            forged = Untouched(ticket.task.replace(lease_ms=3_600_000), ticket.write_id)
            lease = await life.claim(ticket.task.task_id, "w1", 1, created=forged)
            assert lease.token == 1 and lease.expires_at - lease.task.started_at == 20_000  # type: ignore[operator]
            # Changed since its creation (cancelled): refused, from a read.
            ticket = await create(life, new_task())
            await life.cancel(ticket.task.task_id)
            reads = store.reads
            with pytest.raises(FailedPrecondition, match="CANCELLED"):
                await life.claim(ticket.task.task_id, "w1", 1, created=ticket)
            assert store.reads > reads
            # Created with an idempotency key (a conditional insert with a write id of its own).
            keyed = await create(life, new_task(), idempotency_key="k-1", request_hash=b"h")
            reads = store.reads
            assert (await life.claim(keyed.task.task_id, "w1", 1, created=keyed)).token == 1
            assert store.reads == reads
            # A ticket naming another write id: the usual way.
            other = await create(life, new_task(), idempotency_key="k-2", request_hash=b"h")
            wrong = Untouched(other.task, creation_write_id(other.task.task_id))
            assert (await life.claim(other.task.task_id, "w1", 1, created=wrong)).token == 1
            assert store.reads == reads + 1
        finally:
            await store.close()

    asyncio.run(run())
