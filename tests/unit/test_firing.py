"""The firing engine's decisions (``leasesched.firing``), over the in-memory store.

Pure unit tests of the policy above the store: which slot runs, waits or is
skipped, and that however evaluations interleave a slot gets one task. The
same engine against real Cassandra and processes: tests/integration/test_schedules.py
and tests/chaos/test_schedule_failover.py.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from leasesched.firing import Firing, decide, refresh_running, trigger_now, unpause
from leasesched.lifecycle import Lifecycle
from leasesched.model import Task
from leasesched.schedule_spec import ScheduleSpec
from leasesched.schedules import (
    Backfill,
    Cause,
    Overlap,
    Schedule,
    SchedulePolicy,
    ScheduleState,
    SkipReason,
    TaskTemplate,
    slot_task_id,
)
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore

S = 1000
T0 = 1_800_000_000_000  # a whole second


def make(overlap: Overlap = Overlap.SKIP, every_s: int = 10, window_s: int = 3600, **state: object) -> Schedule:
    spec = ScheduleSpec(every_ms=every_s * S)
    return Schedule(
        namespace="ns", schedule_id="s", uid=uuid.UUID(int=7), shard=3, spec=spec,
        action=TaskTemplate(type="t"), policy=SchedulePolicy(overlap=overlap, catchup_window_ms=window_s * S),
        state=ScheduleState(next_slot_ms=T0, **state),  # type: ignore[arg-type]
    )  # fmt: skip


def running(schedule: Schedule, slot: int) -> Schedule:
    """``schedule`` with the run of ``slot`` going."""
    plan = decide(schedule.replace(state=schedule.state.replace(next_slot_ms=slot)), schedule.state.replace(next_slot_ms=slot), slot)
    assert plan.fire, plan
    return schedule.replace(state=plan.state.replace(creating=()))


def test_an_on_time_slot_runs_once_and_the_next_is_scheduled() -> None:
    s = make()
    plan = decide(s, s.state, T0 + 5)
    assert [r.slot_ms for r in plan.fire] == [T0]
    assert plan.fire[0].task_id == slot_task_id(s.uid, T0) and plan.fire[0].cause == Cause.SCHEDULE
    assert plan.state.next_slot_ms == T0 + 10 * S
    assert plan.next_eval_ms == T0 + 10 * S
    assert plan.state.creating == plan.fire and plan.state.running == plan.fire
    # Deciding again from the state written: nothing more for this slot.
    again = decide(s.replace(state=plan.state), plan.state, T0 + 6)
    assert again.fire == () and again.next_eval_ms == T0 + 10 * S


def test_a_slot_not_yet_due_does_nothing() -> None:
    s = make()
    plan = decide(s, s.state, T0 - 1)
    assert plan.fire == () and plan.state == s.state and plan.next_eval_ms == T0


@pytest.mark.parametrize(
    ("overlap", "fires", "buffered", "skipped", "cancels"),
    [
        (Overlap.SKIP, 0, 0, SkipReason.OVERLAP, 0),
        (Overlap.BUFFER_ONE, 0, 1, None, 0),
        (Overlap.BUFFER_ALL, 0, 1, None, 0),
        (Overlap.CANCEL_OTHER, 0, 1, None, 1),
        (Overlap.ALLOW_ALL, 1, 0, None, 0),
    ],
)
def test_each_overlap_policy_while_the_previous_run_goes(
    overlap: Overlap, fires: int, buffered: int, skipped: SkipReason | None, cancels: int
) -> None:
    s = running(make(overlap), T0)
    plan = decide(s, s.state, T0 + 10 * S)
    assert len(plan.fire) == fires
    assert len(plan.state.buffered) == buffered
    assert len(plan.cancel) == cancels
    if cancels:
        assert plan.cancel == (slot_task_id(s.uid, T0),)
    if skipped is not None:
        assert plan.state.skipped[-1].reason == skipped and plan.state.skipped_total == 1
    else:
        assert plan.state.skipped_total == 0
    if buffered:
        assert plan.next_eval_ms == T0 + 10 * S + 1000  # rechecks while the kept slot waits


def test_a_kept_slot_runs_once_the_previous_run_ended() -> None:
    s = running(make(Overlap.BUFFER_ONE), T0)
    kept = decide(s, s.state, T0 + 10 * S)
    s = s.replace(state=kept.state)
    # Still going: nothing.
    still = decide(s, refresh_running(s, {slot_task_id(s.uid, T0): TaskStatus.RUNNING}, T0 + 11 * S), T0 + 11 * S)
    assert still.fire == ()
    ended = refresh_running(s, {slot_task_id(s.uid, T0): TaskStatus.SUCCEEDED}, T0 + 12 * S)
    plan = decide(s, ended, T0 + 12 * S)
    assert [(r.slot_ms, r.cause) for r in plan.fire] == [(T0 + 10 * S, Cause.BUFFER)]
    assert plan.state.buffered == ()


def test_buffer_one_keeps_one_and_skips_the_rest_buffer_all_keeps_them() -> None:
    for overlap, kept, skipped in ((Overlap.BUFFER_ONE, 1, 2), (Overlap.BUFFER_ALL, 3, 0)):
        s = running(make(overlap), T0)
        for k in (1, 2, 3):
            plan = decide(s, s.state, T0 + k * 10 * S)
            s = s.replace(state=plan.state)
        assert len(s.state.buffered) == kept and s.state.skipped_total == skipped, overlap


def test_slots_older_than_the_catchup_window_are_recorded_as_skipped_the_rest_run_oldest_first() -> None:
    s = make(every_s=1, window_s=10)
    now = T0 + 100 * S  # down for 100 s: slots T0 .. T0+100 s missed
    plan = decide(s, s.state, now)
    record = plan.state.skipped[-1]
    assert record.reason == SkipReason.CATCHUP_WINDOW
    assert record.first_ms == T0 and record.count == 90  # T0 .. T0+89 s
    assert [(r.slot_ms, r.cause) for r in plan.fire] == [(T0 + 90 * S, Cause.CATCHUP)]
    assert plan.next_eval_ms == now  # more to do at once
    # The following evaluations run the rest, one each, never a slot twice.
    seen = [r.slot_ms for r in plan.fire]
    for _ in range(20):
        s = s.replace(state=plan.state.replace(running=()))
        plan = decide(s, s.state, now)
        seen += [r.slot_ms for r in plan.fire]
        if plan.next_eval_ms != now:
            break
    assert seen == [T0 + k * S for k in range(90, 101)]
    assert plan.state.skipped_total == 90


def test_late_slots_wait_for_the_pace_on_time_ones_do_not() -> None:
    s = make(every_s=1)
    late = decide(s, s.state, T0 + 60 * S, may_catch_up=False)
    assert late.fire == () and late.next_eval_ms == T0 + 60 * S + 200
    on_time = decide(s, s.state, T0 + 500, may_catch_up=False)
    assert on_time.fire and on_time.fire[0].cause == Cause.SCHEDULE


def test_pause_on_failure_pauses_when_a_run_failed() -> None:
    s = running(make(), T0)
    s = s.replace(policy=SchedulePolicy(pause_on_failure=True))
    state = refresh_running(s, {slot_task_id(s.uid, T0): TaskStatus.FAILED}, T0 + 10 * S)
    assert state.paused and str(slot_task_id(s.uid, T0)) in state.note
    plan = decide(s, state, T0 + 10 * S)
    assert plan.fire == () and plan.next_eval_ms is None
    # Without the policy a failure changes nothing.
    s2 = running(make(), T0)
    assert not refresh_running(s2, {slot_task_id(s2.uid, T0): TaskStatus.FAILED}, T0 + 10 * S).paused


def test_unpause_skips_the_slots_of_the_pause_and_runs_the_next() -> None:
    s = make(every_s=10, paused=True)
    plan = unpause(s, s.state, T0 + 35 * S, note="")
    assert not plan.state.paused
    assert plan.state.skipped[-1].reason == SkipReason.PAUSED and plan.state.skipped[-1].count == 4  # T0..T0+30
    assert plan.fire == () and plan.state.next_slot_ms == T0 + 40 * S


def test_remaining_actions_stop_the_schedule() -> None:
    s = make(every_s=1, limited_actions=True, remaining_actions=2)
    fired = []
    now = T0
    for _ in range(5):
        plan = decide(s, s.state, now)
        fired += [r.slot_ms for r in plan.fire]
        s = s.replace(state=plan.state.replace(running=()))
        if plan.next_eval_ms is None:
            break
        now = plan.next_eval_ms
    assert fired == [T0, T0 + S]
    assert s.state.remaining_actions == 0 and plan.next_eval_ms is None


def test_trigger_now_applies_the_override_and_leaves_the_slots_alone() -> None:
    s = running(make(Overlap.SKIP), T0)
    skipped = trigger_now(s, s.state, T0 + 3 * S, None)
    assert skipped.fire == () and skipped.outcome == "skipped: overlap"
    forced = trigger_now(s, s.state, T0 + 3 * S, Overlap.ALLOW_ALL)
    assert [(r.slot_ms, r.cause) for r in forced.fire] == [(T0 + 3 * S, Cause.TRIGGER)]
    assert forced.state.next_slot_ms == s.state.next_slot_ms


def test_a_backfill_runs_its_slots_oldest_first_and_a_buffered_backfill_waits_for_each_run() -> None:
    s = make(Overlap.BUFFER_ALL, every_s=10)
    state = s.state.replace(next_slot_ms=T0 + 1000 * S, backfills=(Backfill(T0, T0 + 25 * S, None),))
    s = s.replace(state=state)
    plan = decide(s, state, T0 + 500 * S)
    assert [(r.slot_ms, r.cause) for r in plan.fire] == [(T0, Cause.BACKFILL)]
    s = s.replace(state=plan.state)
    waiting = decide(s, s.state, T0 + 500 * S)  # T0's run still going: BUFFER_ALL backfills wait
    assert waiting.fire == () and waiting.next_eval_ms == T0 + 501 * S
    done = [T0]
    for _ in range(5):
        s = s.replace(state=s.state.replace(running=()))
        plan = decide(s, s.state, T0 + 500 * S)
        done += [r.slot_ms for r in plan.fire]
        s = s.replace(state=plan.state)
    assert done == [T0, T0 + 10 * S, T0 + 20 * S] and s.state.backfills == ()


# ---------------------------------------------------------------- with the I/O


def test_concurrent_evaluations_make_one_task_per_slot() -> None:
    """Ten evaluators of one due slot at once (triggers in a failover, RPCs):
    one conditional write wins; the slot has exactly one task."""

    async def main() -> None:
        store = MemoryStore()
        lifecycle = Lifecycle(store)
        s = make(Overlap.ALLOW_ALL)
        assert await store.insert_schedule(s)
        firing = Firing(store, lifecycle)
        results = await asyncio.gather(*(firing.evaluate("ns", "s", now=T0 + 1) for _ in range(10)))
        fired = [r for result in results if result.plan for r in result.plan.fire]
        assert [r.slot_ms for r in fired] == [T0]
        tasks = [t for t in store.tasks.values() if t.schedule_id == "s"]
        assert [(t.task_id, t.nominal_time) for t in tasks] == [(slot_task_id(s.uid, T0), T0)]
        stored = await store.get_schedule("ns", "s")
        assert stored is not None and stored.state.fired_total == 1

    asyncio.run(main())


def test_a_run_decided_but_not_created_is_created_by_the_next_evaluation() -> None:
    """The evaluator died between its conditional write and the task insert."""

    async def main() -> None:
        store = MemoryStore()
        lifecycle = Lifecycle(store)
        s = make()
        assert await store.insert_schedule(s)
        store.fail_next.add("insert_task")  # the insert after the state write fails
        with pytest.raises(Exception):
            await Firing(store, lifecycle).evaluate("ns", "s", now=T0 + 1)
        stored = await store.get_schedule("ns", "s")
        assert stored is not None and [r.slot_ms for r in stored.state.creating] == [T0]
        assert slot_task_id(s.uid, T0) not in store.tasks
        await Firing(store, lifecycle).evaluate("ns", "s", now=T0 + 2)  # e.g. the re-read due entry
        task: Task = store.tasks[slot_task_id(s.uid, T0)]
        assert task.nominal_time == T0 and task.shard == s.shard
        again = await store.get_schedule("ns", "s")
        assert again is not None and again.state.creating == () and again.state.fired_total == 1

    asyncio.run(main())


def test_an_entry_of_a_deleted_schedule_does_not_fire_its_namesake() -> None:
    async def main() -> None:
        store = MemoryStore()
        s = make()
        assert await store.insert_schedule(s)
        result = await Firing(store, Lifecycle(store)).evaluate("ns", "s", uid=uuid.UUID(int=8), now=T0 + 1)
        assert result.schedule is None and not store.tasks

    asyncio.run(main())


def test_while_a_run_goes_all_due_slots_a_skip_policy_would_skip_are_skipped_in_one_step() -> None:
    s = running(make(Overlap.SKIP, every_s=1), T0)
    s = s.replace(state=s.state.replace(next_slot_ms=T0 + S))
    plan = decide(s, s.state, T0 + 600 * S)  # ten minutes of slots came while the run went on
    assert plan.fire == ()
    assert plan.state.skipped[-1].reason == SkipReason.OVERLAP and plan.state.skipped[-1].count == 600
    assert plan.state.next_slot_ms == T0 + 601 * S and plan.next_eval_ms == T0 + 601 * S
    # BUFFER_ONE with its one slot kept: the same, as buffer_full; BUFFER_ALL keeps them one by one.
    one = running(make(Overlap.BUFFER_ONE, every_s=1), T0)
    one = one.replace(state=decide(one, one.state.replace(next_slot_ms=T0 + S), T0 + S).state)
    plan = decide(one, one.state, T0 + 100 * S)
    assert plan.state.skipped[-1].reason == SkipReason.BUFFER_FULL and plan.state.skipped[-1].count == 99
    everything = running(make(Overlap.BUFFER_ALL, every_s=1), T0)
    plan = decide(everything, everything.state.replace(next_slot_ms=T0 + S), T0 + 100 * S)
    assert len(plan.state.buffered) == 1 and plan.next_eval_ms == T0 + 100 * S


def _utc(*parts: int) -> int:
    import datetime as dt

    return int(dt.datetime(*parts, tzinfo=dt.timezone.utc).timestamp() * 1000)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        # Spring forward (29 March 2026): 02:30 does not exist; it runs at 03:00 CEST = 01:00 UTC, once.
        ((2026, 3, 27), (2026, 3, 31), [(2026, 3, 27, 1, 30), (2026, 3, 28, 1, 30), (2026, 3, 29, 1, 0), (2026, 3, 30, 0, 30)]),
        # Fall back (25 October 2026): 02:30 happens twice; it runs at the first (CEST = 00:30 UTC) only.
        ((2026, 10, 23), (2026, 10, 27), [(2026, 10, 23, 0, 30), (2026, 10, 24, 0, 30), (2026, 10, 25, 0, 30), (2026, 10, 26, 1, 30)]),
    ],
)
def test_a_daily_0230_berlin_schedule_fires_through_the_dst_days_as_documented(
    start: tuple[int, ...], end: tuple[int, ...], expected: list[tuple[int, ...]]
) -> None:
    """The engine on a test clock: evaluate whenever it asks to be evaluated
    (and every 10 minutes besides, as stale entries would), from ``start``
    to ``end``; every run it starts is one slot, once."""
    spec = ScheduleSpec(cron=("30 2 * * *",), time_zone="Europe/Berlin")
    begin = _utc(*start)
    s = make().replace(spec=spec, state=ScheduleState(next_slot_ms=spec.next_after(begin)))
    fired: list[int] = []
    clock, stop = begin, _utc(*end)
    wake = s.state.next_slot_ms
    while clock < stop:
        clock = min(wake or stop, clock + 600_000)
        plan = decide(s, s.state.replace(running=()), clock)
        fired += [r.slot_ms for r in plan.fire]
        s = s.replace(state=plan.state)
        wake = plan.next_eval_ms
    assert fired == [_utc(*t) for t in expected]


def test_the_catch_up_pace_allows_a_burst_then_its_rate() -> None:
    from trigger.schedule_firer import Pace

    now = [100.0]
    pace = Pace(rate=20, clock=lambda: now[0])
    assert sum(pace.take() for _ in range(50)) == 20  # one second's worth at once
    now[0] += 0.5
    assert sum(pace.take() for _ in range(50)) == 10  # then 20/s
    now[0] += 60  # idle: the burst refills, never beyond it
    assert sum(pace.take() for _ in range(50)) == 20


def test_a_backfill_stops_before_the_next_regular_slot_and_a_trigger_never_takes_a_slots_task() -> None:
    s = make(Overlap.ALLOW_ALL, every_s=10)
    state = s.state.replace(backfills=(Backfill(T0 - 30 * S, T0 + 100 * S, None),))  # reaches past the next slot T0
    fired = []
    for _ in range(10):
        plan = decide(s, state, T0 - 1)
        fired += [r.slot_ms for r in plan.fire]
        state = plan.state
    assert fired == [T0 - 30 * S, T0 - 20 * S, T0 - 10 * S] and state.backfills == ()
    run = trigger_now(s, s.state, T0, None).fire[0]
    assert run.slot_ms == T0 and run.task_id != slot_task_id(s.uid, T0)
