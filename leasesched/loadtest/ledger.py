"""The execution ledger: what handlers really ran, and the two checks of "at most once".

One module for the chaos tests (``tests/chaos_handlers.py``) and the benchmark
(``worker/bench_handlers.py``): the same writer, the same format, the same checker.

Why it records execution, not belief: a handler that ignores its context keeps
running after its worker stopped believing in the lease; only the handler's own
code can say when it really ran. So every execution writes, to one JSON-lines
file (one ``write`` per line on an ``O_APPEND`` descriptor: lines of concurrent
processes never interleave)::

    {"event":"start","task_id":…,"token":<lease token>,"attempt":…,"worker":…,"pid":…,"t":<wall time>,
     "timings":<optional: {"due_seen_at":…, "dispatched_at":…, "received_at":…, "claim_sent_at":…, "claimed_at":…}>}
    {"event":"end", …same keys…, "t":<wall time it really stopped>, "how":"returned"|"raised"|"cancelled",
     "stopped":<it stopped early because its context told it to>, "worked_until":<optional, see below>}

``timings`` (optional, and each of its keys too; wall times) are the handler's
``ctx.timings`` (``worker.handlers.TaskTimings``): where the time from "due" to
this start went, for the load report's stage breakdown; no check reads them.
Written by ``LedgerWriter.execution`` where the handler's code starts and in its
``finally`` (also on ``CancelledError``). A handler whose work is a sequence of
steps, each taken only after checking ``ctx.cancelled``, calls ``step()`` right
before each one; its END then carries ``worked_until``, the real time of its
last step, and the execution counts until then (the time after that was spent
noticing it must stop, and doing nothing). Handlers that do not call ``step()``
count until their real END.

A process killed with SIGKILL or ending itself (the worker's fail-stop exit 75)
writes no END. Whoever watches it (the test, the harness) appends::

    {"event":"exit","pid":…,"t":<wall time its end was observed>,"code":<exit status, if known>}

and an execution without END in that pid ends at the earliest such time (an
observation is never earlier than the death, so this can only lengthen it).
An execution with neither END nor exit may still be running: it lasts forever.

A handler that makes a fenced write (``worker.fencing``) records each one it
saw answered (a write cut off by its process's end records nothing)::

    {"event":"fenced","task_id":…,"token":…,"pid":…,"sent":<wall time before the write>,
     "t":<wall time of the answer>,"applied":<true, or false: refused as stale>}

The checks (``check``):

* overlap: per task, no two executions under DIFFERENT lease tokens overlap in
  time (touching counts as overlapping);
* store: independently of the other executions, each execution under token t
  lies inside [the claim of t was accepted, the first of: a newer token was
  issued, a report under t was accepted], from the TaskUpdater's own log lines
  (``store_events_from_logs``). A report (complete, fail, cancel, release,
  timeout) under t means the worker said it was done with t: nothing may run
  under t afterwards.

And for fenced writes (``check_fenced``): no write under token t that was sent
after a write under a newer token t' had been applied (answered) may apply.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# The TaskUpdater logs "ts" in whole milliseconds, cut down: the real moment is up to 1 ms later.
LOG_RESOLUTION_S = 0.001
# The fields of ``worker.handlers.TaskTimings`` a START carries under "timings", in path order.
TIMING_KEYS = ("due_seen_at", "dispatched_at", "received_at", "claim_sent_at", "claimed_at")


# ---------------------------------------------------------------- writing


class _Context(Protocol):
    """What the writer needs of a handler's ``worker.handlers.TaskContext``.

    Its ``timings`` too when it has them (``timings_of``): left out of the
    protocol so that a context without them (older workers, tests) still fits."""

    @property
    def task_id(self) -> str: ...

    @property
    def lease_token(self) -> int: ...

    @property
    def attempt(self) -> int: ...

    @property
    def worker_id(self) -> str: ...


def timings_of(ctx: object) -> dict[str, float]:
    """The known times of ``ctx.timings`` (``worker.handlers.TaskTimings``) by
    name; {} for a context without them."""
    timings = getattr(ctx, "timings", None)
    found: dict[str, float] = {}
    for key in TIMING_KEYS:
        value = getattr(timings, key, None)
        if isinstance(value, (int, float)):
            found[key] = float(value)
    return found


@dataclass
class Running:
    """The handler's side of one execution while it runs."""

    worked_until: float | None = None
    stopped: bool = False

    def step(self) -> None:
        """Call right before each step of work, after checking that the handler may go on."""
        self.worked_until = time.time()


class LedgerWriter:
    """Appends ledger lines to the file named by the environment variable ``env``
    (nothing when it is unset). The descriptor is opened per process, so a
    process-mode handler's child writes through its own."""

    def __init__(self, env: str) -> None:
        self.env = env
        self._fd: int | None = None
        self._pid = 0

    def append(self, record: dict[str, Any]) -> None:
        if self._fd is None or self._pid != os.getpid():
            path = os.environ.get(self.env)
            if not path:
                return
            self._fd, self._pid = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), os.getpid()
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    @contextmanager
    def execution(self, ctx: _Context) -> Iterator[Running]:
        """START now, END when the block is left, however it is left."""
        base = {"task_id": ctx.task_id, "token": ctx.lease_token, "attempt": ctx.attempt, "worker": ctx.worker_id,
                "pid": os.getpid()}  # fmt: skip
        start: dict[str, Any] = {"event": "start", **base, "t": time.time()}
        timings = timings_of(ctx)
        if timings:
            start["timings"] = timings
        self.append(start)
        running = Running()
        how = "raised"
        try:
            yield running
            how = "returned"
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        finally:
            end: dict[str, Any] = {"event": "end", **base, "t": time.time(), "how": how, "stopped": running.stopped}
            if running.worked_until is not None:
                end["worked_until"] = running.worked_until
            self.append(end)


    def fenced(self, ctx: _Context, sent: float, applied: bool) -> None:
        """One answered fenced write of this execution (``sent``: wall time before it)."""
        self.append({"event": "fenced", "task_id": ctx.task_id, "token": ctx.lease_token, "pid": os.getpid(),
                     "sent": sent, "t": time.time(), "applied": applied})  # fmt: skip


def exit_record(pid: int, t: float, code: int | None = None) -> dict[str, Any]:
    """The line a watcher appends when it saw process ``pid`` gone at ``t``."""
    return {"event": "exit", "pid": pid, "t": t, "code": code}


def append_record(path: Path, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading


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
        self.starts += whole.count(b'"event":"start"')
        self.ends += whole.count(b'"event":"end"')


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
                records.append({"event": "?"})  # a torn line (a process killed mid-write)
    return records


# ---------------------------------------------------------------- checking


@dataclass
class Execution:
    task_id: str
    token: int
    attempt: int
    pid: int
    start: float
    end: float = math.inf  # until known: it may still be working
    ended: str = "open"  # "end" (its END line) | "exit" (its process was seen gone) | "open"
    stopped: bool = False
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # its START's (TIMING_KEYS), {} without

    def describe(self) -> str:
        until = "still running" if math.isinf(self.end) else f"{self.end:.3f} ({self.ended})"
        return f"token {self.token} (pid {self.pid}) {self.start:.3f} → {until}"


@dataclass
class StoreEvents:
    """What the store accepted and when, per (task id, lease token)."""

    claims: dict[tuple[str, int], float] = field(default_factory=dict)
    reports: dict[tuple[str, int], float] = field(default_factory=dict)  # the first report accepted under it


@dataclass
class LedgerSummary:
    executions: int
    tasks_started: int
    re_executions: int
    unfinished: int  # executions without an END line (killed, ended itself, or still running)
    overlaps: list[str] = field(default_factory=list)
    store_violations: list[str] = field(default_factory=list)  # empty when no store events were given
    still_running: list[str] = field(default_factory=list)  # neither END nor an observed exit
    first_start: dict[str, float] = field(default_factory=dict)  # task id → first start (wall time)
    ends: list[float] = field(default_factory=list)  # END times of executions that were not stopped
    bad_lines: int = 0
    by_task: dict[str, list[Execution]] = field(default_factory=dict, repr=False)
    overlapping: list[tuple[Execution, Execution]] = field(default_factory=list, repr=False)  # the overlaps' executions
    store_offenders: list[Execution] = field(default_factory=list, repr=False)  # the store violations' executions


def executions(records: Iterable[dict[str, Any]], exits: dict[int, float] | None = None) -> tuple[list[Execution], int]:
    """The executions in ``records`` (and the number of lines that were no use).

    ``exits``: pid → when it was seen gone, besides the ledger's exit lines; the earliest wins.
    """
    gone: dict[int, float] = dict(exits or {})
    open_runs: dict[tuple[str, int, int], Execution] = {}
    done: list[Execution] = []
    bad = 0
    for r in records:
        event = r.get("event")
        try:
            if event == "start":
                ex = Execution(task_id=r["task_id"], token=int(r["token"]), attempt=int(r.get("attempt", 0)),
                               pid=int(r.get("pid", 0)), start=float(r["t"]), worker=str(r.get("worker", "")),
                               timings=_timings(r.get("timings")))  # fmt: skip
                key = (ex.task_id, ex.token, ex.pid)
                if key in open_runs:
                    done.append(open_runs[key])  # a second START under one token in one process: both count
                open_runs[key] = ex
            elif event == "end":
                found = open_runs.pop((r["task_id"], int(r["token"]), int(r.get("pid", 0))), None)
                if found is None:
                    bad += 1  # an END without its START: a torn ledger
                    continue
                worked_until = r.get("worked_until")
                found.end = float(r["t"] if worked_until is None else worked_until)
                found.ended = "end"
                found.stopped = bool(r.get("stopped"))
                done.append(found)
            elif event == "exit":
                pid, t = int(r["pid"]), float(r["t"])
                gone[pid] = min(t, gone.get(pid, math.inf))
            elif event == "fenced":
                continue  # judged by check_fenced
            else:
                bad += 1
        except (KeyError, TypeError, ValueError):
            bad += 1
    for ex in open_runs.values():
        if ex.pid in gone:
            ex.end, ex.ended = max(ex.start, gone[ex.pid]), "exit"
        done.append(ex)
    return done, bad


def _timings(found: Any) -> dict[str, float]:
    """A START's "timings", the known keys with numbers only (diagnostics: a bad one is dropped, not fatal)."""
    if not isinstance(found, dict):
        return {}
    return {k: float(v) for k, v in found.items() if k in TIMING_KEYS and isinstance(v, (int, float))}


def max_concurrent(runs: Iterable[Execution]) -> int:
    """The most executions running at one moment (a concurrency limit's check):
    touching counts as overlapping, as in the overlap check, so an execution
    that starts the instant another ends counts both."""
    events = sorted([(ex.start, 0) for ex in runs] + [(ex.end, 1) for ex in runs])  # starts first at a tie
    running = most = 0
    for _, kind in events:
        running += 1 if kind == 0 else -1
        most = max(most, running)
    return most


def check(
    records: Iterable[dict[str, Any]],
    store: StoreEvents | None = None,
    exits: dict[int, float] | None = None,
) -> LedgerSummary:
    """Both checks over one ledger; the store check only when ``store`` is given."""
    runs, bad = executions(records, exits)
    by_task: dict[str, list[Execution]] = defaultdict(list)
    for ex in runs:
        by_task[ex.task_id].append(ex)
    overlaps: list[str] = []
    overlapping: list[tuple[Execution, Execution]] = []
    for task_id, task_runs in by_task.items():
        task_runs.sort(key=lambda e: e.start)
        for i, a in enumerate(task_runs):
            for b in task_runs[i + 1 :]:
                if b.start > a.end:
                    continue  # b starts later; later ones too, but a longer earlier one may still reach them
                if a.token != b.token:
                    overlaps.append(f"{task_id}: {a.describe()} overlaps {b.describe()}")
                    overlapping.append((a, b))
    store_offenders: list[Execution] = []
    store_violations = check_store(runs, store, store_offenders) if store is not None else []
    return LedgerSummary(
        executions=len(runs),
        tasks_started=len(by_task),
        re_executions=sum(len(r) - 1 for r in by_task.values()),
        unfinished=sum(1 for e in runs if e.ended != "end"),
        overlaps=overlaps,
        store_violations=store_violations,
        still_running=[f"{e.task_id}: {e.describe()}" for e in runs if e.ended == "open"],
        first_start={t: r[0].start for t, r in by_task.items()},
        ends=[e.end for e in runs if e.ended == "end" and not e.stopped],
        bad_lines=bad,
        by_task=dict(by_task),
        overlapping=overlapping,
        store_offenders=store_offenders,
    )


def summarize(records: list[dict[str, Any]], killed_at: dict[int, float] | None = None) -> LedgerSummary:
    """The overlap check alone (the load harness has no store log to read)."""
    return check(records, exits=killed_at)


def check_store(runs: Iterable[Execution], store: StoreEvents, offenders: list[Execution] | None = None) -> list[str]:
    """Each execution under token t inside [claim of t accepted, newer token issued or report under t accepted].

    The executions that break it are also appended to ``offenders``, when given."""
    offenders = [] if offenders is None else offenders
    tokens: dict[str, list[int]] = defaultdict(list)
    for task_id, token in store.claims:
        tokens[task_id].append(token)
    for found in tokens.values():
        found.sort()
    violations: list[str] = []
    for ex in runs:
        claimed = store.claims.get((ex.task_id, ex.token))
        if claimed is None:
            violations.append(f"{ex.task_id}: {ex.describe()}: the store never accepted a claim of token {ex.token}")
            offenders.append(ex)
            continue
        if ex.start < claimed:
            violations.append(f"{ex.task_id}: {ex.describe()} started before its claim was accepted at {claimed:.3f}")
            offenders.append(ex)
        limits: list[tuple[float, str]] = []
        newer = [t for t in tokens[ex.task_id] if t > ex.token]
        if newer:
            limits.append((store.claims[(ex.task_id, newer[0])], f"token {newer[0]} claimed"))
        if (ex.task_id, ex.token) in store.reports:
            limits.append((store.reports[(ex.task_id, ex.token)], f"a report under token {ex.token} accepted"))
        if limits:
            limit, what = min(limits)
            if ex.end > limit + LOG_RESOLUTION_S:
                violations.append(f"{ex.task_id}: {ex.describe()} ran past {what} at {limit:.3f}")
                offenders.append(ex)
    return violations


@dataclass
class FencedWrite:
    task_id: str
    token: int
    pid: int
    sent: float
    answered: float
    applied: bool


@dataclass
class FenceVerdict:
    writes: list[FencedWrite]
    stale_applied: list[str]  # writes that applied although a newer token had written before they were sent

    @property
    def refused(self) -> int:
        return sum(1 for w in self.writes if not w.applied)


def check_fenced(records: Iterable[dict[str, Any]]) -> FenceVerdict:
    """Fenced writes: none under token t sent after a newer token's write was applied may apply.

    Sound with wall times of one machine: the newer write's answer came
    before the older one was even sent, so the resource had the newer token
    when it judged the older write."""
    writes = [
        FencedWrite(str(r["task_id"]), int(r["token"]), int(r.get("pid", 0)), float(r["sent"]), float(r["t"]), bool(r["applied"]))
        for r in records
        if r.get("event") == "fenced"
    ]
    first_applied: dict[str, dict[int, float]] = defaultdict(dict)  # task → token → its first applied write answered
    for w in writes:
        if w.applied:
            tokens = first_applied[w.task_id]
            tokens[w.token] = min(w.answered, tokens.get(w.token, math.inf))
    stale: list[str] = []
    for w in writes:
        if not w.applied:
            continue
        newer = [at for token, at in first_applied[w.task_id].items() if token > w.token and at < w.sent]
        if newer:
            stale.append(f"{w.task_id}: token {w.token} (pid {w.pid}) wrote at {w.sent:.3f}, after a newer token's write at {min(newer):.3f}")
    return FenceVerdict(writes, stale)


def _log_time(ts: str) -> float:
    """``2025-01-31T12:00:00.123Z`` (leasesched.observability.logs) → epoch seconds."""
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000


def store_events_from_logs(records: Iterable[dict[str, Any]]) -> StoreEvents:
    """Claims and reports from TaskUpdater JSON log records.

    A TaskUpdater logs one line per accepted claim (field
    ``lease_event="claimed"``) and per accepted report (complete or fail:
    ``lease_event="reported"``), after the store accepted it and before it
    answers, with ``task_id`` and ``lease_token`` fields. The line's time is
    therefore a little after the acceptance: a claim's START can never precede
    it, and it bounds the moment a newer token existed from above. The
    messages are for people and may change; the fields are the contract.
    """
    events = StoreEvents()
    for r in records:
        kind = r.get("lease_event")
        if kind not in ("claimed", "reported") or "lease_token" not in r or "task_id" not in r:
            continue
        key = (str(r["task_id"]), int(r["lease_token"]))
        at = _log_time(str(r["ts"]))
        found = events.claims if kind == "claimed" else events.reports
        found[key] = min(at, found.get(key, math.inf))
    return events
