"""Periodic schedules as plain values: what a schedule is and what it remembers.

A ``Schedule`` is one row of the ``schedules`` table. Its definition (spec,
action, policy) is what the user wrote; its ``ScheduleState`` is what the
firing engine (``leasesched.firing``) keeps between two evaluations: the next
slot to decide, the runs that may still be going, the slots kept for later
by an overlap policy, and bounded records of recent runs and skipped slots.
Every change of a schedule is one conditional write on ``version``.

The task of a slot has the id ``slot_task_id(uid, slot)``: a name-based
UUID of the schedule's uid and the slot's time, so whoever creates it, and
however often, it is the same task (``uid`` is drawn when the schedule is
created, so a schedule deleted and created again under the same id starts a
new series of task ids).
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from dataclasses import dataclass, field

from leasesched.model import RetryPolicy, Task, Timeouts
from leasesched.schedule_spec import ScheduleSpec

RECENT_RUNS = 10  # runs remembered in a schedule's row (DescribeSchedule shows them)
SKIP_RECORDS = 10  # skipped-slot ranges remembered
BUFFER_ALL_LIMIT = 100  # slots BUFFER_ALL keeps while a run is going; more are skipped ("buffer_full")
RUNNING_LIMIT = 100  # runs tracked as maybe still going (ALLOW_ALL can start many)
BACKFILL_LIMIT = 100_000  # slots one BackfillSchedule may ask for
BACKFILLS_PENDING = 10  # backfill ranges a schedule may have waiting


class Overlap(enum.Enum):
    """What a slot does while the previous run is still going."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    BUFFER_ALL = "buffer_all"
    CANCEL_OTHER = "cancel_other"
    ALLOW_ALL = "allow_all"


class Cause(enum.Enum):
    """Why a run was started (shown with the run)."""

    SCHEDULE = "schedule"  # its slot came
    CATCHUP = "catchup"  # its slot was missed during an outage and is still within the catch-up window
    BUFFER = "buffer"  # kept by BUFFER_ONE / BUFFER_ALL / CANCEL_OTHER until the previous run ended
    TRIGGER = "trigger"  # TriggerSchedule
    BACKFILL = "backfill"  # BackfillSchedule


class SkipReason(enum.Enum):
    OVERLAP = "overlap"
    BUFFER_FULL = "buffer_full"
    CATCHUP_WINDOW = "catchup_window"
    PAUSED = "paused"
    NO_ACTIONS_LEFT = "no_actions_left"


@dataclass(frozen=True)
class TaskTemplate:
    """The task each slot creates (a ScheduleTask request without its time)."""

    type: str
    payload: bytes = b""
    priority: int = 5
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    lease_ms: int = 30_000
    # Every task of the schedule gets these, as if ScheduleTask had set them:
    # a schedule's runs are held by the same concurrency limits and gate as
    # the key's other tasks (issue 15). "" = none.
    concurrency_key: str = ""
    gate: str = ""


@dataclass(frozen=True)
class SchedulePolicy:
    overlap: Overlap = Overlap.SKIP
    catchup_window_ms: int = 3_600_000
    pause_on_failure: bool = False


@dataclass(frozen=True)
class Run:
    """A slot that was given a task."""

    slot_ms: int
    task_id: uuid.UUID
    fired_at_ms: int
    cause: Cause


@dataclass(frozen=True)
class Skipped:
    """Consecutive slots skipped for one reason (one record, not one per slot:
    an outage of a year of every-second slots is one line)."""

    first_ms: int
    last_ms: int
    count: int
    reason: SkipReason
    recorded_at_ms: int


@dataclass(frozen=True)
class Pending:
    """A slot waiting to be run: kept by an overlap policy, or part of a backfill."""

    slot_ms: int
    cause: Cause
    overlap: Overlap | None = None  # None = the schedule's policy


@dataclass(frozen=True)
class Backfill:
    """Slots of the spec in [next_ms, end_ms] still to run, oldest first."""

    next_ms: int
    end_ms: int
    overlap: Overlap | None = None


@dataclass(frozen=True)
class ScheduleState:
    """What the firing engine keeps between evaluations."""

    next_slot_ms: int | None  # the earliest slot not decided yet; None = the spec has no more
    paused: bool = False
    note: str = ""
    limited_actions: bool = False
    remaining_actions: int = 0
    running: tuple[Run, ...] = ()  # runs whose task may still be going, oldest first
    creating: tuple[Run, ...] = ()  # decided runs whose task may not exist yet (made idempotently)
    buffered: tuple[Pending, ...] = ()
    backfills: tuple[Backfill, ...] = ()
    recent: tuple[Run, ...] = ()  # newest last
    skipped: tuple[Skipped, ...] = ()  # newest last
    fired_total: int = 0
    skipped_total: int = 0

    def replace(self, **changes: object) -> "ScheduleState":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Schedule:
    """One row of the ``schedules`` table."""

    namespace: str
    schedule_id: str
    uid: uuid.UUID
    shard: int
    spec: ScheduleSpec
    action: TaskTemplate
    policy: SchedulePolicy
    state: ScheduleState
    version: int = 1
    created_at_ms: int = 0
    updated_at_ms: int = 0

    def replace(self, **changes: object) -> "Schedule":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def ref(self) -> str:
        """``namespace/schedule_id``: how a due-index entry names the schedule
        (a namespace never contains "/")."""
        return f"{self.namespace}/{self.schedule_id}"


def parse_ref(ref: str) -> tuple[str, str]:
    namespace, _, schedule_id = ref.partition("/")
    return namespace, schedule_id


def slot_task_id(uid: uuid.UUID, slot_ms: int) -> uuid.UUID:
    """The one task id of a slot: the same for every process and every retry."""
    return uuid.uuid5(uid, f"slot:{slot_ms}")


def run_task_id(uid: uuid.UUID, slot_ms: int, cause: Cause) -> uuid.UUID:
    """The task id of a run: its slot's, except for a TriggerSchedule run,
    whose nominal time is the moment it was asked for (not a slot of the
    spec: a run now must never take, or be taken for, a slot's task)."""
    if cause == Cause.TRIGGER:
        return uuid.uuid5(uid, f"trigger:{slot_ms}")
    return slot_task_id(uid, slot_ms)


def slot_task(schedule: Schedule, run: Run) -> Task:
    """The task of ``run``: due at its slot plus the slot's jitter, in the
    schedule's own shard (so the trigger that fires the schedule also
    dispatches its tasks, without a hint across processes). Every value is
    a function of the schedule and the run, so whoever builds it builds the
    same row (``Lifecycle.create_slot_task`` relies on that)."""
    action = schedule.action
    slot_ms, now = run.slot_ms, run.fired_at_ms
    run_at = slot_ms + schedule.spec.jitter_for(schedule.uid.bytes, slot_ms)
    schedule_to_close = action.timeouts.schedule_to_close_ms
    return Task(
        task_id=run.task_id,
        namespace=schedule.namespace,
        type=action.type,
        payload=action.payload,
        shard=schedule.shard,
        priority=action.priority,
        retry=action.retry,
        timeouts=action.timeouts,
        lease_ms=action.lease_ms,
        created_at=now,
        run_at=run_at,
        first_run_at=run_at,
        deadline_at=run_at + schedule_to_close if schedule_to_close else None,
        schedule_id=schedule.schedule_id,
        nominal_time=slot_ms,
        concurrency_key=action.concurrency_key,
        gate=action.gate,
    )
