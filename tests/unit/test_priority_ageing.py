"""Priority ageing in the dispatcher (issue 15), on a fake clock: a queued
task's effective priority is ``min(cap, priority + waited // step)``, waited
counted from its ``run_at``; ties go to the older task, and across groups to
the round robin. Pure logic, no store."""

from __future__ import annotations

import pytest

from tests.unit.test_fair_share import NOW, Queued
from trigger.dispatcher import DispatchPolicy

STEP = 60_000


def one(q: Queued) -> str:
    """The next dispatch (a worker with one free slot)."""
    ids = q.drain(1)
    assert len(ids) == 1
    return ids[0]


async def test_a_priority_0_task_overtakes_fresh_priority_9_ones_exactly_after_9_steps() -> None:
    q = Queued(DispatchPolicy(ageing_step_ms=STEP))
    low = str(q.offer("", priority=0, run_at=NOW)[0].task_id)
    for t in [*range(0, 9 * STEP, STEP // 2), 9 * STEP - 1]:  # a steady stream of fresh priority 9
        q.now = NOW + t
        q.offer("", priority=9, run_at=q.now)
        assert one(q) != low, f"overtook after {t / STEP:.3f} steps"
    q.now = NOW + 9 * STEP
    fresh = str(q.offer("", priority=9, run_at=q.now)[0].task_id)
    assert one(q) == low  # effective 9, older than the fresh 9
    assert one(q) == fresh


async def test_effective_priority_rises_one_level_per_step() -> None:
    q = Queued(DispatchPolicy(ageing_step_ms=STEP))
    p0 = q.offer("", priority=0, run_at=NOW)[0]
    q.now = NOW + 5 * STEP  # p0 is now worth 5
    p4, p5, p6 = (q.offer("", priority=p, run_at=q.now)[0] for p in (4, 5, 6))
    assert q.drain(4) == [str(r.task_id) for r in (p6, p0, p5, p4)]


async def test_the_cap_bounds_ageing_and_step_0_turns_it_off() -> None:
    capped = Queued(DispatchPolicy(ageing_step_ms=STEP, ageing_cap=3))
    old = capped.offer("", priority=0, run_at=NOW)[0]
    capped.now = NOW + 100 * STEP
    fresh = capped.offer("", priority=4, run_at=capped.now)[0]
    assert capped.drain(2) == [str(fresh.task_id), str(old.task_id)]
    off = Queued(DispatchPolicy(ageing_step_ms=0))
    old = off.offer("", priority=0, run_at=NOW)[0]
    off.now = NOW + 10_000 * STEP
    fresh = off.offer("", priority=1, run_at=off.now)[0]
    assert off.drain(2) == [str(fresh.task_id), str(old.task_id)]
    with pytest.raises(ValueError, match="priority_ageing_cap"):
        DispatchPolicy(ageing_cap=10)
    with pytest.raises(ValueError, match="priority_ageing_step_s"):
        DispatchPolicy(ageing_step_ms=-1)


async def test_an_aged_group_joins_the_round_robin_of_the_top_priority() -> None:
    """Group B's priority-0 task waits while group A has priority-9 work,
    until ageing lifts it to 9: from then on A and B take turns."""
    q = Queued(DispatchPolicy(ageing_step_ms=STEP))
    b = str(q.offer("B", priority=0, run_at=NOW)[0].task_id)
    c = str(q.offer("C", priority=0, run_at=NOW + STEP)[0].task_id)  # one step younger
    q.offer("A", 200, priority=9, run_at=NOW)
    q.now = NOW + 9 * STEP - 1
    assert set(q.groups(q.drain(20))) == {"A"}  # B is worth 8 still
    q.now = NOW + 9 * STEP  # B is worth 9, C 8: promoted while nothing was offered
    order = q.drain(4)
    assert b in order[:2] and c not in order, q.groups(order)
    assert q.groups(order).count("A") == 3


async def test_a_flood_that_has_aged_keeps_fair_share_with_groups_of_its_age() -> None:
    """Two groups flooded at the same moment age together: still round robin,
    and both stay at their aged level (8) after each dispatch, above fresh 7s."""
    q = Queued(DispatchPolicy(ageing_step_ms=STEP))
    q.offer("A", 100, priority=5, run_at=NOW)
    q.offer("B", 100, priority=5, run_at=NOW)
    q.now = NOW + 3 * STEP
    q.offer("C", 5, priority=7, run_at=q.now)
    assert q.groups(q.drain(10)) == "ABABABABAB"
