"""The load-test harness on a real cluster, at a low rate: its report must add up.

This checks the harness, not the speed: a few seconds of open-loop load
against real processes (TaskService, TaskUpdater, a trigger, a bench worker)
on the session's Cassandra and ZooKeeper, then the report's counts, its
correctness figures (lost = 0, overlaps = 0) and its files.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from leasesched.infra.local import LocalInfra
from leasesched.loadtest.report import text_summary
from leasesched.loadtest.runner import LoadOptions, LoadTest
from leasesched.loadtest.table import FLOW_HEADER, flow_row, group_row


def test_loadtest_report_adds_up(infra: LocalInfra, tmp_path: Path) -> None:
    opts = LoadOptions(
        schedule_rate=20,
        poll_rate=40,
        duration_s=4,
        delayed_fraction=0.25,
        delay_min_s=1,
        delay_max_s=2,
        payload_bytes=128,
        handler_ms=5,
        priority_min=0,
        priority_max=9,
        idempotency_keys=True,
        drain_s=25,
        probe_s=1,
        probe_concurrency=16,
        progress=False,
        triggers=1,
        workers=1,
        slots=16,
        start_infra=False,
        results_dir=str(tmp_path),
        label="test",
    )
    report = LoadTest(opts, infra.config).run()

    assert report["consistent"], report["checks"]
    s, p, t = report["schedule"], report["poll"], report["tasks"]
    # Open loop: every due request was sent (nothing held back at this rate), and answered.
    assert s["sent"] == 80 and not s["not_sent"], s
    assert p["sent"] == 160 and not p["not_sent"], p
    assert s["ok"] + sum(s["errors"].values()) == s["sent"]
    assert t["accepted"] == s["ok"] + 10  # + the pre-flight tasks
    assert t["immediate"] + t["delayed"] == t["accepted"]
    # Correctness: nothing lost, no overlap; every task ran to the end (all were due within the drain).
    assert t["lost"] == 0 and t["overlaps"] == 0, t
    assert t["by_status"] == {"SUCCEEDED": t["accepted"]}, t["by_status"]
    assert t["tasks_started"] == t["accepted"] and t["executions"] >= t["accepted"]
    assert report["dispatch_lag_ms"]["n"] == t["accepted"]
    assert report["immediate_schedule_to_start_ms"]["n"] == t["immediate"]
    assert report["targets"]["lost"]["met"] and report["targets"]["overlaps"]["met"]
    # Where an immediate task's time to its start went (issue 17): every first START carries the trigger's and
    # the worker's times, so every stage has every immediate task; one clock, so none is negative.
    st = report["immediate_stages_ms"]
    assert st["tasks"] == st["with_timings"] == t["immediate"], st
    assert [x["name"] for x in st["stages"]] == [
        "schedule_call", "to_due_seen", "trigger_queue", "stream", "worker_queue", "claim", "to_start",
    ]  # fmt: skip
    for stage in [*st["stages"], st["total"]]:
        assert stage["n"] == t["immediate"], stage
        assert 0 <= stage["min"] <= stage["p50"] <= stage["p99"] <= stage["max"] < math.inf, stage
    assert st["total"]["p50"] == report["immediate_schedule_to_start_ms"]["p50"]
    assert "immediate stages" in text_summary(report)
    # Completions in the load window are counted from the tasks' own finish times.
    assert 0 < t["completed_in_window"] <= t["accepted"]
    assert sum(report["series"]["completed"]) == t["by_status"]["SUCCEEDED"]
    assert sum(report["series"]["schedule"]["ok"]) == s["ok"]
    # The store probe ran in the same run; the efficiency uses 4 LWTs per task (idempotency keys).
    probe = report["store_probe"]
    assert probe["plain_writes"]["per_s"] > 0 and probe["lwt_writes"]["per_s"] > 0
    assert report["efficiency"]["lwt_per_task"] == 4 and report["efficiency"]["value"] > 0
    cpu = report["cpu"]["per_process"]
    for name in ("task-service", "task-updater", "trigger-1", "worker-1", "loadtest-client"):
        assert cpu[name] is not None and cpu[name]["cpu_s"] >= 0, name
    # The files.
    folder = Path(report["files"]["folder"])
    assert json.loads((folder / "report.json").read_text())["run"]["id"] == report["run"]["id"]
    assert (folder / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # tasks.csv: one row per accepted task, each finished after it started, which was not before it was due
    # (50 ms of slack, as in the life-cycle tests: in-memory timers run on the monotonic clock, the columns are wall time).
    with open(report["files"]["tasks"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == t["accepted"] and len({r["task_id"] for r in rows}) == len(rows)
    # A run without --groups has the fields it always had: no groups section, options or column.
    assert "groups" not in report and not {"groups", "flood", "flood_share"} & set(report["run"]["options"])
    assert "flow" not in report and not {"limit_per_key", "gate_rate", "gate_burst"} & set(report["run"]["options"])
    assert list(rows[0]) == ["task_id", "immediate", "sent_ms", "run_at_ms", "first_start_ms", "finished_ms", "status"]
    for row in rows:
        assert row["status"] == "SUCCEEDED", row
        assert int(row["run_at_ms"]) - 50 <= int(row["first_start_ms"]) <= int(row["finished_ms"]) + 50, row


def test_loadtest_schedules_fire_every_slot_once(infra: LocalInfra, tmp_path: Path) -> None:
    """20 schedules every second for 10 s, no other load: every slot has exactly
    one task, each executed once, and the firing lag is measured."""
    opts = LoadOptions(
        schedule_rate=0, poll_rate=0, duration_s=10, drain_s=30, probe_s=0, progress=False, triggers=1, workers=1,
        slots=16, start_infra=False, results_dir=str(tmp_path), label="schedules",
        schedules=20, schedule_every_s=1, schedule_jitter_s=0.2,
    )  # fmt: skip
    report = LoadTest(opts, infra.config).run()

    sc = report["schedules"]
    assert report["consistent"], report["checks"]
    assert sc["expected"] == 200 and sc["found"] == 200, sc
    assert sc["missed"] == 0 and sc["duplicates"] == 0 and sc["unexpected"] == 0, sc
    assert sc["overlaps"] == 0 and sc["executed_more_than_once"] == 0 and sc["never_executed"] == 0, sc
    assert sc["by_status"] == {"SUCCEEDED": 200} and sc["not_terminal"] == 0, sc
    assert sc["firing_lag_ms"]["n"] == 200 and sc["firing_lag_ms"]["p99"] is not None and sc["firing_lag_ms"]["p50"] >= 0
    assert sc["creation_lag_ms"]["n"] == 200
    assert sc["counters"] == {"fired_total": 200, "skipped_total": 0, "described": 20, "errors": 0}, sc["counters"]
    assert report["drain"]["schedules"]["not_deleted"] == 0
    # Slot tasks are the schedules', not unacknowledged ScheduleTask answers.
    assert report["tasks"]["executed_not_accepted"] == 0
    assert "schedules" in json.loads((Path(report["files"]["folder"]) / "report.json").read_text())


def test_loadtest_groups_report_lag_per_group_and_concurrency_per_key(infra: LocalInfra, tmp_path: Path) -> None:
    """4 groups, half of the load for g0 and a burst of 60 g0 tasks before it:
    the report has the per-group section, its counts add up, every key came
    back from the store as sent, and no key ran more at once than there are slots."""
    opts = LoadOptions(
        schedule_rate=20, poll_rate=0, duration_s=3, delayed_fraction=0, payload_bytes=64, handler_ms=20, drain_s=40,
        probe_s=0, progress=False, triggers=1, workers=1, slots=4, start_infra=False, results_dir=str(tmp_path),
        label="groups", groups=4, flood_share=0.5, flood=60,
    )  # fmt: skip
    report = LoadTest(opts, infra.config).run()

    assert report["consistent"], report["checks"]
    assert report["checks"]["group_keys_round_trip"]  # every task's TaskView names the key it was scheduled with
    s, t, g = report["schedule"], report["tasks"], report["groups"]
    assert s["sent"] == 60 and s["ok"] == 60, s
    assert t["accepted"] == 60 + 60 + 10  # timed load + flood + pre-flight (the pre-flight tasks have no key)
    assert t["lost"] == 0 and t["overlaps"] == 0 and t["by_status"] == {"SUCCEEDED": t["accepted"]}, t
    assert report["run"]["options"]["groups"] == 4 and report["run"]["options"]["flood"] == 60

    burst = g["flood_burst"]
    assert (burst["requested"], burst["accepted"], burst["failed"]) == (60, 60, 0), burst
    assert burst["executed"] == 60 and burst["executed_per_s"] > 0 and burst["accepted_per_s"] > 0
    flood, others = g["classes"]["flood"], g["classes"]["others"]
    # Timed load: 30 tasks for g0 (share 0.5), 10 each for g1..g3; the flood's 60 are g0's too.
    assert (flood["count"], flood["started"], others["count"], others["started"]) == (90, 90, 30, 30), g["classes"]
    assert [(r["key"], r["count"], r["started"]) for r in g["per_group"]] == [("g0", 90, 90), ("g1", 10, 10), ("g2", 10, 10), ("g3", 10, 10)]
    for row in [flood, others, *g["per_group"]]:
        lag = row["start_lag_ms"]
        assert lag["n"] == row["count"]
        # Wall clocks of two processes: the same 50 ms of slack as tasks.csv's check above.
        assert -50 <= lag["p50"] <= lag["p99"] <= lag["max"], row
    mc = g["max_concurrency"]
    assert mc["keys_seen"] == 4
    assert 1 <= mc["others_max"] <= mc["max_over_keys"] <= opts.workers * opts.slots, mc
    assert 1 <= mc["g0"] <= mc["max_over_keys"], mc

    with open(report["files"]["tasks"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["group"] for r in rows}) == ["", "g0", "g1", "g2", "g3"]
    assert sum(1 for r in rows if r["group"] == "g0") == 90 and sum(1 for r in rows if not r["group"]) == 10
    assert 0 <= g["g0_backlog_when_others_first_due"] <= 90
    assert "flood g0" in text_summary(report) and len(group_row(report)) == 10
    assert json.loads((Path(report["files"]["folder"]) / "report.json").read_text())["groups"]["groups"] == 4


def test_loadtest_limit_and_gate_report_what_ran(infra: LocalInfra, tmp_path: Path) -> None:
    """3 groups under a default key limit of 2, every task through a gate of
    10/s burst 3, a burst of 20 g0 tasks before the load: the limit and the
    gate are set up and removed, every task names the gate, no key ran more
    than 2 at once, and the gated starts stay within rate × w + burst (two
    more allowed: the ledger sees handler starts, after dispatch jitter)."""
    opts = LoadOptions(
        schedule_rate=10, poll_rate=0, duration_s=2, delayed_fraction=0, payload_bytes=64, handler_ms=300, drain_s=60,
        probe_s=0, progress=False, triggers=1, workers=1, slots=8, start_infra=False, results_dir=str(tmp_path),
        label="flow", groups=3, flood_share=0.5, flood=20, limit_per_key=2, gate_rate=10.0, gate_burst=3,
    )  # fmt: skip
    report = LoadTest(opts, infra.config).run()

    assert report["consistent"], report["checks"]
    assert report["checks"]["gate_names_round_trip"] and report["checks"]["group_keys_round_trip"]
    t, f = report["tasks"], report["flow"]
    assert t["accepted"] == 20 + 20 + 10 and t["lost"] == 0 and t["overlaps"] == 0, t
    assert t["by_status"] == {"SUCCEEDED": t["accepted"]}, t
    assert f["setup"]["limit"]["max_running"] == 2 and f["setup"]["gate"]["rate"] == 10.0 and f["setup"]["removed"], f["setup"]
    lim, gate = f["limit"], f["gate"]
    assert lim["held"] and lim["max_over_keys"] <= 2 and lim["keys_seen"] == 3, lim
    assert gate["tasks"] == 40 and gate["tasks_started"] == 40 and gate["starts"] >= 40, gate  # the pre-flight ten are not gated
    for w in gate["windows"]:
        assert w["max_starts"] <= w["bound"] + 2, gate
    assert gate["achieved_per_s"] is not None and gate["achieved_per_s"] <= 10.0 * 1.2, gate
    assert report["run"]["options"]["limit_per_key"] == 2
    assert report["cpu_through_drain"]["executions"] >= 40
    assert "limit         at most 2 per key" in text_summary(report) and len(flow_row(report)) == len(FLOW_HEADER)
