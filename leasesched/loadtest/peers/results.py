"""The peer's results as typed records, its overlap count, and the table beside leasesched.

Nothing here needs Celery or Redis: the harness (``celery_peer``) fills these
records, and the table reads them with a leasesched ``report.json`` (the
report ``leasesched loadtest`` writes), so both can be tested on made-up
figures.

The comparison is of like with like:

* throughput: tasks executed per second; at the offered rate of leasesched's
  run, and (Celery only) draining a queue filled as fast as the client can;
* CPU per task: CPU seconds of the server side — for leasesched its store
  (Cassandra) and its Python processes (TaskService, TaskUpdater, triggers,
  workers), from the load's start to the drain's end; for Celery its worker
  (main process and pool children) and redis-server, from the phase's start
  to its last END — divided by the executions that ended in that window. The
  load generators and ZooKeeper are left out on both sides;
* schedule→start: the first START in the ledger minus the moment the task
  was due to be sent (open loop), for tasks due at once;
* lost: sent (accepted) but never finished; overlaps: two executions of one
  task running at the same time, by the project's one ledger checker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from leasesched.loadtest import ledger as ledger_mod
from leasesched.loadtest.metrics import percentiles


@dataclass
class Latency:
    """Percentiles in milliseconds (None when nothing was measured)."""

    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    n: int

    @classmethod
    def of(cls, values_ms: Iterable[float]) -> "Latency":
        p = percentiles(list(values_ms))
        return cls(p50_ms=p["p50"], p99_ms=p["p99"], max_ms=p["max"], n=int(p["n"] or 0))


@dataclass
class CpuUse:
    """CPU seconds of one phase per process group, and per executed task."""

    window_s: float
    executed: int
    worker_cpu_s: float  # the Celery worker's main process and its pool children
    redis_cpu_s: float
    client_cpu_s: float  # the enqueuer (this process)
    machine_busy_fraction: float
    others_cpu_s: float  # everything else on the machine over the window

    @property
    def server_ms_per_task(self) -> float | None:
        """Worker + Redis CPU milliseconds per executed task: the figure set beside leasesched's."""
        return round(1000.0 * (self.worker_cpu_s + self.redis_cpu_s) / self.executed, 3) if self.executed else None

    @property
    def client_ms_per_task(self) -> float | None:
        return round(1000.0 * self.client_cpu_s / self.executed, 3) if self.executed else None


@dataclass
class DrainResult:
    """(a) Enqueue ``tasks`` no-op tasks as fast as one client can, while the worker drains them."""

    tasks: int
    enqueue_s: float
    enqueue_per_s: float
    executed: int
    execute_s: float  # first START to last END
    executed_per_s: float
    lost: int  # sent, never finished by the phase's deadline
    overlaps: int
    cpu: CpuUse


@dataclass
class RateResult:
    """(c) Open loop: immediate tasks sent at ``rate`` per second for ``seconds``."""

    rate: float
    seconds: float
    sent: int
    executed: int
    executed_per_s: float  # executions that ended in the send window ÷ its length
    send_lag: Latency  # how late the client sent (past its schedule): the offered load's honesty
    start_latency: Latency  # first START − intended send time
    lost: int
    overlaps: int
    cpu: CpuUse


@dataclass
class OverlapCheck:
    """(d) Tasks whose handler outlives the Redis transport's visibility timeout, acks_late.

    Celery hands such a task to another worker process while the first still
    runs it: ``overlaps`` counts the pairs of executions of one task that ran
    at the same time (``ledger.check``), ``re_executions`` the executions
    beyond the first."""

    tasks: int
    handler_s: float
    visibility_timeout_s: float
    concurrency: int
    executions: int
    re_executions: int
    overlaps: int
    examples: list[str] = field(default_factory=list)


@dataclass
class PeerResult:
    """Everything one peer run measured (``peer.json``)."""

    system: str
    versions: dict[str, str]
    started_at: str
    folder: str
    concurrency: int
    drain: DrainResult | None
    rates: list[RateResult]
    overlap_check: OverlapCheck | None
    warnings: list[str] = field(default_factory=list)

    def at_rate(self, rate: float) -> RateResult | None:
        """The open-loop phase at ``rate`` per second, if there was one."""
        return next((r for r in self.rates if abs(r.rate - rate) < 1e-9), None)


def to_dict(result: PeerResult) -> dict[str, Any]:
    """The JSON form: the dataclasses, and each CPU record's per-task figures."""
    from dataclasses import asdict

    out = asdict(result)

    def add_per_task(cpu: dict[str, Any], use: CpuUse) -> None:
        cpu["server_ms_per_task"] = use.server_ms_per_task
        cpu["client_ms_per_task"] = use.client_ms_per_task

    if result.drain is not None:
        add_per_task(out["drain"]["cpu"], result.drain.cpu)
    for row, rate in zip(out["rates"], result.rates):
        add_per_task(row["cpu"], rate.cpu)
    return out


def from_dict(d: dict[str, Any]) -> PeerResult:
    """A ``peer.json`` read back (``to_dict``'s per-task figures are recomputed, not read)."""

    def cpu(c: dict[str, Any]) -> CpuUse:
        return CpuUse(**{k: v for k, v in c.items() if not k.endswith("_per_task")})

    def rate(r: dict[str, Any]) -> RateResult:
        return RateResult(**{**r, "send_lag": Latency(**r["send_lag"]), "start_latency": Latency(**r["start_latency"]),
                             "cpu": cpu(r["cpu"])})  # fmt: skip

    drain = d.get("drain")
    check = d.get("overlap_check")
    return PeerResult(
        system=d["system"], versions=d["versions"], started_at=d["started_at"], folder=d["folder"],
        concurrency=d["concurrency"], drain=DrainResult(**{**drain, "cpu": cpu(drain["cpu"])}) if drain else None,
        rates=[rate(r) for r in d.get("rates", [])], overlap_check=OverlapCheck(**check) if check else None,
        warnings=list(d.get("warnings", [])),
    )  # fmt: skip


# ---------------------------------------------------------------- overlaps


def count_overlaps(records: list[dict[str, Any]], exits: dict[int, float] | None = None) -> ledger_mod.LedgerSummary:
    """The ledger's own overlap check over Celery's executions (a peer gets no second checker)."""
    return ledger_mod.summarize(records, exits)


def overlap_check(records: list[dict[str, Any]], task_ids: Iterable[str], handler_s: float, visibility_s: float,
                  concurrency: int, exits: dict[int, float] | None = None) -> OverlapCheck:  # fmt: skip
    """The overlap check's record for the tasks ``task_ids`` of the ledger ``records``."""
    wanted = set(task_ids)
    mine = [r for r in records if r.get("event") == "exit" or r.get("task_id") in wanted]
    summary = count_overlaps(mine, exits)
    return OverlapCheck(tasks=len(wanted), handler_s=handler_s, visibility_timeout_s=visibility_s, concurrency=concurrency,
                        executions=summary.executions, re_executions=summary.re_executions,
                        overlaps=len(summary.overlaps), examples=summary.overlaps[:5])  # fmt: skip


# ---------------------------------------------------------------- the table beside leasesched


@dataclass
class Row:
    """One line of the combined table: a measure, each system's figure, and leasesched ÷ Celery."""

    measure: str
    leasesched: float | None
    celery: float | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """leasesched ÷ Celery; None when either is missing or Celery's is 0."""
        if self.leasesched is None or self.celery is None or self.celery == 0:
            return None
        return self.leasesched / self.celery


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def leasesched_rate(report: dict[str, Any]) -> float:
    """The ScheduleTask rate the leasesched run offered (its ``--schedule-rate``)."""
    return float(report["run"]["options"]["schedule_rate"])


def comparison(report: dict[str, Any], peer: PeerResult) -> list[Row]:
    """The rows of the combined table: leasesched's ``report.json`` beside the peer's phase at the same rate.

    leasesched's CPU per task is its ``cpu_through_drain`` (Cassandra +
    Python processes ÷ the executions that ended from the load's start to
    the drain's end); its throughput is ``completed_per_s`` (SUCCEEDED tasks
    finished in the load window ÷ its length)."""
    rate = leasesched_rate(report)
    same = peer.at_rate(rate)
    per = _get(report, "cpu_through_drain", "cpu_ms_per_execution") or {}
    store, python = per.get("store"), per.get("python")
    ls_cpu = store + python if store is not None and python is not None else None
    imm = report.get("immediate_schedule_to_start_ms") or {}
    tasks = report.get("tasks") or {}
    at = f" at {rate:g}/s offered"
    rows = [
        Row(f"executed tasks/s{at}", tasks.get("completed_per_s"), same.executed_per_s if same else None),
        Row("executed tasks/s draining a full queue", None, peer.drain.executed_per_s if peer.drain else None,
            "leasesched: not measured in this run (see BENCHMARKS.md)"),
        Row("enqueue (ScheduleTask / send_task) per s, one client", None, peer.drain.enqueue_per_s if peer.drain else None,
            f"leasesched: {_fmt(_get(report, 'schedule', 'achieved_ok_per_s'))} of {rate:g}/s offered accepted "
            "(open loop: not its maximum)"),
        Row(f"CPU ms per task, server side{at}", ls_cpu, same.cpu.server_ms_per_task if same else None,
            "leasesched: Cassandra + its Python processes; Celery: worker + Redis"),
        Row("CPU ms per task, server side, draining a full queue", None,
            peer.drain.cpu.server_ms_per_task if peer.drain else None),
        Row(f"schedule→start p50 ms{at}", imm.get("p50"), same.start_latency.p50_ms if same else None),
        Row(f"schedule→start p99 ms{at}", imm.get("p99"), same.start_latency.p99_ms if same else None),
        Row("lost tasks (all phases)", tasks.get("lost"), float(_lost(peer)),
            "accepted or sent, not finished by the drain's end"),
        Row("overlapping executions, normal load", tasks.get("overlaps"), float(_overlaps(peer))),
        Row("overlapping executions, handler past the lease / visibility timeout", None,
            float(peer.overlap_check.overlaps) if peer.overlap_check else None,
            "Celery: handed on while still running (the overlap check); leasesched: not run here: a handler past its "
            "lease is stopped, or its worker ends itself, before the task may start elsewhere (README; the chaos "
            "tests check it with the same ledger)"),
    ]  # fmt: skip
    return rows


def machine_line(report: dict[str, Any], peer: PeerResult) -> str:
    """How busy the shared machine was during each measurement (others' CPU makes every figure noisier)."""
    ctd = report.get("cpu_through_drain") or {}
    same = peer.at_rate(leasesched_rate(report))

    def busy(fraction: Any, others: Any) -> str:
        return "–" if fraction is None else f"{100 * float(fraction):.0f} % busy, others {float(others or 0):.0f} CPU s"

    parts = [f"leasesched load + drain: {busy(ctd.get('machine_busy_fraction'), ctd.get('others_cpu_s'))}"]
    if same is not None:
        parts.append(f"Celery at {same.rate:g}/s: {busy(same.cpu.machine_busy_fraction, same.cpu.others_cpu_s)}")
    if peer.drain is not None:
        parts.append(f"Celery drain: {busy(peer.drain.cpu.machine_busy_fraction, peer.drain.cpu.others_cpu_s)}")
    return "machine: " + "; ".join(parts)


def _lost(peer: PeerResult) -> int:
    return (peer.drain.lost if peer.drain else 0) + sum(r.lost for r in peer.rates)


def _overlaps(peer: PeerResult) -> int:
    return (peer.drain.overlaps if peer.drain else 0) + sum(r.overlaps for r in peer.rates)


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"


def render(rows: list[Row]) -> str:
    """The rows as a Markdown table (readable in a terminal too)."""
    lines = ["| measure | leasesched | Celery + Redis | leasesched ÷ Celery | note |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}×"
        lines.append(f"| {r.measure} | {_fmt(r.leasesched)} | {_fmt(r.celery)} | {ratio} | {r.note} |")
    return "\n".join(lines)


def peer_lines(peer: PeerResult) -> list[str]:
    """The peer's own figures, phase by phase, for the terminal."""
    lines = [f"peer          {peer.system} {peer.versions}, prefork {peer.concurrency}, acks_late; {peer.folder}"]
    d = peer.drain
    if d is not None:
        lines.append(
            f"  drain       {d.tasks} tasks: enqueue {d.enqueue_per_s:.0f}/s ({d.enqueue_s:.1f} s), executed {d.executed} at "
            f"{d.executed_per_s:.0f}/s; CPU/task server {_fmt(d.cpu.server_ms_per_task)} ms, client "
            f"{_fmt(d.cpu.client_ms_per_task)} ms; lost {d.lost}, overlaps {d.overlaps}"
        )
    for r in peer.rates:
        lines.append(
            f"  {r.rate:>5g}/s     {r.seconds:g} s: sent {r.sent}, executed {r.executed} ({r.executed_per_s:.1f}/s); start "
            f"p50 {_fmt(r.start_latency.p50_ms)} p99 {_fmt(r.start_latency.p99_ms)} max {_fmt(r.start_latency.max_ms)} ms; "
            f"send lag p99 {_fmt(r.send_lag.p99_ms)} ms; CPU/task server {_fmt(r.cpu.server_ms_per_task)} ms, client "
            f"{_fmt(r.cpu.client_ms_per_task)} ms; lost {r.lost}, overlaps {r.overlaps}"
        )
    o = peer.overlap_check
    if o is not None:
        lines.append(
            f"  overlap     {o.tasks} tasks of {o.handler_s:g} s, visibility timeout {o.visibility_timeout_s:g} s, prefork "
            f"{o.concurrency}: {o.executions} executions, {o.re_executions} re-executions, {o.overlaps} overlapping"
        )
        lines.extend(f"              {e}" for e in o.examples[:3])
    lines.extend(f"  warning     {w}" for w in peer.warnings)
    return lines
