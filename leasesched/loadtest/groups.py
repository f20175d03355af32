"""Concurrency-key groups as load (``leasesched loadtest --groups N``), issue 15.

Fair share by ``concurrency_key`` is judged by what one group's flood does
to the others: a group with thousands of queued tasks must not make a small
group's tasks wait until the flood is gone. The harness therefore gives every
task of the timed load a key ``g0..g{N-1}``, can send a burst of tasks for
``g0`` before the timed load starts (``--flood``, so the backlog already
exists when the other groups' tasks arrive), and reports the start lag per
group and the highest number of executions of one key that ran at once.

This module is the pure part: which group a task gets, the per-group lag and
the concurrency per key over the ledger's executions (``ledger.max_concurrent``). The runner does
the RPCs; the report and the table print what ``group_section`` returns.

Why groups are assigned by a fixed rule and not at random: with a share
``F`` for ``g0``, task ``i`` goes to ``g0`` exactly when ``floor((i+1)·F)``
passes an integer, and the others take turns. Any prefix of the load then
holds ``floor(n·F)`` tasks of ``g0`` and the rest spread over the other groups
within one task, so "10 tasks for g1..g10" is exactly one task each, and two
runs of one command load the groups identically.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from leasesched.loadtest.ledger import Execution, max_concurrent
from leasesched.loadtest.metrics import percentiles

KEY_PREFIX = "g"
FLOOD_GROUP = 0
OPTION_FIELDS = ("groups", "flood_share", "flood")  # the LoadOptions fields of a --groups run
MAX_GROUP_ROWS = 12  # per-group rows in the report (the flood group and 11 others: the TwTasks scenario fits)


@dataclass(frozen=True)
class GroupPlan:
    """The groups of one run: ``groups`` keys, ``g0`` gets ``flood_share`` of the
    timed load (None: the same share as every other group) and ``flood`` tasks
    in a burst before it."""

    groups: int
    flood_share: Fraction | None = None
    flood: int = 0

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError("groups must be at least 1")
        if self.flood < 0:
            raise ValueError("flood must be 0 or more")
        if self.flood_share is not None:
            if not 0 <= self.flood_share <= 1:
                raise ValueError("flood share must be within 0..1")
            if self.groups < 2 and self.flood_share != 1:
                raise ValueError("a flood share below 1 needs at least 2 groups (the rest goes to the others)")

    @classmethod
    def from_options(cls, groups: int, flood_share: float | None, flood: int) -> "GroupPlan | None":
        """None when the run has no groups; ValueError for options that make no sense together."""
        if groups <= 0:
            if flood_share is not None or flood:
                raise ValueError("--flood and --flood-share need --groups")
            return None
        share = Fraction(str(flood_share)) if flood_share is not None else None  # str: 0.1 is 1/10, not its binary neighbour
        return cls(groups=groups, flood_share=share, flood=flood)

    @property
    def share(self) -> Fraction:
        """g0's share of the timed load."""
        return self.flood_share if self.flood_share is not None else Fraction(1, self.groups)

    def key(self, group: int) -> str:
        return f"{KEY_PREFIX}{group}"

    def group_of(self, i: int) -> int:
        """The group of the timed load's task ``i`` (0, 1, 2, ...)."""
        if self.groups == 1:
            return FLOOD_GROUP
        share = self.share
        floods_before = math.floor(i * share)
        if math.floor((i + 1) * share) > floods_before:
            return FLOOD_GROUP
        return 1 + (i - floods_before) % (self.groups - 1)

    def describe(self) -> str:
        share = "uniform" if self.flood_share is None else f"{float(self.flood_share):g}"
        return f"{self.groups} groups (g0 share {share}, flood {self.flood})"


# ---------------------------------------------------------------- concurrency


def executions_by_key(by_task: Mapping[str, Sequence[Execution]], key_of: Mapping[str, str]) -> dict[str, list[Execution]]:
    """Each key's executions, one per lease. Tasks without a key are left out.

    The records of one lease in two processes (a process-mode handler and its
    worker) are one execution, from the first start to the last end: counted
    twice they would make one task look like two running at once. An end
    before its start (a clock step between its lines) is taken as its start,
    so it cannot take a running execution off the sweep's count. The
    ledger's executions are copied, never changed."""
    out: dict[str, list[Execution]] = defaultdict(list)
    for task_id, runs in by_task.items():
        key = key_of.get(task_id)
        if not key:
            continue
        leases: dict[int, Execution] = {}
        for ex in runs:
            end = max(ex.start, ex.end)
            seen = leases.get(ex.token)
            if seen is None:
                leases[ex.token] = replace(ex, end=end)
            else:
                seen.start, seen.end = min(seen.start, ex.start), max(seen.end, end)
        out[key].extend(leases.values())
    return dict(out)


def max_concurrency_per_key(by_task: Mapping[str, Sequence[Execution]], key_of: Mapping[str, str]) -> dict[str, int]:
    """The most executions of each key running at one moment, by key.

    The sweep is the ledger's ``max_concurrent``, the one the limit
    integration tests use, so a report and a test never disagree on what
    "at once" means: an execution that starts the instant another ends
    counts both, which can only over-state a key's concurrency, never hide a
    limit's breach. An execution without end (no END and no known exit)
    counts as running until the end of time."""
    return {key: max_concurrent(runs) for key, runs in sorted(executions_by_key(by_task, key_of).items())}


# ---------------------------------------------------------------- lag


@dataclass(frozen=True)
class GroupedTask:
    """What the report needs of one task that was given a key."""

    task_id: str
    group: int
    run_at_ms: int
    flood: bool = False  # sent in the burst before the timed load


@dataclass
class BurstStats:
    """How the flood burst went (the runner fills it)."""

    requested: int = 0
    accepted: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


def _lag_row(tasks: Sequence[GroupedTask], first_start: Mapping[str, float]) -> dict[str, Any]:
    """Count, started, and start lag = first execution start − run_at (ms), as the report's dispatch lag."""
    lags = [first_start[t.task_id] * 1000.0 - t.run_at_ms for t in tasks if t.task_id in first_start]
    return {"count": len(tasks), "started": len(lags), "start_lag_ms": percentiles(lags)}


def flood_throughput(tasks: Iterable[GroupedTask], by_task: Mapping[str, Sequence[Execution]]) -> dict[str, Any]:
    """Flood tasks that finished an execution ÷ (the last such end − the first flood start).

    From the ledger, so it is the rate the workers really got through the
    backlog, whatever fair share did to the order."""
    starts: list[float] = []
    ends: list[float] = []
    done = 0
    for t in tasks:
        if not t.flood:
            continue
        runs = by_task.get(t.task_id, ())
        if not runs:
            continue
        starts.append(min(ex.start for ex in runs))
        finished = [ex.end for ex in runs if ex.ended == "end" and not ex.stopped]
        if finished:
            done += 1
            ends.append(max(finished))
    span = (max(ends) - min(starts)) if ends and starts else 0.0
    return {
        "executed": done,
        "execution_span_s": round(span, 2),
        "executed_per_s": round(done / span, 1) if span > 0 else None,
    }


def backlog_when_others_due(tasks: Sequence[GroupedTask], first_start: Mapping[str, float]) -> int | None:
    """How many g0 tasks were due but not started when the first task of
    another group became due: the queue that task would wait behind without
    fair share (None when there is no other group's task). Shows that a run's
    flood was a real backlog and not already drained."""
    others_due = min((t.run_at_ms for t in tasks if t.group != FLOOD_GROUP), default=None)
    if others_due is None:
        return None
    return sum(
        1 for t in tasks
        if t.group == FLOOD_GROUP and t.run_at_ms <= others_due
        and (t.task_id not in first_start or first_start[t.task_id] * 1000.0 > others_due)
    )  # fmt: skip


def group_section(
    plan: GroupPlan,
    tasks: Sequence[GroupedTask],
    first_start: Mapping[str, float],
    by_task: Mapping[str, Sequence[Execution]],
    burst: BurstStats,
) -> dict[str, Any]:
    """The report's ``groups`` section.

    ``tasks``: every accepted task that was given a key (the burst's and the
    timed load's); ``first_start``: task id → first execution start (ledger,
    wall s); ``by_task``: the ledger's executions per task."""
    by_group: dict[int, list[GroupedTask]] = defaultdict(list)
    for t in tasks:
        by_group[t.group].append(t)
    others = [t for t in tasks if t.group != FLOOD_GROUP]
    concurrency = max_concurrency_per_key(by_task, {t.task_id: plan.key(t.group) for t in tasks})
    rows = []
    for g in range(min(plan.groups, MAX_GROUP_ROWS)):
        # max_concurrent: None when no execution of the key was seen (0 would claim the ledger saw it idle).
        rows.append({"key": plan.key(g), **_lag_row(by_group.get(g, []), first_start),
                     "max_concurrent": concurrency.get(plan.key(g))})  # fmt: skip
    top_key = max(sorted(concurrency), key=lambda k: concurrency[k], default=None)
    flood_key = plan.key(FLOOD_GROUP)
    others_max = max((v for k, v in concurrency.items() if k != flood_key), default=None)
    return {
        "groups": plan.groups,
        "flood_share": float(plan.share),
        "flood_share_given": plan.flood_share is not None,
        "flood": plan.flood,
        "flood_burst": {
            "requested": burst.requested,
            "accepted": burst.accepted,
            "failed": burst.failed,
            "seconds": round(burst.seconds, 2),
            "accepted_per_s": round(burst.accepted / burst.seconds, 1) if burst.seconds > 0 else None,
            "errors": dict(burst.errors),
            **flood_throughput(tasks, by_task),
        },
        "classes": {
            "flood": {"keys": [flood_key], **_lag_row(by_group.get(FLOOD_GROUP, []), first_start)},
            "others": {"keys": f"{plan.key(1)}..{plan.key(plan.groups - 1)}" if plan.groups > 1 else "",
                       **_lag_row(others, first_start)},  # fmt: skip
        },
        "g0_backlog_when_others_first_due": backlog_when_others_due(tasks, first_start),
        "per_group": rows,
        "per_group_rows_left_out": max(0, plan.groups - MAX_GROUP_ROWS),
        "max_concurrency": {
            "max_over_keys": concurrency[top_key] if top_key is not None else None,
            "key": top_key,
            flood_key: concurrency.get(flood_key),
            "others_max": others_max,
            "keys_seen": len(concurrency),
            "per_key": concurrency,  # every key seen, also those past the per-group rows
        },
    }
