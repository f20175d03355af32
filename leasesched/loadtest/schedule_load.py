"""Periodic schedules as load (``leasesched loadtest --schedules N --every S``).

The harness creates N interval schedules before the load phase and judges
afterwards, from what the cluster answers, whether every slot got exactly
one task. This module is the pure part of that: which schedules, which slots
each must fire, and the counting over the tasks found. The runner does the
RPCs; the report and the table print what ``count_slots`` and
``schedule_section`` return.

Why the window is given by ``start_at`` / ``end_at`` and not by pausing the
schedules when the load ends: a PauseSchedule that reaches a schedule before
the trigger has fired a slot that is already due turns that slot into a
skipped one ("paused"), so "expected up to the pause" would depend on the
firing lag being measured. With both ends in the spec, the expected slots are
exactly ``spec.slots(start - 1, end)``, computed by the same ``ScheduleSpec``
the server fires from, and the system must fire every one of them however
late it is.

Why the harness counts duplicates itself, although a slot's task id is derived
from (schedule uid, slot) and so cannot repeat: the check must not assume
what it checks. Tasks are grouped by what they say they are
(``schedule_id``, ``nominal_time``), not by their id, and two different ids
for one slot are a duplicate; the same task listed twice (ListTasks paging)
is not.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from leasesched.loadtest.metrics import percentiles
from leasesched.schedule_spec import ScheduleSpec
from leasesched.schedules import Overlap
from leasesched.server.schedule_validation import OVERLAP_TO_PB
from leasesched.v1 import scheduler_pb2 as pb

ID_PREFIX = "load-"
EXAMPLES = 10  # examples of each kind of failure kept in the report


@dataclass(frozen=True)
class SchedulePlan:
    """The N schedules of one run: ``load-<i>``, every ``every_ms``, with
    offsets spread evenly over the period (so the slots of all N are not one
    burst per period), each firing the slots in [start_ms, end_ms]."""

    count: int
    every_ms: int
    start_ms: int
    end_ms: int  # inclusive, like the spec's end_at
    jitter_ms: int = 0
    overlap: Overlap = Overlap.ALLOW_ALL

    def schedule_id(self, i: int) -> str:
        return f"{ID_PREFIX}{i}"

    def offset_ms(self, i: int) -> int:
        return (i * self.every_ms) // self.count

    def spec(self, i: int) -> ScheduleSpec:
        return ScheduleSpec(every_ms=self.every_ms, offset_ms=self.offset_ms(i), start_at_ms=self.start_ms,
                            end_at_ms=self.end_ms, jitter_ms=self.jitter_ms)  # fmt: skip

    def expected(self) -> dict[str, list[int]]:
        """Schedule id → every slot it must fire (the server's own slot arithmetic)."""
        limit = (self.end_ms - self.start_ms) // self.every_ms + 2
        return {self.schedule_id(i): self.spec(i).slots(self.start_ms - 1, self.end_ms, limit) for i in range(self.count)}

    def last_due_ms(self) -> int:
        """When the last expected task is due at the latest (its slot plus the largest jitter)."""
        return self.end_ms + self.jitter_ms

    def to_pb(self, i: int, namespace: str, task_type: str, payload: bytes) -> pb.Schedule:
        spec = pb.ScheduleSpec()
        spec.every.FromMilliseconds(self.every_ms)
        spec.offset.FromMilliseconds(self.offset_ms(i))
        spec.start_at.FromMilliseconds(self.start_ms)
        spec.end_at.FromMilliseconds(self.end_ms)
        if self.jitter_ms:
            spec.jitter.FromMilliseconds(self.jitter_ms)
        return pb.Schedule(
            namespace=namespace, schedule_id=self.schedule_id(i), spec=spec,
            action=pb.TaskSpec(namespace=namespace, type=task_type, payload=payload),
            policy=pb.SchedulePolicy(overlap=OVERLAP_TO_PB[self.overlap]),
        )  # fmt: skip


@dataclass(frozen=True)
class SlotTask:
    """What the harness needs of one task a schedule created (from its TaskView)."""

    task_id: str
    schedule_id: str
    nominal_ms: int
    run_at_ms: int
    created_at_ms: int
    started_at_ms: int | None
    status: int  # pb.TaskStatus

    @classmethod
    def from_view(cls, view: pb.TaskView) -> "SlotTask | None":
        """None for a task no schedule created."""
        if not view.schedule_id or not view.HasField("nominal_time"):
            return None
        return cls(
            task_id=view.task_id, schedule_id=view.schedule_id, nominal_ms=view.nominal_time.ToMilliseconds(),
            run_at_ms=view.run_at.ToMilliseconds(), created_at_ms=view.created_at.ToMilliseconds(),
            started_at_ms=view.started_at.ToMilliseconds() if view.HasField("started_at") else None, status=view.status,
        )  # fmt: skip


@dataclass
class SlotCount:
    """Expected slots against the tasks found."""

    expected: int = 0
    tasks: int = 0  # distinct tasks found for the run's schedules
    slots_with_task: int = 0  # expected slots that have at least one task
    duplicates: int = 0  # tasks beyond the first at one (schedule_id, nominal_time)
    missed: int = 0  # expected slots without a task
    unexpected: int = 0  # tasks at a slot that was not expected (outside the window, or not a slot of the spec)
    duplicate_examples: list[str] = field(default_factory=list)
    missed_examples: list[str] = field(default_factory=list)
    unexpected_examples: list[str] = field(default_factory=list)


def count_slots(expected: Mapping[str, Iterable[int]], found: Iterable[SlotTask]) -> SlotCount:
    """Duplicates, missed and unexpected slots. Tasks of schedules not in
    ``expected`` are ignored (another run's, or the user's)."""
    by_slot: dict[tuple[str, int], set[str]] = defaultdict(set)
    for task in found:
        if task.schedule_id in expected:
            by_slot[(task.schedule_id, task.nominal_ms)].add(task.task_id)
    out = SlotCount()
    wanted: set[tuple[str, int]] = set()
    for schedule_id, slots in expected.items():
        for slot in slots:
            wanted.add((schedule_id, slot))
    out.expected = len(wanted)
    for key in sorted(wanted):
        if key in by_slot:
            out.slots_with_task += 1
        else:
            out.missed += 1
            if len(out.missed_examples) < EXAMPLES:
                out.missed_examples.append(f"{key[0]} slot {key[1]}")
    for key, ids in sorted(by_slot.items()):
        out.tasks += len(ids)
        if len(ids) > 1:
            out.duplicates += len(ids) - 1
            if len(out.duplicate_examples) < EXAMPLES:
                out.duplicate_examples.append(f"{key[0]} slot {key[1]}: tasks {sorted(ids)}")
        if key not in wanted:
            out.unexpected += len(ids)
            if len(out.unexpected_examples) < EXAMPLES:
                out.unexpected_examples.append(f"{key[0]} slot {key[1]}: tasks {sorted(ids)}")
    return out


@dataclass(frozen=True)
class Counters:
    """DescribeSchedule's counters, summed over the run's schedules."""

    described: int = 0
    fired_total: int = 0
    skipped_total: int = 0
    errors: int = 0  # schedules that could not be described


def schedule_section(
    plan: SchedulePlan,
    tasks: Iterable[SlotTask],
    counters: Counters,
    executions: Mapping[str, int],
    overlapping_tasks: Iterable[str],
    window: tuple[float, float],
    cpu_s: Mapping[str, float],
    create_s: float,
) -> dict[str, Any]:
    """The report's ``schedules`` section.

    ``executions``: task id → executions in the ledger; ``overlapping_tasks``:
    ids of tasks with overlapping executions (ledger); ``window``: the load's
    wall-clock start and end, s; ``cpu_s``: CPU seconds over the load by
    kind ("store", "python") for CPU per fire."""
    tasks = list({t.task_id: t for t in tasks if t.schedule_id.startswith(ID_PREFIX)}.values())
    expected = plan.expected()
    count = count_slots(expected, tasks)
    ours = {t.task_id for t in tasks}
    t0, t1 = window
    seconds = max(1e-9, t1 - t0)
    in_window = sum(1 for t in tasks if t0 * 1000 <= t.created_at_ms < t1 * 1000)
    runs = [executions.get(t.task_id, 0) for t in tasks]
    terminal = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
    by_status: dict[str, int] = defaultdict(int)
    for t in tasks:
        by_status[pb.TaskStatus.Name(pb.TaskStatus.ValueType(t.status))] += 1
    return {
        "schedules": plan.count,
        "every_s": plan.every_ms / 1000,
        "jitter_s": plan.jitter_ms / 1000,
        "overlap": plan.overlap.value,
        "window": {"start_ms": plan.start_ms, "end_ms": plan.end_ms},
        "create_s": round(create_s, 2),
        "expected": count.expected,
        "found": count.tasks,
        "slots_with_task": count.slots_with_task,
        "missed": count.missed,
        "duplicates": count.duplicates,
        "unexpected": count.unexpected,
        "offered_fires_per_s": round(count.expected / ((plan.end_ms - plan.start_ms + 1) / 1000), 1),
        "fired_per_s_in_window": round(in_window / seconds, 1),
        "by_status": dict(by_status),
        "not_terminal": sum(1 for t in tasks if t.status not in terminal),
        "executed": sum(1 for n in runs if n > 0),
        "executed_more_than_once": sum(1 for n in runs if n > 1),
        "never_executed": sum(1 for n in runs if n == 0),
        "overlaps": len(ours & set(overlapping_tasks)),
        # started_at − run_at: when the slot's task (due at slot + jitter) really started (server time).
        "firing_lag_ms": percentiles([t.started_at_ms - t.run_at_ms for t in tasks if t.started_at_ms is not None]),
        # created_at − nominal_time: how late the trigger decided the slot and wrote its task.
        "creation_lag_ms": percentiles([t.created_at_ms - t.nominal_ms for t in tasks]),
        "counters": {"fired_total": counters.fired_total, "skipped_total": counters.skipped_total,
                     "described": counters.described, "errors": counters.errors},  # fmt: skip
        "cpu_ms_per_fire": {k: round(1000 * v / in_window, 2) if in_window else None for k, v in cpu_s.items()},
        "missed_examples": count.missed_examples,
        "duplicate_examples": count.duplicate_examples,
        "unexpected_examples": count.unexpected_examples,
    }
