"""py-spy profiles of chosen processes during the load (``--profile ROLE``).

``py-spy record`` samples a running Python process from outside (no code
change, no restart). For each profiled process the run keeps a flame graph
(SVG) and the collapsed stacks, and reports the functions with the most
samples, by own time and by time including callees.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, folder: Path, rate: int = 100) -> None:
        self.folder = folder
        self.rate = rate
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, pid: int, seconds: float) -> bool:
        exe = py_spy()
        if exe is None:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        raw = self.folder / f"profile-{name}.txt"
        argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(self.rate),
                "--format", "raw", "--output", str(raw), "--nonblocking"]  # fmt: skip
        log = open(self.folder / f"profile-{name}.log", "wb")
        self._procs.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), raw))
        return True

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, proc, raw in self._procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out[name] = summarize(raw) if raw.exists() else {"error": f"no profile (see profile-{name}.log)"}
            out[name]["collapsed_stacks"] = str(raw)
        self._procs.clear()
        return out


# Leaf frames that mean "this thread is waiting", not "this thread burns CPU".
_WAITING = ("select (selectors.py)", "Condition.wait (threading.py)", "_run_loop (io/libevreactor.py)", "poll (", "wait (threading.py)")
# Frames every stack has (entry points, the event loop itself): useless in an inclusive ranking.
_BOILERPLATE = ("click/", "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py", "threading.py", "<module>",
                "cli/main.py", "cli/process_cmd.py", "futures/thread.py")  # fmt: skip


def _package(frame: str) -> str:
    """Which body of code a leaf frame belongs to."""
    where = frame.partition(" (")[2]
    checks = (
        ("cassandra/", "cassandra-driver"),
        ("grpc", "grpc"),
        ("google/protobuf", "protobuf"),
        ("kazoo/", "kazoo"),
        ("asyncio/", "asyncio"),
        ("leasesched/", "leasesched"),
        ("services/", "leasesched"),
        ("trigger/", "leasesched"),
        ("worker/", "leasesched"),
        ("collections/", "namedtuple (the driver's row factory)"),
        ("<string>", "namedtuple (the driver's row factory)"),
        ("threading.py", "threading"),
    )
    for needle, name in checks:
        if where.startswith(needle) or f"/{needle}" in where:
            return name
    return "stdlib/other"


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the busiest functions by own samples and
    including callees (waits and boilerplate frames left out), and own samples by package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = _short(frames[-1])
        if any(w in leaf for w in _WAITING):
            packages["(waiting: select/epoll/condition)"] += n
            continue
        busy += n
        own[leaf] += n
        packages[_package(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            if not any(b in f for b in _BOILERPLATE):
                inclusive[f] += n

    def pct(c: Counter[str], of: int) -> list[dict[str, Any]]:
        return [{"function": f, "samples": n, "pct": round(100.0 * n / of, 1)} for f, n in c.most_common(top)] if of else []

    return {
        "samples": total,
        "busy_samples": busy,
        "by_package_pct_of_all": {k: round(100.0 * v / total, 1) for k, v in packages.most_common()} if total else {},
        "top_own_pct_of_busy": pct(own, busy),
        "top_inclusive_pct_of_busy": pct(inclusive, busy),
    }


def _short(frame: str) -> str:
    # "function (/path/to/pkg/module.py:123)" -> "function (pkg/module.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})" if where else name
