"""Why a task waits for a concurrency limit (PollTask's ``waiting_reason``) and
how many slots a limit's group has taken (``LimitView.running``), over the
in-memory store: the reason for a due task of a full group, none for a task
not due or a group with room, gate and limit said together, at most one read
of a group's slots per second however many tasks are polled, and a poll that
still answers when the slots cannot be read. Against real Cassandra and
processes: tests/integration/test_concurrency_limits.py."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from leasesched.admission import Admission, LimitTable
from leasesched.concurrency import DEFAULT_KEY, ConcurrencyLimit, LimitScope, SlotGroup, SlotHolder
from leasesched.config import Config
from leasesched.errors import Unavailable
from leasesched.gates import Gate
from leasesched.lifecycle import Lifecycle
from leasesched.model import Task, now_ms
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from services.limit_service import LimitService
from services.slot_use import SlotUse
from services.task_service import TaskService

KEY = "partner-7"


class CountingStore(MemoryStore):
    """Counts the reads of slots, per group."""

    def __init__(self) -> None:
        super().__init__()
        self.slot_reads: dict[str, int] = {}

    async def read_slots(self, group: SlotGroup) -> list[SlotHolder]:
        self.slot_reads[group.label()] = self.slot_reads.get(group.label(), 0) + 1
        return await super().read_slots(group)


def set_limits(store: MemoryStore, *limits: ConcurrencyLimit) -> None:
    store.limits = {(lim.namespace, lim.scope, lim.name): lim for lim in limits}


def key_limit(name: str, n: int) -> ConcurrencyLimit:
    return ConcurrencyLimit(namespace="ns", scope=LimitScope.KEY, name=name, max_running=n)


def lifecycle(store: MemoryStore) -> Lifecycle:
    """Claims read the limits at once (no 2 s cache in tests)."""
    return Lifecycle(store, admission=Admission(store, LimitTable(store, refresh_s=0.0), full_memory_s=0.0))


async def new_task(life: Lifecycle, run_at: int | None = None, **kw: Any) -> Task:
    now = now_ms()
    at = now if run_at is None else run_at
    task = Task(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=1, created_at=now, run_at=at, first_run_at=at, **kw)
    return (await life.schedule(task)).task


async def poll(service: Any, task: Task) -> str:
    reply = await service.PollTask(pb.PollTaskRequest(task_id=str(task.task_id)), None)
    return str(reply.task.waiting_reason)


async def test_a_due_task_of_a_full_group_says_which_limit_holds_it() -> None:
    store = CountingStore()
    set_limits(store, key_limit(KEY, 1))
    life = lifecycle(store)
    running = await new_task(life, concurrency_key=KEY)
    await life.claim(running.task_id, "w1", 0)
    waiting = await new_task(life, concurrency_key=KEY)
    later = await new_task(life, run_at=now_ms() + 60_000, concurrency_key=KEY)
    other = await new_task(life, concurrency_key="partner-9")
    service = TaskService(Config(), life, shards=64)
    store.slot_reads.clear()  # the claim's read
    assert await poll(service, waiting) == f"concurrency limit ns/key={KEY} is full (1 of 1 running)"
    assert await poll(service, running) == ""  # RUNNING: held by nothing
    assert await poll(service, later) == ""  # not due: it waits for its time, not for a slot
    assert (await poll(service, other)).endswith("waiting for a free worker slot (higher and aged priorities first, then each group's turn)")
    assert store.slot_reads == {f"ns/key={KEY}": 1}


async def test_every_full_level_is_named_and_a_gate_is_said_with_them() -> None:
    store = MemoryStore()
    set_limits(
        store, ConcurrencyLimit("ns", LimitScope.NAMESPACE, "", 1), ConcurrencyLimit("ns", LimitScope.TYPE, "t", 5),
        key_limit(DEFAULT_KEY, 1),
    )  # fmt: skip
    await store.insert_gate(Gate("ns", "api", rate=5, burst=5, paused=True))
    life = lifecycle(store)
    await life.claim((await new_task(life, concurrency_key=KEY)).task_id, "w1", 0)
    waiting = await new_task(life, concurrency_key=KEY, gate="api")
    reason = await poll(TaskService(Config(), life, shards=64), waiting)
    # The type limit has room (1 of 5): not named.
    assert reason == (
        "gate 'api' is paused; concurrency limit ns is full (1 of 1 running); "
        f"concurrency limit ns/key={KEY} is full (1 of 1 running)"
    )


async def test_many_polls_read_a_groups_slots_once_a_second() -> None:
    store = CountingStore()
    set_limits(store, key_limit(KEY, 1))
    life = lifecycle(store)
    await life.claim((await new_task(life, concurrency_key=KEY)).task_id, "w1", 0)
    waiting = [await new_task(life, concurrency_key=KEY) for _ in range(30)]
    service = TaskService(Config(), life, shards=64)
    store.slot_reads.clear()  # the claim's read
    reasons = await asyncio.gather(*(poll(service, t) for t in waiting))  # at the same moment: one read in flight
    reasons += [await poll(service, t) for t in waiting]  # one after another, within the second
    assert set(reasons) == {f"concurrency limit ns/key={KEY} is full (1 of 1 running)"}
    assert store.slot_reads == {f"ns/key={KEY}": 1}


async def test_a_poll_answers_without_the_limit_when_its_slots_cannot_be_read() -> None:
    store = MemoryStore()
    set_limits(store, key_limit(KEY, 1))
    life = lifecycle(store)
    await life.claim((await new_task(life, concurrency_key=KEY)).task_id, "w1", 0)
    waiting = await new_task(life, concurrency_key=KEY)
    service = TaskService(Config(), life, shards=64)
    store.fail_next.add("read_slots")
    assert "concurrency limit" not in await poll(service, waiting)  # not known: the task's state is still answered
    assert "concurrency limit" in await poll(service, waiting)  # a failure is not remembered


async def test_slot_use_counts_taken_slots_and_trusts_a_count_for_its_second() -> None:
    store = CountingStore()
    clock = [0.0]
    slots = SlotUse(store, cache_s=1.0, clock=lambda: clock[0])
    group = SlotGroup("ns", LimitScope.KEY, KEY, 3)
    rows = store.slots.setdefault(("ns", LimitScope.KEY, KEY), {})
    rows[0] = SlotHolder(0, uuid.uuid4(), lease_token=4, taken_at=0, confirmed=True)
    rows[1] = SlotHolder(1, uuid.uuid4(), lease_token=0, taken_at=0, confirmed=False)  # given back
    rows[5] = SlotHolder(5, uuid.uuid4(), lease_token=2, taken_at=0, confirmed=True)  # past a lowered limit: still running
    assert await slots.taken(group) == 2
    del rows[0]
    clock[0] = 0.9
    assert await slots.taken(group) == 2  # within the second: not read again
    clock[0] = 1.0
    assert await slots.taken(group) == 1
    assert store.slot_reads == {group.label(): 2}
    store.fail_next.add("read_slots")
    clock[0] = 5.0
    with pytest.raises(Unavailable, match=f"ns/key={KEY}"):
        await slots.taken(group)


# ---------------------------------------------------------------- LimitView.running


async def test_get_and_list_limits_show_the_slots_taken_and_the_default_key_none() -> None:
    store = MemoryStore()
    set_limits(store, key_limit(KEY, 2), key_limit(DEFAULT_KEY, 1), ConcurrencyLimit("ns", LimitScope.NAMESPACE, "", 10))
    life = lifecycle(store)
    await life.claim((await new_task(life, concurrency_key=KEY)).task_id, "w1", 0)
    await life.claim((await new_task(life, concurrency_key="partner-9")).task_id, "w1", 0)  # under the default
    service: Any = LimitService(store)

    def ref(scope: int, name: str) -> pb.LimitRef:
        return pb.LimitRef(namespace="ns", scope=scope, name=name)  # type: ignore[arg-type]

    got = (await service.GetLimit(pb.GetLimitRequest(limit=ref(pb.LIMIT_SCOPE_KEY, KEY)), None)).limit
    assert (got.max_running, got.running) == (2, 1)
    listed = (await service.ListLimits(pb.ListLimitsRequest(namespace="ns"), None)).limits
    assert {(v.limit.scope, v.limit.name): v.running for v in listed} == {
        (pb.LIMIT_SCOPE_NAMESPACE, ""): 2,
        (pb.LIMIT_SCOPE_KEY, DEFAULT_KEY): 0,  # every key has its own slots: no one number
        (pb.LIMIT_SCOPE_KEY, KEY): 1,
    }


async def test_a_due_task_held_by_nothing_waits_for_a_worker_and_a_gates_cap_is_a_reason_too() -> None:
    store = MemoryStore()
    await store.insert_gate(Gate("ns", "api", 100.0, 10, max_in_flight=1))
    life = lifecycle(store)
    service = TaskService(Config(), life, shards=64)
    plain = await new_task(life, run_at=now_ms() - 2_000)
    reason = await poll(service, plain)
    assert reason.startswith("due 2.") and "waiting for a free worker slot" in reason, reason
    assert await poll(service, await new_task(life, run_at=now_ms() + 60_000)) == ""  # not due: waits for its time
    first = await new_task(life, gate="api")
    await life.claim(first.task_id, "w1", 0)
    second = await new_task(life, gate="api")
    assert await poll(service, second) == "concurrency limit ns/gate=api is full (1 of 1 running)"
