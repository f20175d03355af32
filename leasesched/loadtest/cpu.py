"""CPU seconds per process (user + system, children included) over a window."""

from __future__ import annotations

import os
from typing import Any

import psutil


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its children so far; None if it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "loadtest-client": os.getpid()}
        self._start: dict[str, float | None] = {}
        self._machine_start: Any = None
        self._t_start = 0.0

    def start(self, now: float) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine_start = psutil.cpu_times()
        self._t_start = now

    def stop(self, now: float) -> dict[str, Any]:
        seconds = max(1e-9, now - self._t_start)
        per_process: dict[str, Any] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), cpu_seconds(pid)
            if before is None or after is None:
                per_process[name] = None
                continue
            used = after - before
            per_process[name] = {"cpu_s": round(used, 2), "cores": round(used / seconds, 2)}
        m0, m1 = self._machine_start, psutil.cpu_times()
        busy = lambda t: t.user + t.system + t.nice + t.irq + t.softirq + getattr(t, "steal", 0.0)  # noqa: E731
        total = lambda t: busy(t) + t.idle + getattr(t, "iowait", 0.0)  # noqa: E731
        machine_busy = (busy(m1) - busy(m0)) / max(1e-9, total(m1) - total(m0))
        ours = sum(v["cpu_s"] for v in per_process.values() if v)
        return {
            "window_s": round(seconds, 2),
            "per_process": per_process,
            "ours_cpu_s": round(ours, 2),
            "machine_busy_fraction": round(machine_busy, 3),
            "machine_cores": psutil.cpu_count(),
            # Everything else on the machine (other users' processes, the kernel) over the window.
            "others_cpu_s": round(max(0.0, machine_busy * psutil.cpu_count() * seconds - ours), 2),
        }
