"""Concurrency limits at the claim (leasesched/admission.py) over the in-memory
store: slots taken, refused, confirmed, given back and found free. The same
paths run against the real Cassandra in tests/integration/test_concurrency_limits.py."""

from typing import Any

import pytest

from leasesched.admission import Admission, LimitReached, LimitTable
from leasesched.concurrency import DEFAULT_KEY, SLOT_CLAIM_MS, ConcurrencyLimit, LimitScope, SlotGroup, SlotHolder
from leasesched.errors import ResourceExhausted
from leasesched.lifecycle import Lifecycle
from leasesched.model import Task, now_ms
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore
from tests.unit.test_gates import new_task


def limit(scope: LimitScope, name: str, n: int, namespace: str = "ns") -> ConcurrencyLimit:
    return ConcurrencyLimit(namespace=namespace, scope=scope, name=name, max_running=n)


def set_limits(store: MemoryStore, *limits: ConcurrencyLimit) -> None:
    store.limits = {(lim.namespace, lim.scope, lim.name): lim for lim in limits}


def lifecycle(store: MemoryStore) -> Lifecycle:
    """A lifecycle whose limit table is read at every claim (no 2 s cache in tests),
    and which looks at a full group's holders at every refused claim."""
    return Lifecycle(store, admission=Admission(store, LimitTable(store, refresh_s=0.0), full_memory_s=0.0))


async def scheduled(life: Lifecycle, **kw: Any) -> Task:
    return (await life.schedule(new_task(**kw))).task


def running(store: MemoryStore) -> list[Task]:
    return [t for t in store.tasks.values() if t.status == TaskStatus.RUNNING]


async def test_a_key_limit_refuses_the_claim_past_it_and_admits_it_once_a_slot_frees() -> None:
    store = MemoryStore()
    set_limits(store, limit(LimitScope.KEY, DEFAULT_KEY, 2))
    life = lifecycle(store)
    tasks = [await scheduled(life, concurrency_key="partner-1") for _ in range(3)]
    first = await life.claim(tasks[0].task_id, "w1", 0)
    await life.claim(tasks[1].task_id, "w1", 0)
    with pytest.raises(LimitReached, match="ns/key=partner-1"):
        await life.claim(tasks[2].task_id, "w1", 0)
    waiting = store.tasks[tasks[2].task_id]
    assert waiting.status == TaskStatus.SCHEDULED and waiting.attempt == 1 and waiting.lease_token == 0  # no attempt used
    # Another key has its own slots under the default.
    other = await scheduled(life, concurrency_key="partner-2")
    await life.claim(other.task_id, "w1", 0)
    await life.complete(tasks[0].task_id, first.token, b"")
    await life.claim(tasks[2].task_id, "w1", 0)
    assert len([t for t in running(store) if t.concurrency_key == "partner-1"]) == 2


async def test_every_level_must_admit_and_an_override_beats_the_default() -> None:
    store = MemoryStore()
    set_limits(
        store,
        limit(LimitScope.NAMESPACE, "", 3),
        limit(LimitScope.TYPE, "export", 1),
        limit(LimitScope.KEY, DEFAULT_KEY, 1),
        limit(LimitScope.KEY, "big", 5),
    )
    life = lifecycle(store)
    export = [await scheduled(life, type="export", concurrency_key=f"k{i}") for i in range(2)]
    await life.claim(export[0].task_id, "w", 0)
    with pytest.raises(LimitReached, match="ns/type=export"):
        await life.claim(export[1].task_id, "w", 0)
    big = [await scheduled(life, concurrency_key="big") for _ in range(3)]
    await life.claim(big[0].task_id, "w", 0)
    await life.claim(big[1].task_id, "w", 0)  # the override (5), not the default (1)
    with pytest.raises(LimitReached, match="concurrency limit ns \\(3 running\\)"):
        await life.claim(big[2].task_id, "w", 0)  # the namespace's 3 are taken
    # A refused claim keeps no slot of the levels it had passed.
    held = await store.read_slots(SlotGroup("ns", LimitScope.NAMESPACE, "", 3))
    assert sorted(h.task_id for h in held if h.lease_token) == sorted([export[0].task_id, big[0].task_id, big[1].task_id])
    key_slots = await store.read_slots(SlotGroup("ns", LimitScope.KEY, "big", 5))
    assert sum(1 for h in key_slots if h.lease_token) == 2


async def test_every_end_of_an_attempt_gives_its_slot_back() -> None:
    store = MemoryStore()
    set_limits(store, limit(LimitScope.TYPE, "t", 1))
    life = lifecycle(store)
    task = await scheduled(life)
    nxt = await scheduled(life)

    async def cycle(end: str) -> None:
        lease = await life.claim(task.task_id, "w", 0)
        with pytest.raises(LimitReached):
            await life.claim(nxt.task_id, "w", 0)
        if end == "fail":
            await life.fail(task.task_id, lease.token, "boom")
        elif end == "release":
            await life.release(task.task_id, lease.token)
        elif end == "expire":
            now = now_ms() + 10 * 60_000
            await life.expire_lease(store.tasks[task.task_id], now)
        # Given back by the end itself, not left for the next claim to find free.
        assert [h.lease_token for h in await store.read_slots(SlotGroup("ns", LimitScope.TYPE, "t", 1))] == [0], end
        store.tasks[task.task_id] = store.tasks[task.task_id].replace(run_at=now_ms())  # due again now

    for end in ("fail", "release", "expire"):
        await cycle(end)
    lease = await life.claim(nxt.task_id, "w", 0)
    assert lease.token == 1


async def test_a_slot_not_given_back_is_free_once_its_task_no_longer_runs_under_its_token() -> None:
    """The TaskUpdater that claimed died before giving the slot back: the next
    claim that needs it reads the holder's task and takes the slot over."""
    store = MemoryStore()
    set_limits(store, limit(LimitScope.KEY, DEFAULT_KEY, 1))
    claimer, reporter = lifecycle(store), lifecycle(store)  # two processes
    a = await scheduled(claimer, concurrency_key="k")
    b = await scheduled(claimer, concurrency_key="k")
    lease = await claimer.claim(a.task_id, "w", 0)
    with pytest.raises(LimitReached):
        await reporter.claim(b.task_id, "w", 0)
    await reporter.complete(a.task_id, lease.token, b"")  # not the claimer: it does not know the slot
    slot = (await store.read_slots(SlotGroup("ns", LimitScope.KEY, "k", 1)))[0]
    assert slot.task_id == a.task_id and slot.lease_token == lease.token and slot.confirmed  # still held on paper
    await reporter.claim(b.task_id, "w", 0)  # taken over: a no longer runs under that token
    slot = (await store.read_slots(SlotGroup("ns", LimitScope.KEY, "k", 1)))[0]
    assert (slot.task_id, slot.confirmed) == (b.task_id, True)


async def test_an_unconfirmed_slot_is_taken_over_only_after_the_claim_time_and_then_the_late_claim_is_given_back() -> None:
    store = MemoryStore()
    set_limits(store, limit(LimitScope.KEY, DEFAULT_KEY, 1))
    life = lifecycle(store)
    a = await scheduled(life, concurrency_key="k")
    b = await scheduled(life, concurrency_key="k")
    group = SlotGroup("ns", LimitScope.KEY, "k", 1)
    now = now_ms()
    # A claim of a took the slot and has not landed yet (its TaskUpdater is slow).
    in_flight = SlotHolder(index=0, task_id=a.task_id, lease_token=1, taken_at=now, confirmed=False)
    assert await store.take_slot(group, in_flight, None)
    with pytest.raises(LimitReached):
        await life.claim(b.task_id, "w", 0, now=now + SLOT_CLAIM_MS - 1)
    await life.claim(b.task_id, "w", 0, now=now + SLOT_CLAIM_MS)
    # The slow claim lands now: its confirm fails, so it is given back unrun.
    assert not await store.confirm_slot(group, in_flight)
    store.limits = {}  # (the slow claim below goes through the lifecycle with its own slot taking disabled)
    slow = Lifecycle(store, admission=_Stale(store, group, in_flight))
    with pytest.raises(ResourceExhausted, match="concurrency limit slot of task .* was taken over during the claim"):
        await slow.claim(a.task_id, "w", 0)
    again = store.tasks[a.task_id]
    assert again.status == TaskStatus.SCHEDULED and again.attempt == 1  # given back: no attempt used
    assert [t.task_id for t in running(store)] == [b.task_id]


class _Stale(Admission):
    """An admission whose take returns the slot it took long ago (since taken over)."""

    def __init__(self, store: MemoryStore, group: SlotGroup, holder: SlotHolder) -> None:
        super().__init__(store, LimitTable(store, refresh_s=0.0), full_memory_s=0.0)
        self._stale = (group, holder)

    async def take(self, task: Task, token: int, now: int) -> list[Any]:
        from leasesched.admission import Held

        return [Held(*self._stale)]


async def test_a_task_without_limits_takes_no_slot() -> None:
    store = MemoryStore()
    set_limits(store, limit(LimitScope.KEY, DEFAULT_KEY, 1, namespace="other"))
    life = lifecycle(store)
    for _ in range(3):
        await life.claim((await scheduled(life, concurrency_key="k")).task_id, "w", 0)
    assert store.slot_writes == 0 and not any(store.slots.values())


async def test_the_sampler_exports_running_against_the_limit_for_concrete_limits_and_recent_keys() -> None:
    from services.limit_sampler import LimitSampler

    store = MemoryStore()
    set_limits(store, limit(LimitScope.TYPE, "t", 10), limit(LimitScope.KEY, DEFAULT_KEY, 2), limit(LimitScope.KEY, "vip", 4))
    life = lifecycle(store)
    sampler = LimitSampler(store, LimitTable(store, refresh_s=0.0))
    for key in ("p1", "p1", "p2", "vip"):
        task = await scheduled(life, concurrency_key=key)
        sampler.note_key("ns", key)
        await life.claim(task.task_id, "w", 0)
    await sampler.sample()
    got = {(s.scope, s.name): (s.running, s.max_running) for s in sampler.samples()}
    assert got == {("type", "t"): (4, 10), ("key", "vip"): (1, 4), ("key", "p1"): (2, 2), ("key", "p2"): (1, 2)}
    sampler.note_key("other-ns", "p1")  # no default limit there: not sampled
    await sampler.sample()
    assert len(sampler.samples()) == 4


async def test_a_gates_max_in_flight_caps_its_running_tasks_with_slots() -> None:
    from leasesched.gates import Gate

    store = MemoryStore()
    await store.insert_gate(Gate("ns", "api", 100.0, 10, max_in_flight=1))
    await store.insert_gate(Gate("ns", "open", 100.0, 10))
    life = lifecycle(store)
    first, second = await scheduled(life, gate="api"), await scheduled(life, gate="api")
    lease = await life.claim(first.task_id, "w", 0)
    with pytest.raises(LimitReached, match="ns/gate=api \\(1 running\\)"):
        await life.claim(second.task_id, "w", 0)
    for _ in range(3):  # a gate without a cap takes no slot
        await life.claim((await scheduled(life, gate="open")).task_id, "w", 0)
    await life.complete(first.task_id, lease.token, b"")
    await life.claim(second.task_id, "w", 0)


def test_a_gates_max_in_flight_out_of_range_is_refused_naming_it() -> None:
    from leasesched.errors import InvalidArgument
    from leasesched.v1 import scheduler_pb2 as pb
    from services.gate_service import _definition

    assert _definition(pb.GateDefinition(rate=1.0, burst=1, max_in_flight=1000))[3] == 1000
    for bad in (-1, 1001):
        with pytest.raises(InvalidArgument, match="definition.max_in_flight must be between 0 \\(no cap\\) and 1000"):
            _definition(pb.GateDefinition(rate=1.0, burst=1, max_in_flight=bad))


async def test_a_claim_never_waits_for_a_re_read_of_the_limits() -> None:
    """While a node is frozen a read can take the store's whole deadline: only
    the first read of the table is waited for, later ones run beside the claims."""
    import asyncio

    class SlowLimits(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.reads_of_limits = 0
            self.release = asyncio.Event()

        async def list_limits(self, namespace: str | None) -> list[ConcurrencyLimit]:
            self.reads_of_limits += 1
            if self.reads_of_limits > 1:
                await self.release.wait()  # every re-read hangs
            return await super().list_limits(namespace)

    store = SlowLimits()
    set_limits(store, limit(LimitScope.KEY, DEFAULT_KEY, 5))
    life = lifecycle(store)  # refresh_s 0: every claim would re-read
    for _ in range(3):
        task = await scheduled(life, concurrency_key="k")
        await asyncio.wait_for(life.claim(task.task_id, "w", 0), timeout=2.0)
    assert store.reads_of_limits == 2  # the first read, and one re-read under way (not one per claim)
    assert sum(1 for h in await store.read_slots(SlotGroup("ns", LimitScope.KEY, "k", 5)) if h.lease_token) == 3
    store.release.set()
