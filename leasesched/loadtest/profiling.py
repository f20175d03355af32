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


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top functions by own samples and by inclusive samples, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            inclusive[f] += n
    pct = lambda c: [{"function": f, "samples": n, "pct": round(100.0 * n / total, 1)} for f, n in c.most_common(top)]  # noqa: E731
    return {"samples": total, "top_own": pct(own), "top_inclusive": pct(inclusive)}


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})" if where else name
