"""A schedule's action with a ``concurrency_key`` and a ``gate`` (issue 15), over
the in-memory store: checked by ScheduleTask's rules and named as the request
names them, a gate that does not exist refused as ScheduleTask refuses it,
stored with the schedule (old documents without them still load), shown by
DescribeSchedule, and carried by every task the schedule fires (a regular
slot, a catch-up, a run now, a backfill) on every way it reaches a trigger:
the row, the creation hint, the firer's direct hand-over. Against real
processes: tests/integration/test_schedules.py."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Sequence

import pytest

from leasesched.config import Config
from leasesched.errors import FailedPrecondition, InvalidArgument
from leasesched.firing import Firing, decide, trigger_now
from leasesched.gates import Gate
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, RetryPolicy, Task, Timeouts, now_ms
from leasesched.schedule_spec import ScheduleSpec
from leasesched.schedules import Backfill, Cause, Overlap, Schedule, SchedulePolicy, ScheduleState, TaskTemplate
from leasesched.server.schedule_validation import action_from_pb
from leasesched.store.memory import MemoryStore
from leasesched.store.schedule_codec import dump_definition, load_definition
from leasesched.v1 import scheduler_pb2 as pb
from services.due_notifier import DueNotifier
from services.schedule_service import ScheduleService
from tests.unit.waiting import wait_until
from trigger.schedule_firer import ScheduleFirer

S = 1000
T0 = 1_800_000_000_000  # a whole second
KEY, GATE = "partner-7", "stripe"


# ---------------------------------------------------------------- validation


def test_an_action_keeps_its_key_and_gate_and_empty_means_none() -> None:
    action = action_from_pb(pb.TaskSpec(type="t", concurrency_key=KEY, gate=GATE), "ns", Config(), T0)
    assert (action.concurrency_key, action.gate) == (KEY, GATE)
    plain = action_from_pb(pb.TaskSpec(type="t"), "ns", Config(), T0)
    assert (plain.concurrency_key, plain.gate) == ("", "")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("concurrency_key", "a b"), ("concurrency_key", "-lead"), ("concurrency_key", "k" * 65), ("concurrency_key", "a/b"),
        ("gate", "bad name"), ("gate", "-x"), ("gate", "g" * 129),
    ],
)  # fmt: skip
def test_a_bad_key_or_gate_is_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"^schedule\.action\.{field} "):
        action_from_pb(pb.TaskSpec(type="t", **{field: value}), "ns", Config(), T0)


def test_the_actions_other_fields_are_named_the_same_way() -> None:
    with pytest.raises(InvalidArgument, match=r"^schedule\.action\.type is required"):
        action_from_pb(pb.TaskSpec(), "ns", Config(), T0)
    with pytest.raises(InvalidArgument, match=r"^schedule\.action\.namespace"):
        action_from_pb(pb.TaskSpec(type="t", namespace="other"), "ns", Config(), T0)


# ---------------------------------------------------------------- the stored document


def test_every_field_of_the_action_survives_the_codec() -> None:
    """Each field set to a value other than its default: a field added to
    TaskTemplate without a line in the codec (or here) fails."""
    action = TaskTemplate(
        type="t", payload=b"\x00p", priority=9, retry=RetryPolicy(maximum_attempts=7), timeouts=Timeouts(start_to_close_ms=5),
        lease_ms=45_000, concurrency_key=KEY, gate=GATE,
    )  # fmt: skip
    defaults = TaskTemplate(type="")
    assert [f.name for f in dataclasses.fields(TaskTemplate) if getattr(action, f.name) == getattr(defaults, f.name)] == []
    spec, policy = ScheduleSpec(every_ms=10 * S), SchedulePolicy()
    assert load_definition(dump_definition(spec, action, policy)) == (spec, action, policy)


def test_a_document_stored_before_keys_and_gates_reads_as_without_them() -> None:
    spec, policy = ScheduleSpec(every_ms=10 * S), SchedulePolicy()
    old = json.loads(dump_definition(spec, TaskTemplate(type="t", priority=2), policy))
    del old["action"]["concurrency_key"], old["action"]["gate"]
    _, action, _ = load_definition(json.dumps(old))
    assert action == TaskTemplate(type="t", priority=2)


# ---------------------------------------------------------------- ScheduleService


def schedule_pb(schedule_id: str = "s1", **action: Any) -> pb.Schedule:
    s = pb.Schedule(namespace="ns", schedule_id=schedule_id, action=pb.TaskSpec(type="t", **action))
    s.spec.every.FromSeconds(3600)
    return s


async def test_a_gate_that_does_not_exist_is_refused_and_describe_shows_key_and_gate(store: MemoryStore) -> None:
    service: Any = ScheduleService(Config(), Lifecycle(store), shards=8)
    with pytest.raises(FailedPrecondition, match=rf"schedule\.action\.gate '{GATE}' does not exist"):
        await service.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule_pb(concurrency_key=KEY, gate=GATE)), None)
    assert await store.get_schedule("ns", "s1") is None  # nothing written
    await store.insert_gate(Gate("ns", GATE, rate=5, burst=5))
    made = (await service.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule_pb(concurrency_key=KEY, gate=GATE)), None)).schedule
    assert (made.schedule.action.concurrency_key, made.schedule.action.gate) == (KEY, GATE)
    ref = pb.ScheduleRef(namespace="ns", schedule_id="s1")
    shown = (await service.DescribeSchedule(pb.DescribeScheduleRequest(ref=ref), None)).schedule.schedule.action
    assert (shown.concurrency_key, shown.gate) == (KEY, GATE)
    # A retried create is the same definition (key and gate count): the same answer.
    again = (await service.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule_pb(concurrency_key=KEY, gate=GATE)), None)).schedule
    assert again.version == made.version
    # An update naming a gate that does not exist changes nothing; one without them clears them.
    with pytest.raises(FailedPrecondition, match=r"schedule\.action\.gate 'nope'"):
        await service.UpdateSchedule(pb.UpdateScheduleRequest(schedule=schedule_pb(gate="nope")), None)
    stored = await store.get_schedule("ns", "s1")
    assert stored is not None and (stored.action.concurrency_key, stored.action.gate) == (KEY, GATE)
    await service.UpdateSchedule(pb.UpdateScheduleRequest(schedule=schedule_pb()), None)
    stored = await store.get_schedule("ns", "s1")
    assert stored is not None and (stored.action.concurrency_key, stored.action.gate) == ("", "")


async def test_a_run_now_is_hinted_to_its_trigger_with_key_and_gate(store: MemoryStore) -> None:
    """The creation hint (NotifyDueRequest) of a schedule's run carries both,
    so the trigger queues and gates it without a read."""
    notifier = DueNotifier(None, Config())  # type: ignore[arg-type]
    sent: list[pb.NotifyDueRequest] = []

    async def send(address: str, hints: Sequence[pb.NotifyDueRequest], timeout: float) -> None:
        sent.extend(hints)

    notifier._send = send  # type: ignore[method-assign]
    service: Any = ScheduleService(Config(), Lifecycle(store), shards=8, notify_due=notifier)
    await store.insert_gate(Gate("ns", GATE, rate=5, burst=5))
    made = (await service.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule_pb(concurrency_key=KEY, gate=GATE)), None)).schedule
    stored = await store.get_schedule("ns", "s1")
    assert stored is not None
    notifier._owner_of = {stored.shard: "trigger:1"}
    ran = await service.TriggerSchedule(pb.TriggerScheduleRequest(ref=pb.ScheduleRef(namespace="ns", schedule_id="s1")), None)
    assert ran.outcome == "started" and made.schedule.action.gate == GATE
    await wait_until(lambda: sent)
    assert (sent[0].task_id, sent[0].concurrency_key, sent[0].gate) == (ran.task_id, KEY, GATE)
    task = store.tasks[uuid.UUID(ran.task_id)]
    assert (task.concurrency_key, task.gate) == (KEY, GATE)


# ---------------------------------------------------------------- firing


def keyed(next_slot_ms: int = T0) -> Schedule:
    return Schedule(
        namespace="ns", schedule_id="s", uid=uuid.UUID(int=7), shard=3, spec=ScheduleSpec(every_ms=10 * S),
        action=TaskTemplate(type="t", concurrency_key=KEY, gate=GATE),
        policy=SchedulePolicy(overlap=Overlap.ALLOW_ALL), state=ScheduleState(next_slot_ms=next_slot_ms),
    )  # fmt: skip


async def test_every_kind_of_run_carries_the_key_and_gate(store: MemoryStore) -> None:
    await store.insert_schedule(keyed())
    firing = Firing(store, Lifecycle(store))
    backfill = Backfill(T0 - 30 * S, T0 - 1)
    await firing.evaluate("ns", "s", decider=lambda s, st, t: decide(s, st.replace(backfills=(backfill,)), t), now=T0 - 2)
    await firing.evaluate("ns", "s", decider=lambda s, st, t: trigger_now(s, st, t, None), now=T0 - 1)
    await firing.evaluate("ns", "s", now=T0 + 1)  # the slot, on time
    await firing.evaluate("ns", "s", now=T0 + 60 * S)  # the next slot, 50 s late: a catch-up
    stored = await store.get_schedule("ns", "s")
    assert stored is not None
    assert {r.cause for r in stored.state.recent} == {Cause.BACKFILL, Cause.TRIGGER, Cause.SCHEDULE, Cause.CATCHUP}
    tasks = [store.tasks[r.task_id] for r in stored.state.recent]
    assert [(t.concurrency_key, t.gate) for t in tasks] == [(KEY, GATE)] * 4


class Handed:
    """The scanner's side of ScheduleFirer: what it was handed."""

    def __init__(self) -> None:
        self.offered: list[tuple[uuid.UUID, str, str]] = []

    def offer_created(self, entry: DueEntry, namespace: str, run_at: int, group: str = "", gate: str = "") -> None:
        self.offered.append((entry.task_id, group, gate))

    def notify_entry(self, entry: DueEntry) -> None:
        pass


async def test_the_firer_hands_a_due_run_to_its_dispatcher_with_key_and_gate(store: MemoryStore) -> None:
    """A slot's task is dispatched by the trigger that fired it without a read:
    the key (fair-share group) and gate must go with it, or the gate is skipped."""
    schedule = keyed(next_slot_ms=now_ms() // (10 * S) * (10 * S))  # the slot of the spec that came last
    await store.insert_schedule(schedule)
    scanner = Handed()
    await ScheduleFirer(Lifecycle(store), catchup_rate=100).handle(
        DueEntry(shard=3, due_at=0, task_id=schedule.uid, kind=DueEntry.SCHEDULE, ref="ns/s"), scanner
    )
    fired: list[Task] = [t for t in store.tasks.values() if t.schedule_id == "s"]
    assert len(fired) == 1
    assert scanner.offered == [(fired[0].task_id, KEY, GATE)]
