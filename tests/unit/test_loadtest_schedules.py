"""The load harness's judgement of periodic schedules (``leasesched.loadtest.schedule_load``):
which slots are expected, and duplicates / missed slots counted from task views.

The counting is what decides pass or fail, so it is tested on the cases a
naive count gets wrong: two different task ids at one slot (a duplicate that
counting ids misses), one task listed twice (not a duplicate), and a task
outside the window (not a missed slot, not a duplicate)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from leasesched.loadtest.schedule_load import Counters, SchedulePlan, SlotTask, count_slots, schedule_section
from leasesched.v1 import scheduler_pb2 as pb


def _task(schedule_id: str, slot: int, task_id: str = "", started: int | None = None, status: int = pb.SUCCEEDED) -> SlotTask:
    return SlotTask(task_id=task_id or f"{schedule_id}@{slot}", schedule_id=schedule_id, nominal_ms=slot, run_at_ms=slot,
                    created_at_ms=slot + 5, started_at_ms=started, status=status)  # fmt: skip


def test_plan_spreads_offsets_and_expects_the_slots_of_the_window() -> None:
    plan = SchedulePlan(count=4, every_ms=1000, start_ms=10_000, end_ms=12_999)
    assert [plan.offset_ms(i) for i in range(4)] == [0, 250, 500, 750]
    expected = plan.expected()
    assert expected["load-0"] == [10_000, 11_000, 12_000]
    assert expected["load-3"] == [10_750, 11_750, 12_750]
    assert sum(len(s) for s in expected.values()) == 12
    # The window's end is inclusive (the spec's end_at); a slot right after it is not expected.
    assert SchedulePlan(count=1, every_ms=1000, start_ms=0, end_ms=2000).expected()["load-0"] == [0, 1000, 2000]
    request = plan.to_pb(1, "bench", "bench.noop", b"{}")
    assert request.schedule_id == "load-1" and request.spec.offset.ToMilliseconds() == 250
    assert request.spec.start_at.ToMilliseconds() == 10_000 and request.spec.end_at.ToMilliseconds() == 12_999
    assert request.policy.overlap == pb.OVERLAP_ALLOW_ALL and request.action.type == "bench.noop"


def test_every_slot_once_is_clean() -> None:
    expected = {"load-0": [0, 1000, 2000], "load-1": [500, 1500]}
    found = [_task(s, t) for s, slots in expected.items() for t in slots]
    c = count_slots(expected, found)
    assert (c.expected, c.tasks, c.slots_with_task, c.duplicates, c.missed, c.unexpected) == (5, 5, 5, 0, 0, 0)


def test_two_tasks_at_one_slot_are_a_duplicate_even_with_different_ids() -> None:
    expected = {"load-0": [0, 1000]}
    found = [_task("load-0", 0), _task("load-0", 1000), _task("load-0", 1000, task_id="another-id")]
    c = count_slots(expected, found)
    assert c.duplicates == 1 and c.missed == 0 and c.tasks == 3
    assert c.duplicate_examples == ["load-0 slot 1000: tasks ['another-id', 'load-0@1000']"]


def test_the_same_task_listed_twice_is_not_a_duplicate() -> None:
    expected = {"load-0": [0, 1000]}
    found = [_task("load-0", 0), _task("load-0", 1000), _task("load-0", 1000)]
    c = count_slots(expected, found)
    assert c.duplicates == 0 and c.tasks == 2


def test_missed_and_unexpected_slots() -> None:
    expected = {"load-0": [0, 1000, 2000], "load-1": [500]}
    found = [_task("load-0", 0), _task("load-0", 3000), _task("other", 0), _task("load-1", 500)]
    c = count_slots(expected, found)
    assert c.missed == 2 and c.missed_examples == ["load-0 slot 1000", "load-0 slot 2000"]
    assert c.unexpected == 1 and c.duplicates == 0  # load-0 @ 3000: outside the window; "other" is not the run's
    assert c.slots_with_task + c.missed == c.expected


def test_section_lags_executions_and_counters() -> None:
    plan = SchedulePlan(count=2, every_ms=1000, start_ms=0, end_ms=1999)
    found = [
        _task("load-0", 0, started=30), _task("load-0", 1000, started=1010),
        _task("load-1", 500, started=700), _task("load-1", 1500, status=pb.RUNNING),
        _task("load-1", 1500, task_id="dup"),
    ]
    section = schedule_section(plan, found, Counters(described=2, fired_total=4, skipped_total=1),
                               {"load-0@0": 1, "load-0@1000": 2, "load-1@500": 1}, {"load-0@1000", "not-ours"},
                               (0.0, 2.0), {"store": 0.5, "python": 1.0}, create_s=0.1)  # fmt: skip
    assert (section["expected"], section["found"], section["missed"], section["duplicates"]) == (4, 5, 0, 1)
    assert section["firing_lag_ms"]["p50"] == 30 and section["firing_lag_ms"]["max"] == 200
    assert section["firing_lag_ms"]["n"] == 3 and section["creation_lag_ms"]["max"] == 5
    assert section["executed_more_than_once"] == 1 and section["never_executed"] == 2 and section["overlaps"] == 1
    assert section["not_terminal"] == 1 and section["counters"]["fired_total"] == 4
    assert section["fired_per_s_in_window"] == 2.5 and section["cpu_ms_per_fire"] == {"store": 100.0, "python": 200.0}


def test_slot_task_from_view() -> None:
    view = pb.TaskView(task_id="t", schedule_id="load-0", status=pb.SUCCEEDED,
                       nominal_time=Timestamp(seconds=10), run_at=Timestamp(seconds=10, nanos=250_000_000),
                       created_at=Timestamp(seconds=10, nanos=3_000_000))  # fmt: skip
    task = SlotTask.from_view(view)
    assert task is not None and (task.nominal_ms, task.run_at_ms, task.created_at_ms, task.started_at_ms) == (10_000, 10_250, 10_003, None)
    assert SlotTask.from_view(pb.TaskView(task_id="plain")) is None
