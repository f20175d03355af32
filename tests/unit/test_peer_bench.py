"""The peer benchmark's pure parts (issue 17): its overlap count and the table beside leasesched.

No Redis, no Celery: made-up ledger records and a made-up leasesched report.
"""

from __future__ import annotations

import json

import pytest

from leasesched.loadtest.ledger import exit_record
from leasesched.loadtest.peers.results import (
    CpuUse,
    DrainResult,
    Latency,
    OverlapCheck,
    PeerResult,
    RateResult,
    Row,
    comparison,
    from_dict,
    machine_line,
    overlap_check,
    render,
    to_dict,
)


def run(task_id: str, token: int, pid: int, start: float, end: float | None) -> list[dict[str, object]]:
    """One Celery execution as the task writes it: START, and END unless it was cut off."""
    base = {"task_id": task_id, "token": token, "attempt": 1, "worker": "w", "pid": pid}
    lines: list[dict[str, object]] = [{"event": "start", **base, "t": start}]
    if end is not None:
        lines.append({"event": "end", **base, "t": end, "how": "returned", "stopped": False})
    return lines


def test_a_redelivered_task_running_beside_its_first_execution_is_one_overlap() -> None:
    records = [*run("a", 1, 10, 100.0, 105.0), *run("a", 2, 11, 103.0, 108.0)]
    check = overlap_check(records, ["a"], handler_s=5, visibility_s=2, concurrency=4)
    assert (check.executions, check.re_executions, check.overlaps) == (2, 1, 1)
    assert check.examples and check.examples[0].startswith("a:")


def test_a_redelivery_after_the_first_execution_ended_is_a_re_execution_not_an_overlap() -> None:
    records = [*run("a", 1, 10, 100.0, 105.0), *run("a", 2, 11, 105.5, 110.0)]
    check = overlap_check(records, ["a"], handler_s=5, visibility_s=2, concurrency=4)
    assert (check.executions, check.re_executions, check.overlaps) == (2, 1, 0)


def test_only_the_checks_own_tasks_count_and_a_stopped_worker_ends_what_it_left_running() -> None:
    records = [
        *run("a", 1, 10, 100.0, None),  # cut off: its worker was stopped at 106
        exit_record(10, 106.0),
        *run("a", 2, 11, 107.0, 112.0),  # after that: no overlap
        *run("other", 3, 12, 100.0, 110.0),  # another phase's task overlapping in time: not this check's
        *run("other", 4, 13, 101.0, 111.0),
    ]
    check = overlap_check(records, ["a"], handler_s=5, visibility_s=2, concurrency=4)
    assert (check.tasks, check.executions, check.overlaps) == (1, 2, 0)


def cpu(worker: float, redis: float, executed: int) -> CpuUse:
    return CpuUse(window_s=30.0, executed=executed, worker_cpu_s=worker, redis_cpu_s=redis, client_cpu_s=1.0,
                  machine_busy_fraction=0.5, others_cpu_s=3.0)  # fmt: skip


def peer() -> PeerResult:
    def rate(r: float, p50: float, cpu_use: CpuUse, lost: int = 0) -> RateResult:
        return RateResult(rate=r, seconds=30.0, sent=int(30 * r), executed=int(30 * r), executed_per_s=r,
                          send_lag=Latency(0.1, 1.0, 2.0, int(30 * r)), start_latency=Latency(p50, 30.0, 40.0, int(30 * r)),
                          lost=lost, overlaps=0, cpu=cpu_use)  # fmt: skip

    return PeerResult(
        system="Celery + Redis", versions={"celery": "5.6.3"}, started_at="2026-12-04T15:00:00Z", folder="/r",
        concurrency=2,
        drain=DrainResult(tasks=20_000, enqueue_s=10.0, enqueue_per_s=2000.0, executed=20_000, execute_s=25.0,
                          executed_per_s=800.0, lost=0, overlaps=0, cpu=cpu(30.0, 10.0, 20_000)),
        rates=[rate(500.0, 1.0, cpu(20.0, 5.0, 15_000), lost=1), rate(100.0, 2.0, cpu(6.0, 3.0, 3000))],
        overlap_check=OverlapCheck(tasks=2, handler_s=5, visibility_timeout_s=2, concurrency=4, executions=6,
                                   re_executions=4, overlaps=4),
    )  # fmt: skip


def report(rate: float = 100.0) -> dict[str, object]:
    """The parts of a leasesched ``report.json`` the table reads."""
    return {
        "run": {"options": {"schedule_rate": rate}, "label": "peers-leasesched"},
        "schedule": {"achieved_ok_per_s": rate},
        "tasks": {"completed_per_s": 99.5, "lost": 0, "overlaps": 0},
        "cpu_through_drain": {"cpu_ms_per_execution": {"store": 9.0, "python": 4.5}},
        "immediate_schedule_to_start_ms": {"p50": 135.0, "p99": 600.0},
    }


def by_measure(rows: list[Row]) -> dict[str, Row]:
    return {r.measure: r for r in rows}


def test_the_table_sets_leasesched_beside_the_peers_phase_at_the_same_rate() -> None:
    rows = by_measure(comparison(report(100.0), peer()))
    cpu_row = rows["CPU ms per task, server side at 100/s offered"]
    assert (cpu_row.leasesched, cpu_row.celery) == (13.5, 3.0)  # 9 + 4.5; (6 + 3) CPU s ÷ 3,000 tasks
    assert cpu_row.ratio == pytest.approx(4.5)
    start = rows["schedule→start p50 ms at 100/s offered"]
    assert (start.leasesched, start.celery, start.ratio) == (135.0, 2.0, 67.5)  # the 100/s phase, not the 500/s one
    assert rows["executed tasks/s at 100/s offered"].celery == 100.0
    assert rows["executed tasks/s draining a full queue"].celery == 800.0
    assert rows["lost tasks (all phases)"].celery == 1  # summed over every phase
    overlap = rows["overlapping executions, handler past the lease / visibility timeout"]
    assert (overlap.leasesched, overlap.celery) == (None, 4.0)


def test_a_rate_the_peer_did_not_run_and_a_zero_give_no_ratio() -> None:
    rows = by_measure(comparison(report(250.0), peer()))
    row = rows["CPU ms per task, server side at 250/s offered"]
    assert row.celery is None and row.ratio is None
    assert Row("x", 1.0, 0.0).ratio is None
    assert Row("x", None, 2.0).ratio is None
    assert Row("x", 3.0, 2.0).ratio == 1.5


def test_the_table_renders_every_row_with_its_ratio() -> None:
    text = render(comparison(report(100.0), peer()))
    lines = text.splitlines()
    assert lines[0].startswith("| measure | leasesched | Celery + Redis | leasesched ÷ Celery")
    assert len(lines) == 2 + len(comparison(report(100.0), peer()))
    assert "| CPU ms per task, server side at 100/s offered | 13.5 | 3 | 4.50× |" in text


def test_peer_json_reads_back_as_it_was_written() -> None:
    original = peer()
    written = json.loads(json.dumps(to_dict(original)))
    assert written["drain"]["cpu"]["server_ms_per_task"] == 2.0  # (30 + 10) CPU s ÷ 20,000 tasks
    assert from_dict(written) == original


def test_the_machine_line_says_how_busy_the_machine_was_for_each_measurement() -> None:
    r = {**report(100.0), "cpu_through_drain": {"cpu_ms_per_execution": {}, "machine_busy_fraction": 0.9, "others_cpu_s": 70}}
    line = machine_line(r, peer())
    assert "leasesched load + drain: 90 % busy, others 70 CPU s" in line
    assert "Celery at 100/s: 50 % busy, others 3 CPU s" in line
