"""Firing a schedule: one slot at a time, decided by one conditional write.

``decide`` is the whole policy, as a pure function of the schedule, what its
tracked runs are doing now, and the time: which slot is next, whether it runs,
waits (buffered) or is skipped, and when to look again. ``Firing.evaluate``
does the I/O around it:

1. read the schedule; make sure every run a previous evaluation decided
   (``state.creating``) has its task (an insert-if-absent of the slot's
   deterministic id: a no-op when it exists);
2. read the status of each run that may still be going;
3. ``decide``;
4. write the due-index entry for the next evaluation (before the state
   that makes it meaningful, as the lifecycle does for tasks);
5. write the new state, conditional on the version read. A lost race
   (another trigger, an RPC) re-reads and decides again: only one decision per
   version is ever written, so a slot is decided once;
6. create the decided run's task and cancel what CANCEL_OTHER cancels.

A crash between 5 and 6 leaves the run in ``creating``, done by the next
evaluation: the trigger's due entry for this evaluation is still pending
(its scanner re-reads it after a failover), and an RPC that fires writes an
entry a few seconds ahead for exactly this. The task of a slot is created
with an id derived from the schedule and the slot, so two evaluators, a
retry or a failover in the middle can never make two tasks for one slot.

Who evaluates: the trigger owning the schedule's shard, when the schedule's
due entry comes (``trigger/schedule_firer.py``), and TaskService for
TriggerSchedule, UnpauseSchedule, UpdateSchedule and BackfillSchedule. They
may overlap in time; the version decides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from leasesched.errors import Aborted
from leasesched.model import DueEntry, Task, now_ms
from leasesched.observability import metrics
from leasesched.schedules import (
    BUFFER_ALL_LIMIT,
    RECENT_RUNS,
    RUNNING_LIMIT,
    SKIP_RECORDS,
    Backfill,
    Cause,
    Overlap,
    Pending,
    Run,
    Schedule,
    ScheduleState,
    Skipped,
    SkipReason,
    run_task_id,
    slot_task,
)
from leasesched.states import TaskStatus

log = logging.getLogger(__name__)

MAX_RACE_RETRIES = 5
LATE_MS = 5_000  # a slot decided later than this after its time is a catch-up (paced); below catchup_window's 10 s minimum
RECHECK_MS = 1_000  # while a buffered slot or backfill waits for a run to end, look this often
CONFIRM_MS = 5_000  # an RPC that fires looks again this soon, to finish a creation it may not have done
MAX_AHEAD_MS = 30 * 86_400_000  # a due entry never further ahead (its TTL bound): a later slot gets a no-op look first
ALLOW_ALL_TRACKED = 10  # runs an ALLOW_ALL schedule watches for pause_on_failure
SKIP_COUNT_CAP = 10_000_000  # counting skipped slots stops here (an every-second schedule down for 115 days)


@dataclass(frozen=True)
class Plan:
    """What one evaluation decided."""

    state: ScheduleState
    fire: tuple[Run, ...] = ()
    cancel: tuple[uuid.UUID, ...] = ()
    next_eval_ms: int | None = None  # None: nothing will happen until someone changes the schedule
    outcome: str = ""  # for TriggerSchedule: "started", "buffered", "skipped: overlap", ...


def _skip(state: ScheduleState, first: int, last: int, count: int, reason: SkipReason, now: int) -> ScheduleState:
    """Record skipped slots, merging with the newest record when it is the
    same reason and directly before (a long overlap is one record)."""
    records = list(state.skipped)
    if records and records[-1].reason == reason and records[-1].last_ms < first:
        prev = records[-1]
        records[-1] = Skipped(prev.first_ms, last, prev.count + count, reason, now)
    else:
        records.append(Skipped(first, last, count, reason, now))
    return state.replace(skipped=tuple(records[-SKIP_RECORDS:]), skipped_total=state.skipped_total + count)


def _start(schedule: Schedule, state: ScheduleState, slot: int, cause: Cause, now: int) -> tuple[ScheduleState, Run]:
    run = Run(slot, run_task_id(schedule.uid, slot, cause), now, cause)
    remaining = state.remaining_actions - 1 if state.limited_actions else state.remaining_actions
    # Each tracked run costs a read per evaluation. ALLOW_ALL never waits for
    # a run, so it tracks only the last few (for pause_on_failure).
    tracked = ALLOW_ALL_TRACKED if schedule.policy.overlap == Overlap.ALLOW_ALL else RUNNING_LIMIT
    state = state.replace(
        running=(state.running + (run,))[-tracked:],
        creating=state.creating + (run,),
        recent=(state.recent + (run,))[-RECENT_RUNS:],
        fired_total=state.fired_total + 1,
        remaining_actions=remaining,
    )
    return state, run


def _out_of_actions(state: ScheduleState) -> bool:
    return state.limited_actions and state.remaining_actions <= 0


def refresh_running(schedule: Schedule, statuses: dict[uuid.UUID, TaskStatus | None], now: int) -> ScheduleState:
    """Forget runs that ended; with pause_on_failure, a FAILED one pauses the schedule.

    ``statuses``: the current status of each tracked run (None: no such task,
    which after ``creating`` was done means it is gone: ended)."""
    state = schedule.state
    still: list[Run] = []
    for run in state.running:
        status = statuses.get(run.task_id, TaskStatus.RUNNING)
        if status is not None and not status.terminal:
            still.append(run)
            continue
        if status == TaskStatus.FAILED and schedule.policy.pause_on_failure and not state.paused:
            note = f"paused on failure: task {run.task_id} (slot {run.slot_ms} ms) failed"
            state = state.replace(paused=True, note=note)
    return state.replace(running=tuple(still))


def _apply_overlap(
    schedule: Schedule, state: ScheduleState, pending: Pending, now: int
) -> tuple[ScheduleState, tuple[Run, ...], tuple[uuid.UUID, ...], str]:
    """Run, keep or skip one slot while runs may be going."""
    if _out_of_actions(state):
        return _skip(state, pending.slot_ms, pending.slot_ms, 1, SkipReason.NO_ACTIONS_LEFT, now), (), (), "skipped: no_actions_left"
    policy = pending.overlap or schedule.policy.overlap
    if not state.running or policy == Overlap.ALLOW_ALL:
        state, run = _start(schedule, state, pending.slot_ms, pending.cause, now)
        return state, (run,), (), "started"
    kept = Pending(pending.slot_ms, Cause.BUFFER if pending.cause == Cause.SCHEDULE else pending.cause, pending.overlap)
    if policy == Overlap.SKIP:
        return _skip(state, pending.slot_ms, pending.slot_ms, 1, SkipReason.OVERLAP, now), (), (), "skipped: overlap"
    if policy == Overlap.CANCEL_OTHER:
        cancel = tuple(r.task_id for r in state.running)
        dropped = state.buffered
        state = state.replace(buffered=(kept,))
        for old in dropped:  # the newest slot replaces one kept earlier
            state = _skip(state, old.slot_ms, old.slot_ms, 1, SkipReason.BUFFER_FULL, now)
        return state, (), cancel, "buffered"
    limit = 1 if policy == Overlap.BUFFER_ONE else BUFFER_ALL_LIMIT
    if len(state.buffered) >= limit:
        return _skip(state, pending.slot_ms, pending.slot_ms, 1, SkipReason.BUFFER_FULL, now), (), (), "skipped: buffer_full"
    return state.replace(buffered=state.buffered + (kept,)), (), (), "buffered"


def decide(schedule: Schedule, state: ScheduleState, now: int, may_catch_up: bool = True) -> Plan:
    """The next step for ``schedule`` at ``now``, given ``state`` (its state
    with ended runs already forgotten, ``refresh_running``).

    At most one slot is run per evaluation, so every run is one conditional
    write; when more is due, ``next_eval_ms`` is ``now`` and the caller
    evaluates again. ``may_catch_up``: the trigger's pace for late slots and
    backfills allows one more now (on-time slots are never held back)."""
    spec = schedule.spec
    state = state.replace(creating=())
    if state.paused:
        # Slots that come while paused are skipped, recorded when noticed (at unpause).
        return Plan(state, next_eval_ms=None, outcome="idle")
    window = schedule.policy.catchup_window_ms
    nxt = state.next_slot_ms
    # 1. Slots older than the catch-up window: recorded as skipped, in one step.
    if nxt is not None and nxt < now - window:
        horizon = now - window
        count = spec.count(nxt - 1, horizon - 1, SKIP_COUNT_CAP)
        # Recorded as the range [first skipped slot, horizon): counting is
        # cheap for any outage, listing its slots would not be.
        state = _skip(state, nxt, max(nxt, horizon - 1), count, SkipReason.CATCHUP_WINDOW, now)
        nxt = spec.next_after(horizon - 1)
        state = state.replace(next_slot_ms=nxt)
    fire: tuple[Run, ...] = ()
    cancel: tuple[uuid.UUID, ...] = ()
    outcome = "idle"
    waiting = False  # something waits for a run to end
    throttled = False
    # 2. A kept slot runs first, once nothing is running.
    if state.buffered and not state.running:
        head, rest = state.buffered[0], state.buffered[1:]
        state = state.replace(buffered=rest)
        state, fire, cancel, outcome = _apply_overlap(schedule, state, head, now)
    # 3. The slot whose time has come.
    elif nxt is not None and nxt <= now and state.running and _skips_all(schedule, state):
        # Every slot due now would be skipped in turn while the run goes:
        # one record and one write instead of one evaluation per slot (after
        # an outage that can be thousands).
        count = spec.count(nxt - 1, now, SKIP_COUNT_CAP)
        reason = SkipReason.OVERLAP if schedule.policy.overlap == Overlap.SKIP else SkipReason.BUFFER_FULL
        state = _skip(state, nxt, now, count, reason, now).replace(next_slot_ms=spec.next_after(now))
        outcome = f"skipped: {reason.value}"
    elif nxt is not None and nxt <= now:
        late = now - nxt > LATE_MS
        if late and not may_catch_up:
            throttled = True
        else:
            cause = Cause.CATCHUP if late else Cause.SCHEDULE
            state = state.replace(next_slot_ms=spec.next_after(nxt))
            state, fire, cancel, outcome = _apply_overlap(schedule, state, Pending(nxt, cause), now)
    # 4. Backfills, oldest slot first.
    elif state.backfills:
        backfill = state.backfills[0]
        policy = backfill.overlap or schedule.policy.overlap
        if not may_catch_up:
            throttled = True
        elif state.running and policy in (Overlap.BUFFER_ONE, Overlap.BUFFER_ALL):
            waiting = True  # a backfill is its own buffer: its next slot waits for the run to end
        else:
            slot = spec.next_after(backfill.next_ms - 1)
            # Slots from the next regular one on are the regular firing's, never a backfill's.
            end = backfill.end_ms if nxt is None else min(backfill.end_ms, nxt - 1)
            if slot is None or slot > end:
                state = state.replace(backfills=state.backfills[1:])
                outcome = "backfill done"
            else:
                after = Backfill(slot + 1, backfill.end_ms, backfill.overlap)
                state = state.replace(backfills=(after,) + state.backfills[1:])
                state, fire, cancel, outcome = _apply_overlap(schedule, state, Pending(slot, Cause.BACKFILL, backfill.overlap), now)
    if state.buffered and state.running:
        waiting = True
    return Plan(state, fire, cancel, _next_eval(state, now, waiting, throttled), outcome)


def _skips_all(schedule: Schedule, state: ScheduleState) -> bool:
    """While a run goes, would the schedule's own policy skip any slot that comes?"""
    policy = schedule.policy.overlap
    return policy == Overlap.SKIP or (policy == Overlap.BUFFER_ONE and len(state.buffered) >= 1)


def _next_eval(state: ScheduleState, now: int, waiting: bool, throttled: bool) -> int | None:
    if state.paused:
        return None
    if throttled:
        return now + 200
    work_now = (state.buffered and not state.running) or (state.backfills and not waiting)
    due = state.next_slot_ms
    if work_now or (due is not None and due <= now):
        return now
    candidates = [] if due is None or _out_of_actions(state) and not state.buffered else [due]
    if waiting or state.buffered:
        candidates.append(now + RECHECK_MS)
    if not candidates:
        return None
    return min(min(candidates), now + MAX_AHEAD_MS)


def trigger_now(schedule: Schedule, state: ScheduleState, now: int, overlap: Overlap | None) -> Plan:
    """TriggerSchedule: one run with nominal time ``now``, under ``overlap``
    (None: the schedule's policy); the schedule's own slots are unchanged."""
    state = state.replace(creating=())
    state, fire, cancel, outcome = _apply_overlap(schedule, state, Pending(now, Cause.TRIGGER, overlap), now)
    waiting = bool(state.buffered and state.running)
    return Plan(state, fire, cancel, _next_eval(state, now, waiting, False), outcome)


# ---------------------------------------------------------------- I/O


class ScheduleStore(Protocol):
    async def get_schedule(self, namespace: str, schedule_id: str, serial: bool = False) -> Schedule | None: ...

    async def update_schedule(self, schedule: Schedule, expected_version: int, definition: bool = True) -> bool: ...

    async def add_due(self, entry: DueEntry) -> None: ...


class TaskActions(Protocol):
    """What firing needs from the lifecycle (the one writer of task state)."""

    async def read(self, task_id: uuid.UUID, serial: bool = False) -> Task | None: ...

    async def create_slot_task(self, task: Task, may_exist: bool = False) -> bool: ...

    async def cancel(self, task_id: uuid.UUID) -> Task: ...


Decider = Callable[[Schedule, ScheduleState, int], Plan]
Created = Callable[[Task], Awaitable[None]]  # told about each task a firing created (to dispatch it at once)


def schedule_entry(schedule: Schedule, at_ms: int) -> DueEntry:
    """The due-index entry that makes the shard's trigger evaluate ``schedule`` at ``at_ms``."""
    return DueEntry(shard=schedule.shard, due_at=at_ms, task_id=schedule.uid, kind=DueEntry.SCHEDULE, ref=schedule.ref)


@dataclass(frozen=True)
class Evaluated:
    schedule: Schedule | None  # as written (None: no such schedule)
    plan: Plan | None
    created: tuple[Task, ...] = ()


class Firing:
    """The I/O around ``decide``: reads, the conditional write, task creation."""

    def __init__(
        self, store: ScheduleStore, tasks: TaskActions, on_created: Created | None = None, confirm: bool = False
    ) -> None:
        """``confirm``: this evaluator is an RPC, not the trigger working a due
        entry; a firing then also gets a look within ``CONFIRM_MS`` (which
        makes the task should this process die before creating it)."""
        self._store = store
        self._tasks = tasks
        self._on_created = on_created
        self._confirm = confirm

    async def evaluate(
        self, namespace: str, schedule_id: str, uid: uuid.UUID | None = None, decider: Decider | None = None,
        edit: Callable[[Schedule], Schedule] | None = None, now: int | None = None,
    ) -> Evaluated:
        """Evaluate one schedule now. ``uid``: only the schedule with this uid
        (a due entry of a deleted schedule must not fire its successor of the
        same name); ``decider``: what to decide (default ``decide``);
        ``edit``: a change of definition to write with the decision (it sees
        each fresh read, and may refuse it by raising)."""
        decider = decider or (lambda s, st, t: decide(s, st, t))
        serial = False
        for _ in range(MAX_RACE_RETRIES):
            read = await self._store.get_schedule(namespace, schedule_id, serial=serial)
            if read is None or (uid is not None and read.uid != uid):
                return Evaluated(None, None)
            await self._finish_creating(read)
            base = edit(read) if edit is not None else read
            statuses = await self._statuses(base)
            at = now_ms() if now is None else now
            plan = decider(base, refresh_running(base, statuses, at), at)
            if self._confirm and plan.fire:
                later = at + CONFIRM_MS
                plan = dataclasses.replace(plan, next_eval_ms=later if plan.next_eval_ms is None else min(plan.next_eval_ms, later))
            if plan.next_eval_ms is not None:
                await self._store.add_due(schedule_entry(base, plan.next_eval_ms))
            if base == read and plan.state == read.state and not plan.fire and not plan.cancel:
                return Evaluated(read, plan)  # nothing to write
            written = base.replace(state=plan.state, version=read.version + 1, updated_at_ms=at)
            same_definition = (base.spec, base.action, base.policy) == (read.spec, read.action, read.policy)
            if not await self._store.update_schedule(written, read.version, definition=not same_definition):
                metrics.schedule_evaluations.labels("raced").inc()
                serial = True
                continue
            metrics.schedule_evaluations.labels("fired" if plan.fire else "idle").inc()
            for reason, count in new_skips(read.state, plan.state).items():
                metrics.schedule_skipped_slots.labels(reason.value).inc(count)
            created = await self._act(written, plan, at)
            return Evaluated(written, plan, created)
        raise Aborted(f"schedule {namespace}/{schedule_id} kept changing while it was evaluated; retry")

    async def _finish_creating(self, schedule: Schedule) -> None:
        """Make the tasks of runs decided earlier (a no-op write when their
        creator did it; the trigger's scan dispatches them either way)."""
        for run in schedule.state.creating:
            await self._tasks.create_slot_task(slot_task(schedule, run), may_exist=run.cause == Cause.BACKFILL)

    async def _statuses(self, schedule: Schedule) -> dict[uuid.UUID, TaskStatus | None]:
        runs = schedule.state.running
        tasks = await asyncio.gather(*(self._tasks.read(run.task_id) for run in runs))
        return {run.task_id: (None if task is None else task.status) for run, task in zip(runs, tasks)}

    async def _act(self, schedule: Schedule, plan: Plan, now: int) -> tuple[Task, ...]:
        created = []
        for run in plan.fire:
            metrics.schedule_fires.labels(run.cause.value).inc()
            if run.cause in (Cause.SCHEDULE, Cause.CATCHUP):
                metrics.schedule_fire_lag.observe(max(0, now - run.slot_ms) / 1000)
            task = slot_task(schedule, run)
            # Decided by the write just made: a new task, except a backfilled
            # slot that the regular firing ran before (not run again).
            if not await self._tasks.create_slot_task(task, may_exist=run.cause == Cause.BACKFILL):
                log.info("schedule %s: backfilled slot %d already had its task %s", schedule.ref, run.slot_ms, run.task_id)
                continue
            created.append(task)
            if self._on_created is not None:
                await self._on_created(task)
            log.info(
                "schedule %s: slot %d %s, task %s", schedule.ref, run.slot_ms, run.cause.value, run.task_id,
            )
        for task_id in plan.cancel:
            try:
                await self._tasks.cancel(task_id)
            except Exception as exc:  # already ended, or the store is away: the buffered slot waits either way
                log.info("schedule %s: cancelling task %s: %s", schedule.ref, task_id, exc)
        return tuple(created)


def new_skips(before: ScheduleState, after: ScheduleState) -> dict[SkipReason, int]:
    """Slots skipped between two states, by reason (records are known by
    their first slot and reason; a merged record grew by the difference)."""
    old = {(k.first_ms, k.reason): k.count for k in before.skipped}
    found: dict[SkipReason, int] = {}
    for k in after.skipped:
        grown = k.count - old.get((k.first_ms, k.reason), 0)
        if grown > 0:
            found[k.reason] = found.get(k.reason, 0) + grown
    return found


def unpause(schedule: Schedule, state: ScheduleState, now: int, note: str) -> Plan:
    """UnpauseSchedule: slots that came while paused are recorded as skipped
    (reason "paused"), never run late; the next slot after now runs."""
    state = state.replace(creating=(), paused=False, note=note)
    nxt = state.next_slot_ms
    if nxt is not None and nxt <= now:
        count = schedule.spec.count(nxt - 1, now, SKIP_COUNT_CAP)
        state = _skip(state, nxt, now, count, SkipReason.PAUSED, now)
        state = state.replace(next_slot_ms=schedule.spec.next_after(now))
    plan = decide(schedule, state, now)
    return dataclasses.replace(plan, outcome="unpaused")


def pause(state: ScheduleState, note: str) -> Plan:
    return Plan(state.replace(creating=(), paused=True, note=note), next_eval_ms=None, outcome="paused")
