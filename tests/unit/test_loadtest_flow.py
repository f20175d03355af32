"""The load harness's limit and gate report (``leasesched.loadtest.flow``), over
ledger records as the bench workers write them.

What is checked is what would make a run lie: a limit breach the sweep
misses (it must see the executions of a key together, and never per task),
a gate's busiest window counted in fixed buckets instead of sliding (a burst
straddling a second boundary would be split), or with a half-open window
(the bucket's ``burst`` at t and ``rate × w`` more by t + w are both inside
the promise), and an achieved rate that counts n starts over n − 1 gaps."""

from __future__ import annotations

from typing import Any

import pytest

from leasesched.loadtest.flow import (
    FlowPlan,
    busiest_window,
    flow_lines,
    flow_section,
    gate_section,
    gate_starts,
    limit_section,
    start_rate,
)
from leasesched.loadtest.ledger import Execution, check
from leasesched.loadtest.report import cpu_per_execution


def _records(runs: list[tuple[str, int, float, float]]) -> list[dict[str, Any]]:
    """START and END lines as ``LedgerWriter.execution`` writes them: (task, token, start, end)."""
    out: list[dict[str, Any]] = []
    for task, token, start, end in runs:
        base = {"task_id": task, "token": token, "attempt": token, "worker": "w1", "pid": 7}
        out.append({"event": "start", **base, "t": start})
        out.append({"event": "end", **base, "t": end, "how": "returned", "stopped": False})
    out.sort(key=lambda r: r["t"])
    return out


def _by_task(runs: list[tuple[str, int, float, float]]) -> dict[str, list[Execution]]:
    return check(_records(runs)).by_task


# ---------------------------------------------------------------- options


def test_the_plan_from_options() -> None:
    assert FlowPlan.from_options(None, None, None, 0, "ab12") is None
    plan = FlowPlan.from_options(5, 20.0, 5, 20, "ab12")
    assert plan is not None
    assert (plan.limit_per_key, plan.limit_name, plan.gate_rate, plan.gate_burst, plan.gate_name) == (5, "*", 20.0, 5, "load-ab12")
    gate_only = FlowPlan.from_options(None, 2.5, None, 0, "cd34")
    assert gate_only is not None and gate_only.gate_burst == 1 and gate_only.limit_per_key is None


@pytest.mark.parametrize(
    "limit, rate, burst, groups, message",
    [
        (5, None, None, 0, "needs --groups"),  # no key on any task: no key limit would hold them
        (None, None, 5, 3, "--gate-burst needs --gate-rate"),
        (0, None, None, 3, "within 1..1000"),
        (1001, None, None, 3, "within 1..1000"),
        (None, 0.0, None, 0, "must be > 0"),
        (None, float("inf"), None, 0, "must be > 0"),
        (None, 1.0, 0, 0, "--gate-burst must be"),
    ],
)  # fmt: skip
def test_options_that_do_not_fit_are_refused(limit: int | None, rate: float | None, burst: int | None, groups: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowPlan.from_options(limit, rate, burst, groups, "ab12")


# ---------------------------------------------------------------- the limit


def test_a_breach_is_seen_across_tasks_of_one_key_and_not_across_keys() -> None:
    runs = [
        # g0: three tasks overlap at 1.5..2.0; never two of one task.
        ("a", 1, 0.0, 2.0), ("b", 1, 1.0, 3.0), ("c", 1, 1.5, 2.5),
        # g1: two at once; g2: one after the other.
        ("d", 1, 0.0, 2.0), ("e", 1, 1.0, 3.0),
        ("f", 1, 0.0, 1.0), ("g", 1, 1.5, 2.0),
        ("pre", 1, 0.0, 9.0),  # a pre-flight task: no key, held by no key limit
    ]  # fmt: skip
    key_of = {"a": "g0", "b": "g0", "c": "g0", "d": "g1", "e": "g1", "f": "g2", "g": "g2"}
    plan = FlowPlan(limit_per_key=2)
    f = flow_section(plan, _by_task(runs), key_of, [], {})
    lim = f["limit"]
    assert (lim["max_over_keys"], lim["key"], lim["keys_seen"]) == (3, "g0", 3)
    assert lim["keys_over_limit"] == {"g0": 3} and lim["held"] is False and lim["used"] is True
    assert "gate" not in f
    # The same runs under a limit of 3: held, and used.
    f3 = flow_section(FlowPlan(limit_per_key=3), _by_task(runs), key_of, [], {})
    assert f3["limit"]["held"] is True and f3["limit"]["keys_over_limit"] == {}


def test_a_re_execution_under_a_new_lease_counts_toward_its_key() -> None:
    # Task a's lease lapsed and it ran again while its first run still went on: two of g0 at once.
    runs = [("a", 1, 0.0, 5.0), ("a", 2, 3.0, 4.0)]
    assert flow_section(FlowPlan(limit_per_key=1), _by_task(runs), {"a": "g0"}, [], {})["limit"]["keys_over_limit"] == {"g0": 2}


def test_a_limit_never_reached_says_so() -> None:
    lim = limit_section(5, {"g0": 3, "g1": 1})
    assert lim["held"] is True and lim["used"] is False and lim["max_over_keys"] == 3
    empty = limit_section(5, {})
    assert (empty["max_over_keys"], empty["key"], empty["used"], empty["held"]) == (None, None, False, True)
    # A tie names the first key in order, so two reports of one run read alike.
    assert limit_section(2, {"g3": 2, "g1": 2})["key"] == "g1"


# ---------------------------------------------------------------- the gate


def test_the_busiest_window_slides_and_includes_both_ends() -> None:
    # Fixed one-second buckets would see 1 + 3; the window from 0.9 holds all four.
    assert busiest_window([1.8, 0.9, 1.1, 1.0], 1.0) == (4, 0.9)
    # A start exactly w after another is inside [t, t + w].
    assert busiest_window([0.0, 1.0], 1.0)[0] == 2
    assert busiest_window([0.0, 1.0000001], 1.0)[0] == 1
    assert busiest_window([], 1.0) == (0, None)
    assert busiest_window([5.0] * 7, 1.0) == (7, 5.0)


def test_the_achieved_rate_counts_gaps_not_starts() -> None:
    assert start_rate([k / 20 for k in range(400)]) == pytest.approx(20.0)  # n / span would say 20.05
    assert start_rate([3.0]) is None and start_rate([]) is None and start_rate([2.0, 2.0]) is None


def test_every_execution_of_a_gated_task_took_a_token() -> None:
    by_task = _by_task([("a", 1, 0.0, 0.1), ("a", 2, 5.0, 5.1), ("b", 1, 1.0, 1.1), ("free", 1, 2.0, 2.1)])
    assert gate_starts(by_task, ["a", "b", "never"]) == [0.0, 1.0, 5.0]


def _bucket_output(rate: float, burst: int, n: int) -> list[tuple[str, int, float, float]]:
    """What a full token bucket lets start at the most: ``burst`` at 0, then one every 1/rate."""
    starts = [0.0] * burst + [k / rate for k in range(1, n - burst + 1)]
    return [(f"t{i}", 1, s, s + 0.01) for i, s in enumerate(starts)]


def test_a_gate_used_to_its_bound_holds_and_one_more_start_breaks_it() -> None:
    runs = _bucket_output(20.0, 5, 400)
    gated = [task for task, *_ in runs]
    g = gate_section(20.0, 5, gated, _by_task(runs))
    assert (g["tasks"], g["tasks_started"], g["starts"]) == (400, 400, 400)
    w1, w10 = g["windows"]
    assert (w1["seconds"], w1["max_starts"], w1["bound"], w1["at"], w1["within"]) == (1.0, 25, 25.0, 0.0, True)
    assert (w10["max_starts"], w10["bound"], w10["within"]) == (205, 205.0, True)
    assert g["held"] is True
    assert g["span_s"] == pytest.approx(19.75) and g["achieved_per_s"] == pytest.approx(399 / 19.75, abs=0.01)
    # One extra start inside the first second: 26 in a window that allows 25.
    extra = runs + [("x", 1, 0.5, 0.51)]
    g2 = gate_section(20.0, 5, gated + ["x"], _by_task(extra))
    assert g2["windows"][0]["max_starts"] == 26 and g2["windows"][0]["ratio"] == pytest.approx(26 / 25, abs=0.001)
    assert g2["held"] is False


def test_a_gate_no_task_started_through() -> None:
    g = gate_section(20.0, 5, ["a", "b"], {})
    assert (g["tasks"], g["tasks_started"], g["starts"], g["achieved_per_s"], g["span_s"]) == (2, 0, 0, None, None)
    assert g["held"] is True and [w["max_starts"] for w in g["windows"]] == [0, 0]


def test_the_section_and_its_lines() -> None:
    plan = FlowPlan(limit_per_key=2, gate_rate=20.0, gate_burst=5, gate_name="load-ab12")
    runs = _bucket_output(20.0, 5, 40)
    gated = [task for task, *_ in runs]
    f = flow_section(plan, _by_task(runs), {t: "g0" for t in gated}, gated, {"removed": False, "errors": ["gate: boom"]})
    assert f["gate"]["name"] == "load-ab12" and f["limit"]["max_over_keys"] == 5  # the burst's five at 0.0
    text = "\n".join(flow_lines(f))
    assert "OVER on {'g0': 5}" in text and "load-ab12 20/s burst 5" in text and "gate: boom" in text


# ---------------------------------------------------------------- CPU per execution


def test_cpu_per_execution_counts_the_load_and_the_drain_and_only_our_processes() -> None:
    cpu = {
        "window_s": 30.0, "began_wall": 100.0, "ended_wall": 130.0, "machine_busy_fraction": 0.9, "others_cpu_s": 4.0,
        "per_process": {
            "cassandra": {"cpu_s": 6.0, "cores": 0.2}, "zookeeper": {"cpu_s": 1.0, "cores": 0.03},
            "task-service": {"cpu_s": 2.0, "cores": 0.07}, "trigger-1": {"cpu_s": 1.0, "cores": 0.03},
            "loadtest-client": {"cpu_s": 5.0, "cores": 0.2}, "worker-1": None,  # gone before the meter stopped
        },
    }  # fmt: skip
    ends = [99.0] + [100.0 + k * 0.01 for k in range(3000)] + [131.0]  # one before, one after the window
    out = cpu_per_execution(cpu, ends)
    assert out["executions"] == 3000
    assert (out["store_cpu_s"], out["python_cpu_s"]) == (6.0, 3.0)
    assert out["cpu_ms_per_execution"] == {"store": 2.0, "python": 1.0}
    assert cpu_per_execution(cpu, [])["cpu_ms_per_execution"] == {"store": None, "python": None}
