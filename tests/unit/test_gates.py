"""Gates (docs/gates.md): the GCRA and warm-up arithmetic on a fake clock, the
lifecycle's "rate limited" path, the trigger's gate keeper and the
GateService, over the in-memory store. The same paths run against real
Cassandra and ZooKeeper in tests/integration/test_gates.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from leasesched import gates
from leasesched.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from leasesched.gates import Gate, GateState
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, Task, now_ms
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.config import Config
from services.gate_service import GateBook, GateService, waiting_reason
from services.task_updater import TaskUpdater
from tests.unit.waiting import wait_until
from tests.unit.test_execution_stop import FakeUpdater, Harness, harness  # noqa: F401 - the fixture
from worker.handlers import RateLimited, TaskContext
from trigger.dispatcher import Dispatcher, Ready, WorkerLink
from trigger.gates import GateKeeper

S = 1_000_000  # µs


def gate(rate: float = 5.0, burst: int = 5, warmup_s: float = 0.0, **kw: Any) -> Gate:
    return Gate("ns", "api", rate, burst, int(warmup_s * 1000), **kw)


def take(g: Gate, at_us: int, wanted: int) -> tuple[Gate, int]:
    """One reservation as a trigger makes it (the store's write applied)."""
    r = gates.reserve(g, at_us, wanted)
    if r.granted:
        g = g.replace(tat_us=r.tat_us, ramp_from_ms=r.ramp_from_ms)
    return g, r.granted


def grants_over(g: Gate, start_us: int, seconds: float, step_us: int, batch: int) -> tuple[Gate, list[int]]:
    """Ask for ``batch`` tokens every ``step_us`` for ``seconds``; the time of each token taken."""
    times: list[int] = []
    t = start_us
    while t < start_us + seconds * S:
        g, n = take(g, t, batch)
        times += [t] * n
        t += step_us
    return g, times


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most of the sorted ``times`` in any half-open window of that length
    (also used by the integration test on real start times)."""
    best, lo = 0, 0
    for hi in range(len(times)):
        while times[hi] - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# ------------------------------------------------------------------ GCRA arithmetic


def test_a_full_bucket_gives_the_burst_then_one_token_per_interval() -> None:
    g = gate(rate=5, burst=5).replace(tat_us=1)  # used long ago: full
    g, n = take(g, 100 * S, 10)
    assert n == 5  # the burst, not the 10 asked for
    g, n = take(g, 100 * S, 1)
    assert n == 0
    r = gates.reserve(g, 100 * S, 1)
    assert r.wait_us == pytest.approx(0.2 * S, abs=2)  # one token every 1/rate
    g, n = take(g, 100 * S + r.wait_us, 1)
    assert n == 1


@pytest.mark.parametrize("rate,burst,batch", [(5, 5, 1), (5, 5, 3), (20, 1, 10), (0.5, 2, 2), (100, 30, 10)])
def test_no_window_gets_more_than_rate_times_window_plus_burst(rate: float, burst: int, batch: int) -> None:
    g = gate(rate=rate, burst=burst).replace(tat_us=1)
    g, times = grants_over(g, 50 * S, 30, step_us=7_001, batch=batch)
    assert len(times) >= rate * 30 * 0.85  # and the rate is reached (less the polling's lateness at burst 1)
    for window_s in (0.1, 0.5, 1, 3, 10):
        assert max_in_window(times, int(window_s * S)) <= rate * window_s + burst, window_s


def test_two_takers_sharing_the_row_share_one_rate() -> None:
    """Two triggers alternating on one row (each reads what the other wrote): the rate is the gate's, not twice it."""
    g = gate(rate=10, burst=2).replace(tat_us=1)
    times: list[int] = []
    t = 10 * S
    while t < 20 * S:
        for _ in range(2):  # two takers per step
            g, n = take(g, t, 5)
            times += [t] * n
        t += 3_000
    assert len(times) <= 10 * 10 + 2
    assert max_in_window(times, S) <= 10 + 2


def test_the_warm_up_ramps_from_ten_percent_to_the_whole_rate() -> None:
    g = gate(rate=10, burst=10, warmup_s=10, ramp_from_ms=100_000, tat_us=100 * S)  # unpaused at t=100 s
    assert gates.ramp_factor(g, 100_000) == pytest.approx(0.1)
    assert gates.ramp_factor(g, 105_000) == pytest.approx(0.55)
    assert gates.ramp_factor(g, 110_000) == 1.0
    g, times = grants_over(g, 100 * S, 10, step_us=10_000, batch=10)
    first_second = sum(1 for t in times if t < 101 * S)
    assert first_second <= 3  # ~1/s and a burst of 1 at 10 %, not the 10 + 10 of a full gate
    assert 40 <= len(times) <= 70  # ∫ 10 × (0.1 + 0.09 t) dt over 10 s = 55, plus the ramped burst
    g, later = grants_over(g, 110 * S, 5, step_us=10_000, batch=10)
    assert len(later) >= 48  # the whole rate after the ramp


def test_a_long_idle_starts_a_new_ramp_and_a_short_one_does_not() -> None:
    g = gate(rate=10, burst=10, warmup_s=5).replace(tat_us=100 * S, ramp_from_ms=1)
    g, _ = take(g, 102 * S, 1)  # idle 2 s < warm-up: no new ramp
    assert g.ramp_from_ms == 1
    g, n = take(g, 200 * S, 10)  # idle ~98 s: ramp from now
    assert g.ramp_from_ms == 200_000 and n == 1


def test_a_new_gate_ramps_and_without_warm_up_none_does() -> None:
    assert take(gate(rate=10, burst=10, warmup_s=5), 7 * S, 10)[1] == 1
    assert take(gate(rate=10, burst=10), 7 * S, 10)[1] == 10


def test_paused_and_closed_gates_show_no_token() -> None:
    g = gate().replace(tat_us=1)
    assert g.state(5000) == GateState.OPEN and gates.available(g, 5 * S) == pytest.approx(5)
    assert g.replace(paused=True).state(5000) == GateState.PAUSED
    assert gates.available(g.replace(paused=True), 5 * S) == 0
    closed = g.replace(closed_until_ms=6000)
    assert closed.state(5000) == GateState.CLOSED and gates.available(closed, 5 * S) == 0
    assert closed.state(6000) == GateState.OPEN


@pytest.mark.parametrize(
    "rate,burst,warmup_ms,field",
    [(0, 1, 0, "rate"), (-1, 1, 0, "rate"), (float("nan"), 1, 0, "rate"), (1, 0, 0, "burst"), (1, 1, -5, "warmup")],
)
def test_a_bad_definition_names_its_field(rate: float, burst: int, warmup_ms: int, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        gates.check_definition(rate, burst, warmup_ms)


# ------------------------------------------------------------------ lifecycle: rate limited


def new_task(**kw: Any) -> Task:
    now = now_ms()
    base: dict[str, Any] = dict(
        task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=1, created_at=now, run_at=now, first_run_at=now
    )
    base.update(kw)
    return Task(**base)


async def test_rate_limited_closes_the_gate_and_charges_no_attempt(store: MemoryStore, life: Lifecycle) -> None:
    await store.insert_gate(gate())
    task = (await life.schedule(new_task(gate="api"))).task
    lease = await life.claim(task.task_id, "w1", 1)
    before = now_ms()
    outcome = await life.rate_limited(task.task_id, lease.token, 5000, "HTTP 429 from api", "HTTP429")
    after = now_ms()
    stored = await life.get(task.task_id)
    assert outcome.status == TaskStatus.SCHEDULED and stored.status == TaskStatus.SCHEDULED
    assert stored.attempt == 1  # not charged
    assert before + 5000 <= stored.run_at <= after + 5000 and outcome.next_run_at == stored.run_at
    assert stored.error_type == "HTTP429"
    closed = await store.get_gate("ns", "api")
    assert closed is not None and closed.closed_until_ms == stored.run_at
    # The task is due again then, as the same attempt under the token it has now.
    entry = DueEntry(task.shard, stored.run_at, task.task_id, DueEntry.RUN, 1, task.priority, "t", lease.token)
    assert entry in store.due
    # A second, shorter close never opens the gate earlier.
    lease2 = await life.claim(task.task_id, "w1", 1, now=stored.run_at)
    await life.rate_limited(task.task_id, lease2.token, 10, "again")
    assert (await store.get_gate("ns", "api")).closed_until_ms == stored.run_at  # type: ignore[union-attr]
    assert (await life.get(task.task_id)).attempt == 1


async def test_rate_limited_without_a_gate_is_a_retry_after_failure(life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    outcome = await life.rate_limited(task.task_id, lease.token, 3000, "429")
    stored = await life.get(task.task_id)
    assert outcome.status == TaskStatus.SCHEDULED and stored.attempt == 2  # an attempt used: nothing bounds it else


async def test_rate_limited_past_the_deadline_fails_the_task(store: MemoryStore, life: Lifecycle) -> None:
    await store.insert_gate(gate())
    now = now_ms()
    task = (await life.schedule(new_task(gate="api", deadline_at=now + 2000))).task
    lease = await life.claim(task.task_id, "w1", 1)
    outcome = await life.rate_limited(task.task_id, lease.token, 5000, "429")
    assert outcome.status == TaskStatus.FAILED
    assert (await store.get_gate("ns", "api")).closed_until_ms == 0  # type: ignore[union-attr]


async def test_a_store_failure_while_closing_changes_nothing(store: MemoryStore, life: Lifecycle) -> None:
    from leasesched.errors import Unavailable

    await store.insert_gate(gate())
    task = (await life.schedule(new_task(gate="api"))).task
    lease = await life.claim(task.task_id, "w1", 1)
    store.fail_next.add("close_gate")
    with pytest.raises(Unavailable):
        await life.rate_limited(task.task_id, lease.token, 5000, "429")
    assert (await life.get(task.task_id)).status == TaskStatus.RUNNING  # the worker retries its report


# ------------------------------------------------------------------ the trigger's gate keeper


class Recording(Dispatcher):
    """A dispatcher that notes when each task went to a worker."""

    def __init__(self) -> None:
        super().__init__(60.0, self._never)
        self.sent: list[tuple[float, Ready]] = []

    @staticmethod
    async def _never(ready: Ready) -> bool:
        return False

    def _send(self, link: WorkerLink, ready: Ready) -> None:
        self.sent.append((time.monotonic(), ready))
        super()._send(link, ready)
        link.credits += 1  # the worker takes it at once and has the slot again

    def offer_new(self, gate_name: str = "api", type_: str = "t") -> Ready:
        ready = self.make_ready(uuid.uuid4(), "ns", type_, 1, 0, 5, now_ms(), 0, on_done=lambda: None, gate=gate_name)
        self.offer(ready)
        return ready


async def test_two_triggers_together_keep_the_gates_rate(store: MemoryStore) -> None:
    await store.insert_gate(gate(rate=20, burst=4).replace(tat_us=1))
    writes_before = store.gate_writes
    triggers = [Recording(), Recording()]
    keepers = [GateKeeper(store, d, batch=3) for d in triggers]
    for d in triggers:
        d.connect("w", "ns", frozenset({"t"}), 8)
        for _ in range(60):
            d.offer_new()
    await asyncio.sleep(2.0)
    for k in keepers:
        k.stop()
    times = sorted(t for d in triggers for t, _ in d.sent)
    assert 36 <= len(times) <= 20 * 2.0 + 4 + 2, len(times)
    assert max_in_window([int(t * S) for t in times], S) <= 20 + 4 + 1
    assert all(d.sent for d in triggers)  # both took tokens
    # One conditional write per batch, plus the writes lost to the other trigger (each then reads again).
    writes = store.gate_writes - writes_before
    assert sum(k.reservations for k in keepers) <= len(times)
    assert writes == sum(k.reservations + k.conflicts for k in keepers)
    assert sum(k.conflicts for k in keepers) <= len(times)


async def test_tasks_without_a_gate_never_touch_the_store(store: MemoryStore) -> None:
    d = Recording()
    GateKeeper(store, d)
    d.connect("w", "ns", frozenset({"t"}), 8)
    d.offer_new(gate_name="")
    assert len(d.sent) == 1 and store.gate_writes == 0


async def test_a_paused_gate_holds_its_tasks_until_unpaused(store: MemoryStore) -> None:
    await store.insert_gate(gate(rate=100, burst=10, paused=True))
    d = Recording()
    keeper = GateKeeper(store, d, refresh_s=0.1)
    d.connect("w", "ns", frozenset({"t"}), 8)
    for _ in range(5):
        d.offer_new()
    await asyncio.sleep(0.4)
    assert d.sent == [] and d.stats()["gated"] == 5
    current = await store.get_gate("ns", "api")
    assert current is not None
    await store.update_gate(current.replace(paused=False, version=current.version + 1), current)
    await wait_until(lambda: len(d.sent) == 5, timeout_s=5)
    keeper.stop()


async def test_tokens_wait_for_a_free_slot(store: MemoryStore) -> None:
    """No token is taken for a task no worker can run: it would be spent, or start as a flood later."""
    await store.insert_gate(gate(rate=100, burst=100).replace(tat_us=1))
    writes_before = store.gate_writes
    d = Recording()
    keeper = GateKeeper(store, d, refresh_s=0.1)
    for _ in range(5):
        d.offer_new()
    await asyncio.sleep(0.3)
    assert store.gate_writes == writes_before and d.sent == []
    d.connect("w", "ns", frozenset({"t"}), 8)
    await wait_until(lambda: len(d.sent) == 5, timeout_s=5)
    keeper.stop()


async def test_a_closed_gate_holds_its_tasks_until_the_time(store: MemoryStore) -> None:
    started = time.monotonic()
    until = now_ms() + 600
    await store.insert_gate(gate(rate=100, burst=10).replace(tat_us=1, closed_until_ms=until))
    d = Recording()
    keeper = GateKeeper(store, d, refresh_s=0.1)
    d.connect("w", "ns", frozenset({"t"}), 8)
    for _ in range(3):
        d.offer_new()
    await wait_until(lambda: len(d.sent) == 3, timeout_s=5)
    keeper.stop()
    assert min(t for t, _ in d.sent) >= started + 0.55  # none before the close ended


# ------------------------------------------------------------------ GateService, TaskService's check


async def test_set_gate_refuses_bad_input_naming_the_field(store: MemoryStore) -> None:
    service = GateService(store)
    ref = pb.GateRef(namespace="ns", name="api")
    for definition, field in [
        (pb.GateDefinition(rate=0, burst=1), "definition.rate"),
        (pb.GateDefinition(rate=1, burst=0), "definition.burst"),
    ]:
        with pytest.raises(InvalidArgument, match=field):
            await service.SetGate(pb.SetGateRequest(gate=ref, definition=definition), None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="gate.name"):
        await service.SetGate(pb.SetGateRequest(gate=pb.GateRef(namespace="ns", name="bad name"),
                                                definition=pb.GateDefinition(rate=1, burst=1)), None)  # type: ignore[arg-type]  # fmt: skip


async def test_set_pause_unpause_delete(store: MemoryStore) -> None:
    service: Any = GateService(store)
    ref = pb.GateRef(namespace="ns", name="api")
    made = (await service.SetGate(pb.SetGateRequest(gate=ref, definition=pb.GateDefinition(rate=5, burst=5)), None)).gate
    assert made.version == 1 and made.state == "open"
    with pytest.raises(AlreadyExists):
        await service.SetGate(pb.SetGateRequest(gate=ref, definition=pb.GateDefinition(rate=5, burst=5)), None)
    with pytest.raises(FailedPrecondition, match="version"):
        await service.SetGate(pb.SetGateRequest(gate=ref, definition=pb.GateDefinition(rate=9, burst=5), expected_version=7), None)
    changed = (await service.SetGate(pb.SetGateRequest(gate=ref, definition=pb.GateDefinition(rate=9, burst=5), expected_version=1), None)).gate
    assert changed.definition.rate == 9 and changed.version == 2
    assert (await service.PauseGate(pb.PauseGateRequest(gate=ref), None)).gate.state == "paused"
    await store.close_gate("ns", "api", now_ms() + 60_000)
    opened = (await service.UnpauseGate(pb.UnpauseGateRequest(gate=ref), None)).gate
    assert opened.state == "open" and not opened.HasField("closed_until")  # an unpause opens a closed gate too
    listed = (await service.ListGates(pb.ListGatesRequest(namespace="ns"), None)).gates
    assert [g.name for g in listed] == ["api"]
    await service.DeleteGate(pb.DeleteGateRequest(gate=ref), None)
    assert await store.get_gate("ns", "api") is None


async def test_a_task_naming_an_unknown_gate_is_refused_naming_it(store: MemoryStore) -> None:
    book = GateBook(store)
    with pytest.raises(FailedPrecondition, match="task.gate 'nope'"):
        await book.require("ns", "nope")
    await store.insert_gate(gate())
    await book.require("ns", "api")


def test_waiting_reason_says_why() -> None:
    now = 10_000
    assert "paused" in waiting_reason(gate(paused=True), "api", now)
    assert "closed until" in waiting_reason(gate(closed_until_ms=now + 1), "api", now)
    assert "does not exist" in waiting_reason(None, "api", now)
    assert waiting_reason(gate(), "api", now) == ""


# ------------------------------------------------------------------ the report: worker and TaskUpdater


async def test_the_worker_reports_a_handlers_rate_limit(harness: Harness) -> None:
    async def handler(ctx: TaskContext) -> bytes:
        raise RateLimited(retry_after=4, message="HTTP 429 from api")

    updater = FakeUpdater(lease_s=30)
    await harness.execution(handler, updater, mode="async").run()
    (_, method, request), = updater.reports()
    assert method == "FailTask" and request.rate_limited and not request.non_retryable
    assert request.retry_after.ToMilliseconds() == 4000 and request.error_type == "RateLimited"


def test_rate_limited_needs_a_positive_wait() -> None:
    with pytest.raises(ValueError, match="retry_after > 0"):
        RateLimited(0)


async def test_the_task_updater_closes_the_gate_on_a_rate_limited_report(store: MemoryStore, life: Lifecycle) -> None:
    updater = TaskUpdater(Config(), life)
    await store.insert_gate(gate())
    task = (await life.schedule(new_task(gate="api"))).task
    token = (await life.claim(task.task_id, "w", 1)).token
    request = pb.FailTaskRequest(task_id=str(task.task_id), lease_token=token, error="429", rate_limited=True)
    with pytest.raises(InvalidArgument, match="retry_after"):
        await updater.FailTask(request, None)  # type: ignore[arg-type]
    request.retry_after.FromMilliseconds(3000)
    reply = await updater.FailTask(request, None)  # type: ignore[arg-type]
    stored = await life.get(task.task_id)
    assert reply.status == pb.SCHEDULED and stored.attempt == 1 and stored.error_type == "RateLimited"
    assert (await store.get_gate("ns", "api")).closed_until_ms == reply.next_run_at.ToMilliseconds()  # type: ignore[union-attr]
