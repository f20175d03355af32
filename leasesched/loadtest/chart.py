"""The PNG chart of one load test: rates over time, latency percentiles over
time, and the distribution of dispatch lag / per-method latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw(report: dict[str, Any], path: Path) -> None:
    s = report["series"]
    x = s["second"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 11), constrained_layout=True)
    opts = report["run"]["options"]
    title = (
        f"leasesched loadtest {report['run']['label'] or report['run']['id']} — target schedule {opts['schedule_rate']:.0f}/s, "
        f"poll {opts['poll_rate']:.0f}/s, {opts['duration_s']:.0f} s, commitlog {report['run']['cluster']['commitlog_sync']}"
    )
    fig.suptitle(title, fontsize=11)

    ax1.plot(x, s["schedule"]["ok"], label="ScheduleTask OK/s", color="tab:blue")
    ax1.plot(x, s["poll"]["ok"], label="PollTask OK/s", color="tab:green")
    ax1.plot(x, s["schedule"]["sent"], label="ScheduleTask sent/s", color="tab:blue", linestyle=":", linewidth=0.9)
    ax1.plot(x, s["poll"]["sent"], label="PollTask sent/s", color="tab:green", linestyle=":", linewidth=0.9)
    ax1.plot(x, s["completed"], label="tasks completed/s (end to end)", color="tab:red")
    if any(s.get("executed", [])) and s.get("executed") != s["completed"]:
        ax1.plot(x, s["executed"][: len(x)], label="executions/s incl. unacknowledged schedules", color="tab:red",
                 linestyle=":", linewidth=0.9)  # fmt: skip
    errors = [a + b for a, b in zip(s["schedule"]["errors"], s["poll"]["errors"])]
    if any(errors):
        ax1.plot(x, errors, label="errors/s", color="black", linestyle="-.", linewidth=0.9)
    ax1.axhline(opts["schedule_rate"], color="tab:blue", linestyle="--", linewidth=0.8, alpha=0.6)
    ax1.axhline(opts["poll_rate"], color="tab:green", linestyle="--", linewidth=0.8, alpha=0.6)
    ax1.axvline(opts["duration_s"], color="grey", linestyle="--", linewidth=0.8)
    ax1.text(opts["duration_s"], ax1.get_ylim()[1] * 0.95, " load ends, drain", color="grey", fontsize=8, va="top")
    ax1.set_ylabel("per second")
    ax1.set_xlabel("seconds since load start")
    ax1.set_title("rates (dashed: targets; dotted: requests actually sent, by the second they left)", fontsize=10)
    ax1.legend(loc="upper right", fontsize=8)
    ax1.grid(alpha=0.3)

    for method, color in (("schedule", "tab:blue"), ("poll", "tab:green")):
        p50 = [v if v is not None else float("nan") for v in s[method]["p50_ms"]]
        p99 = [v if v is not None else float("nan") for v in s[method]["p99_ms"]]
        name = "ScheduleTask" if method == "schedule" else "PollTask"
        ax2.plot(x, p50, color=color, label=f"{name} p50")
        ax2.plot(x, p99, color=color, linestyle="--", label=f"{name} p99")
    ax2.axhline(50, color="tab:red", linewidth=0.8, linestyle=":", label="50 ms")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency ms (log)")
    ax2.set_xlabel("seconds since load start")
    ax2.set_title("RPC latency per second, from intended send time", fontsize=10)
    ax2.legend(loc="upper left", fontsize=8, ncol=3)
    ax2.grid(alpha=0.3, which="both")

    rows = [
        ("ScheduleTask", report["schedule"]["latency_ms"]),
        ("PollTask", report["poll"]["latency_ms"]),
        ("dispatch lag", report["dispatch_lag_ms"]),
        ("immediate sched→start", report["immediate_schedule_to_start_ms"]),
    ]
    labels = ["p50", "p95", "p99", "max"]
    width = 0.2
    for i, key in enumerate(labels):
        vals = [max(0.01, (r.get(key) or 0.0)) for _, r in rows]
        bars = ax3.bar([j + (i - 1.5) * width for j in range(len(rows))], vals, width, label=key)
        for b, v in zip(bars, vals):
            ax3.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax3.set_xticks(range(len(rows)))
    ax3.set_xticklabels([name for name, _ in rows])
    ax3.set_yscale("log")
    ax3.set_ylabel("ms (log)")
    t = report["tasks"]
    ax3.set_title(
        f"whole-run percentiles — lost {t['lost']}, overlaps {t['overlaps']}, completed {t['completed_per_s']}/s, "
        f"efficiency {report['efficiency']['value']}",
        fontsize=10,
    )
    ax3.legend(fontsize=8)
    ax3.grid(alpha=0.3, axis="y", which="both")
    fig.savefig(path, dpi=90)
    plt.close(fig)
