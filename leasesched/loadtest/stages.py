"""Where an immediate task's time from ScheduleTask to its start goes (issue 17).

The load report's ``immediate_stages_ms``: per stage of the path, p50 and
p99 over the immediate tasks that started, from times taken along the way
at no cost to the product (no store statement, no RPC more):

* the client's send time (intended, as for every latency of the report) and
  the time the ScheduleTask answer arrived (the load generator);
* ``due_seen_at`` and ``dispatched_at``, set by the trigger on the
  ``Dispatch`` (hint received or scan found the task; dispatch written to
  the stream);
* ``received_at``, ``claim_sent_at``, ``claimed_at`` (the worker) and the
  execution's START (the handler), from the ledger's START record
  (``ledger.TIMING_KEYS``).

The stages, each of one task's first execution::

    schedule_call   send → ScheduleTask answered               (the client's view, for reference)
    to_due_seen     send → trigger saw it due                  (store writes, hint)
    trigger_queue   due_seen_at → dispatched_at                (waiting for a worker's credit, outbox)
    stream          dispatched_at → worker received            (gRPC stream, worker's event loop)
    worker_queue    received → ClaimTask sent                  (the execution's task getting the loop)
    claim           ClaimTask sent → answered                  (TaskUpdater, LWT)
    to_start        claim answered → handler START             (context, the handler's first line)

``to_due_seen`` starts at the send, not at the answer: TaskService sends the
hint before it answers, without waiting, so the trigger usually has the task
before the client has the answer and "answer → seen" would be negative.
``schedule_call`` is therefore a parallel branch, not a link of the chain:
the chain ``to_due_seen`` … ``to_start`` adds up, task by task, to the
total (send → START); its medians need not add up to the total's median.
All times are wall clocks of one machine: across machines, unsynchronised
clocks would shift the stages between processes.

Whether a task came by hint or by scan is not recorded (the Dispatch says
nothing about it); a ``to_due_seen`` near the scan interval rather than a
few ms says scan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from leasesched.loadtest.ledger import Execution
from leasesched.loadtest.metrics import percentiles

# (name, from, to, what it is): "sent", "answered" and "start" are the client's and the ledger's; the rest TIMING_KEYS.
STAGES: tuple[tuple[str, str, str, str], ...] = (
    ("schedule_call", "sent", "answered", "ScheduleTask call: send → answer (client)"),
    ("to_due_seen", "sent", "due_seen_at", "send → trigger saw it due (store writes, hint)"),
    ("trigger_queue", "due_seen_at", "dispatched_at", "trigger queue: seen due → dispatch on the stream"),
    ("stream", "dispatched_at", "received_at", "stream: dispatched → worker received"),
    ("worker_queue", "received_at", "claim_sent_at", "worker: received → ClaimTask sent"),
    ("claim", "claim_sent_at", "claimed_at", "claim: ClaimTask sent → answered"),
    ("to_start", "claimed_at", "start", "claimed → handler START"),
)
TOTAL = ("total", "sent", "start", "send → handler START")


@dataclass(frozen=True)
class StageTimes:
    """One stage over the tasks that have both of its ends; ms, None when no task has."""

    name: str
    what: str
    n: int
    p50: float | None
    p99: float | None
    min: float | None
    max: float | None


@dataclass(frozen=True)
class StageBreakdown:
    """The report's ``immediate_stages_ms``: ``tasks`` immediate tasks started,
    ``with_timings`` of them with the trigger's and the worker's times on their START."""

    tasks: int
    with_timings: int
    stages: tuple[StageTimes, ...]
    total: StageTimes

    def as_dict(self) -> dict[str, Any]:
        """As report.json holds it (the stages a list)."""
        return {**asdict(self), "stages": [asdict(s) for s in self.stages]}


@dataclass(frozen=True)
class ImmediateTask:
    """What the load generator knows of one immediate task: wall times (s) of its
    ScheduleTask's (intended) send and of the answer (None: not recorded)."""

    task_id: str
    sent: float
    answered: float | None


def _stage(name: str, what: str, values: Sequence[float]) -> StageTimes:
    p = percentiles(values, (50, 99))
    return StageTimes(name, what, len(values), p["p50"], p["p99"], round(min(values), 3) if values else None, p["max"])


def breakdown(tasks: Iterable[ImmediateTask], by_task: Mapping[str, Sequence[Execution]]) -> StageBreakdown:
    """The stages over each task's first execution (``by_task``: the ledger's
    executions per task, earliest first, as ``ledger.check`` sorts them)."""
    points: list[dict[str, float]] = []
    for task in tasks:
        runs = by_task.get(task.task_id)
        if not runs:
            continue
        first = runs[0]
        at = {"sent": task.sent, "start": first.start, **first.timings}
        if task.answered is not None:
            at["answered"] = task.answered
        points.append(at)
    complete = sum(1 for at in points if all(k in at for _, a, b, _ in STAGES for k in (a, b)))

    def values(start: str, end: str) -> list[float]:
        return [1000.0 * (at[end] - at[start]) for at in points if start in at and end in at]

    return StageBreakdown(
        tasks=len(points),
        with_timings=complete,
        stages=tuple(_stage(name, what, values(a, b)) for name, a, b, what in STAGES),
        total=_stage(TOTAL[0], TOTAL[3], values(TOTAL[1], TOTAL[2])),
    )


def stage_lines(b: Mapping[str, Any] | None) -> list[str]:
    """The breakdown for the terminal (``b``: ``StageBreakdown.as_dict()``; None, a
    run without a ledger: no lines): one small table."""
    if not b:
        return []

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [f"immediate stages ({b['tasks']} tasks started, {b['with_timings']} with all times; ms p50 / p99)"]
    for s in [*b["stages"], b["total"]]:
        lines.append(f"  {s['name']:<14}{ms(s['p50']):>9} /{ms(s['p99']):>9}   {s['what']}")
    return lines
