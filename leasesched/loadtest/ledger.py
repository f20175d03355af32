"""Reading the benchmark's execution ledger (see ``bench_handlers``).

An execution is one (task id, lease token) pair: it starts at its START line
and lasts until its END line, or, without an END (its process died, or it is
still running), until the end of time. Two executions of one task overlap when
the later one starts before the earlier one ended: exactly what "at most one
concurrent execution" forbids.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Execution:
    task_id: str
    token: int
    attempt: int = 0
    start: float | None = None
    end: float = math.inf  # no END line: it may still be working
    stopped: bool = False
    pid: int = 0


@dataclass
class LedgerSummary:
    executions: int
    tasks_started: int
    re_executions: int
    unfinished: int  # executions without an END line
    overlaps: list[str] = field(default_factory=list)
    first_start: dict[str, float] = field(default_factory=dict)  # task id → first start (wall time)
    ends: list[float] = field(default_factory=list)  # END times of executions that were not stopped
    bad_lines: int = 0


class LedgerTail:
    """Counts START and END lines as the file grows (for the live progress bar)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.starts = 0
        self.ends = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        cut = chunk.rfind(b"\n") + 1  # only whole lines
        whole = chunk[:cut]
        self._offset += cut
        self.starts += whole.count(b'"e":"s"')
        self.ends += whole.count(b'"e":"e"')


def read(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"e": "?"})  # a torn line (a process killed mid-write)
    return records


def summarize(records: list[dict[str, Any]], killed_at: dict[int, float] | None = None) -> LedgerSummary:
    """Executions, re-executions and overlaps; ``killed_at``: pid → time it was killed."""
    killed_at = killed_at or {}
    executions: dict[tuple[str, int], Execution] = {}
    bad = 0
    for r in records:
        if r.get("e") not in ("s", "e") or "id" not in r:
            bad += 1
            continue
        key = (r["id"], int(r["k"]))
        ex = executions.get(key)
        if ex is None:
            ex = executions[key] = Execution(task_id=r["id"], token=int(r["k"]))
        if r["e"] == "s":
            ex.start = float(r["t"])
            ex.attempt = int(r.get("a", 0))
            ex.pid = int(r.get("p", 0))
        else:
            ex.end = float(r["t"])
            ex.stopped = bool(r.get("x"))
    by_task: dict[str, list[Execution]] = defaultdict(list)
    unfinished = 0
    for ex in executions.values():
        if ex.start is None:
            bad += 1  # an END without its START: a torn ledger
            continue
        if math.isinf(ex.end):
            unfinished += 1
            ex.end = killed_at.get(ex.pid, math.inf)
        by_task[ex.task_id].append(ex)
    overlaps: list[str] = []
    first_start: dict[str, float] = {}
    ends: list[float] = []
    for task_id, runs in by_task.items():
        runs.sort(key=lambda e: e.start or 0.0)
        first_start[task_id] = runs[0].start or 0.0
        latest: Execution | None = None  # the execution that worked latest so far
        for ex in runs:
            if latest is not None and latest.end >= (ex.start or 0.0):
                overlaps.append(
                    f"{task_id}: token {latest.token} worked until {latest.end:.3f}, token {ex.token} started {ex.start:.3f}"
                )
            if latest is None or ex.end > latest.end:
                latest = ex
        ends.extend(e.end for e in runs if not e.stopped and not math.isinf(e.end))
    return LedgerSummary(
        executions=sum(len(r) for r in by_task.values()),
        tasks_started=len(by_task),
        re_executions=sum(len(r) - 1 for r in by_task.values()),
        unfinished=unfinished,
        overlaps=overlaps,
        first_start=first_start,
        ends=ends,
        bad_lines=bad,
    )
