"""Every check ``task_from_row`` makes on a raw ``tasks`` row (what a direct
CQL write or an old version may have stored), and the repair each asks for."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from leasesched.limits import MAX_STORED_TIME_MS
from leasesched.model import Task, now_ms
from leasesched.states import TaskStatus
from leasesched.store.base import TIME_COLUMNS, RawCondition, UnreadableTask, task_from_row
from leasesched.store.memory import raw_row


def good_task() -> Task:
    now = now_ms()
    return Task(
        task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"p", shard=3, lease_token=4,
        created_at=now, run_at=now, first_run_at=now, deadline_at=now + 60_000,
    )  # fmt: skip


def problems_of(**overrides: Any) -> UnreadableTask:
    with pytest.raises(UnreadableTask) as info:
        task_from_row(raw_row(good_task(), **overrides))
    return info.value


def test_a_good_row_reads_as_the_task_it_was() -> None:
    task = good_task()
    assert task_from_row(raw_row(task)) == task


def test_the_time_bounds_themselves_are_readable() -> None:
    for column in TIME_COLUMNS:
        for value in (0, MAX_STORED_TIME_MS, None):
            task_from_row(raw_row(good_task(), **{column: value}))


@pytest.mark.parametrize("column", TIME_COLUMNS)
@pytest.mark.parametrize("value", [MAX_STORED_TIME_MS + 1, 300_000_000_000_000, -1, -(2**63)])
def test_a_time_out_of_range_is_repaired_to_null(column: str, value: int) -> None:
    bad = problems_of(**{column: value})
    assert [(p.column, p.value, p.reason) for p in bad.problems] == [(column, value, "time")]
    assert bad.repairs == {column: None}
    assert column in str(bad) and str(value) in str(bad)


@pytest.mark.parametrize(
    "column,value,reason,repair",
    [
        ("status", "DISPATCHED", "status", "FAILED"),
        ("status", None, "status", "FAILED"),
        ("status", "scheduled", "status", "FAILED"),
        ("namespace", None, "missing", ""),
        ("type", None, "missing", ""),
        ("shard", None, "missing", 0),
        ("shard", -1, "missing", 0),
        ("priority", 10, "priority", 5),
        ("priority", -1, "priority", 5),
        ("priority", None, "priority", 5),
        ("attempt", 0, "attempt", 1),
        ("attempt", None, "attempt", 1),
        ("max_attempts", 0, "retry_policy", 1),
        ("lease_ms", 0, "lease", 30_000),
        ("lease_ms", -5, "lease", 30_000),
        ("lease_ms", None, "lease", 30_000),
        ("lease_token", -1, "lease", 0),
        ("retry_initial_ms", None, "retry_policy", 1000),
        ("retry_max_ms", -1, "retry_policy", 100_000),
        ("retry_coefficient", float("nan"), "retry_policy", 2.0),
        ("retry_coefficient", 0.5, "retry_policy", 2.0),
        ("schedule_to_close_ms", -1, "timeouts", 0),
    ],
)
def test_each_problem_names_its_column_reason_and_repair(column: str, value: Any, reason: str, repair: Any) -> None:
    bad = problems_of(**{column: value})
    assert len(bad.problems) == 1
    problem = bad.problems[0]
    assert (problem.column, problem.reason, problem.repair) == (column, reason, repair)
    assert bad.reason == reason
    # A repaired row reads again.
    task_from_row(raw_row(good_task(), **{column: value, **bad.repairs}) if column != "status" else raw_row(good_task()))


def test_every_problem_is_reported_and_the_condition_is_the_raw_row() -> None:
    write_id = uuid.uuid4()
    bad = problems_of(status="RUNNING", deadline_at=MAX_STORED_TIME_MS + 1, priority=99, lease_token=7, write_id=write_id)
    assert [p.column for p in bad.problems] == ["deadline_at", "priority"]
    assert bad.reason == "time"  # the first problem labels the metric
    assert bad.status == TaskStatus.RUNNING
    assert bad.expect == RawCondition(status="RUNNING", lease_token=7, write_id=write_id)


def test_an_unknown_status_is_kept_raw_in_the_condition() -> None:
    bad = problems_of(status="WEIRD", lease_token=None)
    assert bad.status is None
    assert bad.expect == RawCondition(status="WEIRD", lease_token=None, write_id=None)
