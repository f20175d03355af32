"""The load harness's concurrency-key groups (``leasesched.loadtest.groups``):
which group a task gets, start lag per group, and the most executions of one
key that ran at once.

The concurrency per key decides whether a limit held, so it is tested on the
cases a naive sweep gets wrong: executions that only touch (counted as at
once, as the ledger's ``max_concurrent`` does), an execution that never
ended (still running), an end before its start (a clock step), one lease
recorded by two processes (one execution), and one key alone."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest

from leasesched.loadtest.groups import (
    backlog_when_others_due,
    BurstStats,
    GroupedTask,
    GroupPlan,
    executions_by_key,
    group_section,
    max_concurrency_per_key,
)
from leasesched.loadtest.ledger import Execution


def _groups(plan: GroupPlan, n: int) -> list[int]:
    return [plan.group_of(i) for i in range(n)]


# ---------------------------------------------------------------- assignment


def test_default_is_uniform_over_all_groups() -> None:
    plan = GroupPlan(groups=4)
    counts = Counter(_groups(plan, 400))
    assert counts == {0: 100, 1: 100, 2: 100, 3: 100}
    # Every window of 4 consecutive tasks holds each group once: no group gets a run of the load.
    assert all(sorted(_groups(plan, 400)[k : k + 4]) == [0, 1, 2, 3] for k in range(0, 400, 4))


def test_flood_share_zero_gives_each_other_group_one_task_in_turn() -> None:
    """The TwTasks scenario: 11 groups, 10 tasks of the timed load, none for the flood group."""
    plan = GroupPlan.from_options(11, 0.0, 10_000)
    assert plan is not None
    assert _groups(plan, 10) == list(range(1, 11))
    assert Counter(_groups(plan, 30)) == {g: 3 for g in range(1, 11)}


def test_flood_share_holds_in_every_prefix_and_the_rest_is_spread_evenly() -> None:
    plan = GroupPlan(groups=5, flood_share=Fraction(3, 4))
    groups = _groups(plan, 1000)
    for n in range(1, 1001):
        assert groups[:n].count(0) == math.floor(n * Fraction(3, 4)), n
    others = Counter(g for g in groups if g != 0)
    assert set(others) == {1, 2, 3, 4} and max(others.values()) - min(others.values()) <= 1


def test_a_decimal_share_is_exact() -> None:
    # 0.1 as a float is a little more than 1/10; read from its decimal text it is 1/10 and 100 tasks give 10.
    plan = GroupPlan.from_options(3, 0.1, 0)
    assert plan is not None and plan.share == Fraction(1, 10)
    assert _groups(plan, 100).count(0) == 10 and _groups(plan, 1000).count(0) == 100


def test_share_one_and_a_single_group_send_everything_to_g0() -> None:
    assert set(_groups(GroupPlan(groups=3, flood_share=Fraction(1)), 50)) == {0}
    assert set(_groups(GroupPlan(groups=1), 50)) == {0}
    assert GroupPlan(groups=3).key(2) == "g2"


def test_options_that_do_not_fit_together_are_refused() -> None:
    assert GroupPlan.from_options(0, None, 0) is None
    with pytest.raises(ValueError, match="need --groups"):
        GroupPlan.from_options(0, None, 100)
    with pytest.raises(ValueError, match="need --groups"):
        GroupPlan.from_options(0, 0.5, 0)
    with pytest.raises(ValueError, match="within 0..1"):
        GroupPlan.from_options(3, 1.5, 0)
    with pytest.raises(ValueError, match="at least 2 groups"):
        GroupPlan.from_options(1, 0.5, 0)
    with pytest.raises(ValueError, match="flood must be"):
        GroupPlan.from_options(2, None, -1)


# ---------------------------------------------------------------- concurrency


def _ex(task: str, token: int, start: float, end: float, pid: int = 1) -> Execution:
    return Execution(task_id=task, token=token, attempt=token, pid=pid, start=start, end=end, ended="end")


def _most(*spans: tuple[float, float]) -> int:
    """The sweep over one key whose tasks ran ``spans`` (one task each)."""
    by_task = {f"t{i}": [_ex(f"t{i}", 1, a, b)] for i, (a, b) in enumerate(spans)}
    return max_concurrency_per_key(by_task, {t: "g0" for t in by_task}).get("g0", 0)


def test_touching_executions_count_as_at_once() -> None:
    # ledger.max_concurrent, as the limit integration tests: one starting the instant another ends counts both,
    # so the figure can only over-state a key's concurrency, never hide a limit's breach.
    assert _most((1.0, 2.0), (2.0, 3.0), (3.0, 4.0)) == 2
    assert _most((1.0, 2.0), (2.0000001, 3.0), (3.0000001, 4.0)) == 1  # one after the other
    assert _most((2.0, 3.0), (1.0, 2.0), (0.5, 2.0)) == 3  # listed in another order, two ending where one starts


def test_overlapping_and_nested_executions() -> None:
    assert _most((1.0, 5.0), (2.0, 3.0), (2.5, 6.0), (5.5, 7.0)) == 3  # at 2.5..3.0
    assert _most((1.0, 2.0), (1.999, 2.001)) == 2
    assert _most(*[(0.0, 10.0)] * 4) == 4  # four that start and end together


def test_an_execution_without_end_runs_on_and_a_clock_step_takes_nothing_off() -> None:
    assert _most((1.0, math.inf), (100.0, 101.0), (200.0, 201.0)) == 2
    assert _most() == 0
    # One whose end is before its start (a clock step between its lines) is taken as an instant at its start: it
    # must not be subtracted from the one still running then (taken as is, the sweep would say 1).
    assert _most((0.0, 5.0), (3.0, 1.0)) == 2


def test_concurrency_per_key_one_key() -> None:
    by_task = {"a": [_ex("a", 1, 0.0, 2.0)], "b": [_ex("b", 1, 1.0, 3.0)], "c": [_ex("c", 1, 3.0, 4.0)]}
    assert max_concurrency_per_key(by_task, {"a": "g0", "b": "g0", "c": "g0"}) == {"g0": 2}


def test_concurrency_is_counted_per_key_and_tasks_without_a_key_are_left_out() -> None:
    by_task = {
        "a": [_ex("a", 1, 0.0, 2.0)], "b": [_ex("b", 1, 1.0, 3.0)],  # g0: two at once
        "c": [_ex("c", 1, 0.5, 2.5)], "d": [_ex("d", 1, 2.6, 4.0)],  # g1: one after the other
        "pre": [_ex("pre", 1, 0.0, 9.0)],  # a pre-flight task: no key
    }  # fmt: skip
    assert max_concurrency_per_key(by_task, {"a": "g0", "b": "g0", "c": "g1", "d": "g1"}) == {"g0": 2, "g1": 1}


def test_one_lease_in_two_processes_is_one_execution_but_two_leases_are_two() -> None:
    # A process-mode handler and its worker both record token 1 of task a.
    one_lease = {"a": [_ex("a", 1, 1.0, 3.0, pid=1), _ex("a", 1, 1.2, 3.1, pid=2)]}
    merged = executions_by_key(one_lease, {"a": "g0"})["g0"]
    assert [(ex.start, ex.end) for ex in merged] == [(1.0, 3.1)]
    assert [(ex.start, ex.end) for ex in one_lease["a"]] == [(1.0, 3.0), (1.2, 3.1)]  # the ledger's own are not changed
    assert max_concurrency_per_key(one_lease, {"a": "g0"}) == {"g0": 1}
    # A re-execution under a newer token while the old one still ran is two at once (what the ledger calls an overlap).
    two_leases = {"a": [_ex("a", 1, 1.0, 3.0), _ex("a", 2, 2.0, 4.0, pid=2)]}
    assert max_concurrency_per_key(two_leases, {"a": "g0"}) == {"g0": 2}


# ---------------------------------------------------------------- the report's section


def test_section_lag_per_group_and_class() -> None:
    plan = GroupPlan(groups=3, flood=3)
    tasks = [
        GroupedTask("f1", 0, 1_000, flood=True), GroupedTask("f2", 0, 1_000, flood=True),
        GroupedTask("f3", 0, 1_000, flood=True), GroupedTask("y0", 0, 5_000),  # y0: g0's share of the timed load
        GroupedTask("x1", 1, 2_000), GroupedTask("x2", 2, 2_500), GroupedTask("x3", 1, 3_000),
    ]  # fmt: skip
    by_task = {
        "f1": [_ex("f1", 1, 1.0, 1.5)], "f2": [_ex("f2", 1, 1.2, 2.0)], "f3": [_ex("f3", 1, 3.5, 4.0)],
        "y0": [_ex("y0", 1, 9.0, 9.5)],  # lag 4000 ms; not a flood task
        "x1": [_ex("x1", 1, 2.1, 2.2), _ex("x1", 2, 2.9, 3.0)],  # first start counts: lag 100 ms
        "x2": [_ex("x2", 1, 2.8, 2.9)],  # lag 300 ms
        # x3: never started
    }  # fmt: skip
    first_start = {t: min(e.start for e in runs) for t, runs in by_task.items()}
    section = group_section(plan, tasks, first_start, by_task, BurstStats(requested=4, accepted=3, failed=1, seconds=0.5))

    flood, others = section["classes"]["flood"], section["classes"]["others"]
    assert (flood["count"], flood["started"]) == (4, 4)
    assert flood["start_lag_ms"]["p50"] == 200 and flood["start_lag_ms"]["max"] == 4000
    assert (others["count"], others["started"]) == (3, 2) and others["keys"] == "g1..g2"
    assert others["start_lag_ms"]["p50"] == 100 and others["start_lag_ms"]["max"] == 300
    rows = {r["key"]: r for r in section["per_group"]}
    assert list(rows) == ["g0", "g1", "g2"]
    assert (rows["g1"]["count"], rows["g1"]["started"], rows["g1"]["start_lag_ms"]["max"]) == (2, 1, 100)
    assert rows["g2"]["start_lag_ms"]["max"] == 300
    # The most at once per row: g0's f1 and f2 overlap (1.2..1.5); g1's x1 ran twice, one after the other; g2 once.
    assert [rows[k]["max_concurrent"] for k in ("g0", "g1", "g2")] == [2, 1, 1]
    # When x1 was due (2.0 s) f1 and f2 had started; f3 (started 3.5 s) waited. y0 was not due yet.
    assert section["g0_backlog_when_others_first_due"] == 1
    mc = section["max_concurrency"]
    assert (mc["max_over_keys"], mc["key"], mc["g0"], mc["others_max"], mc["keys_seen"]) == (2, "g0", 2, 1, 3)
    assert mc["per_key"] == {"g0": 2, "g1": 1, "g2": 1}
    burst = section["flood_burst"]
    assert (burst["accepted"], burst["failed"], burst["accepted_per_s"]) == (3, 1, 6.0)
    # 3 flood tasks finished between the first flood start (1.0) and the last flood end (4.0); y0 is no flood task.
    assert (burst["executed"], burst["execution_span_s"], burst["executed_per_s"]) == (3, 3.0, 1.0)


def test_section_keeps_at_most_a_dozen_group_rows() -> None:
    plan = GroupPlan(groups=40)
    section = group_section(plan, [GroupedTask("t", 39, 0)], {}, {}, BurstStats())
    assert len(section["per_group"]) == 12 and section["per_group_rows_left_out"] == 28
    assert section["classes"]["others"]["count"] == 1 and section["classes"]["others"]["started"] == 0
    assert section["max_concurrency"]["max_over_keys"] is None and section["flood_burst"]["executed_per_s"] is None
    assert section["per_group"][0]["max_concurrent"] is None  # no execution seen: not "0 at once"
    assert group_section(plan, [GroupedTask("t", 0, 0)], {}, {}, BurstStats())["g0_backlog_when_others_first_due"] is None


def test_backlog_counts_g0_tasks_due_and_not_started_including_never_started() -> None:
    tasks = [GroupedTask("a", 0, 1_000), GroupedTask("b", 0, 1_000), GroupedTask("c", 0, 1_500), GroupedTask("x", 1, 2_000)]
    # a started before x was due, b after it, c never: two waited.
    assert backlog_when_others_due(tasks, {"a": 1.5, "b": 2.5, "x": 2.1}) == 2
