"""A Markdown table of several load-test reports (for BENCHMARKS.md).

    .venv/bin/python -m leasesched.loadtest.table results/*/report.json
    .venv/bin/python -m leasesched.loadtest.table --schedules results/*/report.json   # the periodic-schedule columns
    .venv/bin/python -m leasesched.loadtest.table --groups results/*/report.json      # the concurrency-key group columns
    .venv/bin/python -m leasesched.loadtest.table --flow results/*/report.json        # the limit and gate columns
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(v: Any, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def row(r: dict[str, Any]) -> list[str]:
    o, s, p, t = r["run"]["options"], r["schedule"], r["poll"], r["tasks"]
    cpu = r["cpu"]
    errors = sum(s["errors"].values()) + sum(p["errors"].values())
    return [
        r["run"]["label"] or r["run"]["id"],
        r["run"]["cluster"]["commitlog_sync"],
        f"{o['schedule_rate']:.0f} / {o['poll_rate']:.0f}",
        f"{_f(s['achieved_ok_per_s'], 1)} / {_f(p['achieved_ok_per_s'], 1)}",
        f"{_f(s['latency_ms']['p50'])} / {_f(s['latency_ms']['p99'])}",
        f"{_f(p['latency_ms']['p50'])} / {_f(p['latency_ms']['p99'])}",
        _f(t["completed_per_s"], 1),
        f"{_f(r['dispatch_lag_ms']['p50'])} / {_f(r['dispatch_lag_ms']['p99'])}",
        _f(r["immediate_schedule_to_start_ms"]["p50"]),
        str(errors),
        f"{t['lost']} / {t['overlaps']}",
        f"{_f((r.get('store_probe') or {}).get('lwt_writes', {}).get('per_s'))}",
        _f(r["efficiency"]["value"], 2),
        f"{100 * cpu['machine_busy_fraction']:.0f}% ({cpu['others_cpu_s']:.0f} s)",
        " ".join(_f(x, 1) for x in r["run"]["machine"]["loadavg_before"][:1]),
    ]


HEADER = [
    "run", "commit log", "target sched/poll per s", "achieved sched/poll per s", "sched p50/p99 ms",
    "poll p50/p99 ms", "completed/s", "dispatch lag p50/p99 ms", "immediate start p50 ms", "RPC errors",
    "lost/overlaps", "store LWT/s", "efficiency", "machine busy (others' CPU s)", "load avg before",
]  # fmt: skip


def schedule_row(r: dict[str, Any]) -> list[str]:
    """The periodic-schedule figures of one report (``--schedules`` runs)."""
    sc, cpu = r["schedules"], r["cpu"]
    per_fire = sc["cpu_ms_per_fire"]
    return [
        r["run"]["label"] or r["run"]["id"],
        f"{sc['schedules']} × {sc['every_s']:g} s",
        _f(sc["offered_fires_per_s"], 1),
        _f(sc["fired_per_s_in_window"], 1),
        f"{sc['expected']} / {sc['found']}",
        f"{sc['missed']} / {sc['duplicates']} / {sc['overlaps']}",
        f"{_f(sc['firing_lag_ms']['p50'])} / {_f(sc['firing_lag_ms']['p99'])} / {_f(sc['firing_lag_ms']['max'])}",
        f"{_f(sc['creation_lag_ms']['p50'])} / {_f(sc['creation_lag_ms']['p99'])}",
        f"{sc['counters']['fired_total']} / {sc['counters']['skipped_total']}",
        f"{_f(per_fire.get('store'), 1)} / {_f(per_fire.get('python'), 1)}",
        f"{100 * cpu['machine_busy_fraction']:.0f}% ({cpu['others_cpu_s']:.0f} s)",
    ]


SCHEDULE_HEADER = [
    "run", "schedules × every", "offered fires/s", "fired/s", "expected / found", "missed / duplicates / overlaps",
    "firing lag p50/p99/max ms", "creation lag p50/p99 ms", "fired_total / skipped_total", "CPU ms per fire, Cassandra / Python",
    "machine busy (others' CPU s)",
]  # fmt: skip


def group_row(r: dict[str, Any]) -> list[str]:
    """The concurrency-key group figures of one report (``--groups`` runs)."""
    g, t = r["groups"], r["tasks"]
    b, c, mc = g["flood_burst"], g["classes"], g["max_concurrency"]

    def lag(row: dict[str, Any]) -> str:
        x = row["start_lag_ms"]
        return f"{_f(x['p50'])} / {_f(x['p99'])} / {_f(x['max'])} (n {row['started']}/{row['count']})"

    return [
        r["run"]["label"] or r["run"]["id"],
        f"{g['groups']} (g0 share {g['flood_share']:g})",
        f"{b['accepted']} in {_f(b['seconds'], 1)} s",
        _f(b["executed_per_s"], 1),
        _f(g.get("g0_backlog_when_others_first_due")),
        lag(c["others"]),
        lag(c["flood"]),
        f"{_f(mc['max_over_keys'])} / {_f(mc.get('g0'))} / {_f(mc['others_max'])}",
        f"{t['lost']} / {t['overlaps']}",
        f"{100 * r['cpu']['machine_busy_fraction']:.0f}% ({r['cpu']['others_cpu_s']:.0f} s)",
    ]


GROUP_HEADER = [
    "run", "groups", "flood burst accepted", "flood executed/s", "g0 backlog when others due", "others start lag p50/p99/max ms",
    "g0 start lag p50/p99/max ms", "max concurrency per key: any / g0 / others", "lost/overlaps",
    "machine busy (others' CPU s)",
]  # fmt: skip

def flow_row(r: dict[str, Any]) -> list[str]:
    """The limit and gate figures of one report (``--limit-per-key`` / ``--gate-rate`` runs)."""
    f, t, g = r["flow"], r["tasks"], r.get("groups")
    lim, gate = f.get("limit"), f.get("gate")
    ctd = r.get("cpu_through_drain") or {}
    per = ctd.get("cpu_ms_per_execution") or {}

    def lag(row: dict[str, Any]) -> str:
        x = row["start_lag_ms"]
        return f"{_f(x['p50'])} / {_f(x['p99'])} / {_f(x['max'])} (n {row['started']}/{row['count']})"

    def window(w: dict[str, Any]) -> str:
        return f"{w['max_starts']} / {w['bound']:g} ({w['ratio']:g})"

    return [
        r["run"]["label"] or r["run"]["id"],
        ", ".join(x for x in (
            f"{lim['max_running']} per key" if lim else "",
            f"gate {gate['rate']:g}/s burst {gate['burst']}" if gate else "",
        ) if x),
        str(t["accepted"]),
        f"{_f(lim['max_over_keys'])} ({lim['key']}) / {lim['max_running']}" + ("" if lim["held"] else " OVER") if lim else "–",
        lag(g["classes"]["others"]) if g else "–",
        lag(g["classes"]["flood"]) if g else "–",
        f"{_f(gate['achieved_per_s'], 2)} ({_f(gate['achieved_over_rate'], 3)})" if gate else "–",
        " ; ".join(window(w) for w in gate["windows"]) if gate else "–",
        f"{t['lost']} / {t['overlaps']}",
        f"{_f(per.get('store'), 1)} / {_f(per.get('python'), 1)}",
        f"{100 * ctd.get('machine_busy_fraction', 0):.0f}% ({_f(ctd.get('others_cpu_s'), 0)} s)",
    ]  # fmt: skip


FLOW_HEADER = [
    "run", "flow", "tasks", "most at once per key (key) / limit", "small groups' start lag p50/p99/max ms",
    "g0 start lag p50/p99/max ms", "gate: starts/s (÷ rate)", "busiest 1 s ; 10 s: starts / rate×w+burst (ratio)",
    "lost/overlaps", "CPU ms per execution, Cassandra / Python (load + drain)", "machine busy (others' CPU s)",
]  # fmt: skip

MODES = {
    "--schedules": ("schedules", SCHEDULE_HEADER, schedule_row),
    "--groups": ("groups", GROUP_HEADER, group_row),
    "--flow": ("flow", FLOW_HEADER, flow_row),
}


def main(paths: list[str]) -> None:
    mode = next((MODES[p] for p in paths if p in MODES), None)
    reports = [json.loads(Path(p).read_text()) for p in paths if p not in MODES]
    header, make = (mode[1], mode[2]) if mode else (HEADER, row)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in reports:
        if mode is None or r.get(mode[0]):
            print("| " + " | ".join(make(r)) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
