"""The overview page's numbers, computed from what ListTasks returns.

The API has no counters or time series, so the overview is derived from task
views: counts by listing each status (up to a cap), throughput and dispatch
lag from the newest tasks' timestamps, the oldest waiting task from the
SCHEDULED list. Pure functions over ``TaskView`` lists, so they are tested
without a cluster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from leasesched.client import TaskStatus, TaskView


@dataclass(frozen=True)
class Bucket:
    start: dt.datetime
    finished: int  # tasks that reached SUCCEEDED/FAILED/CANCELLED in the bucket
    lag_p50_s: float | None  # dispatch lag (started_at - run_at) of the tasks started in the bucket
    lag_max_s: float | None


@dataclass(frozen=True)
class Series:
    buckets: list[Bucket]
    bucket_s: int
    sample: int  # how many tasks the series was computed from

    @property
    def max_finished(self) -> int:
        return max((b.finished for b in self.buckets), default=0)

    @property
    def max_lag_s(self) -> float:
        return max((b.lag_max_s or 0.0 for b in self.buckets), default=0.0)


@dataclass(frozen=True)
class Waiting:
    """The SCHEDULED task that has been due the longest (None: none is due)."""

    task: TaskView | None
    waited_s: float
    scanned: int


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def series(tasks: Sequence[TaskView], now: dt.datetime, buckets: int = 30, bucket_s: int = 60) -> Series:
    """Throughput (tasks finished per bucket) and dispatch lag over the last
    ``buckets * bucket_s`` seconds, from the given (newest) tasks. The lag is
    the latest attempt's: ``started_at - run_at`` (run_at is when it was last due)."""
    start = now - dt.timedelta(seconds=buckets * bucket_s)
    finished = [0] * buckets
    lags: list[list[float]] = [[] for _ in range(buckets)]

    def index(when: dt.datetime | None) -> int | None:
        if when is None or when < start or when > now:
            return None
        return min(buckets - 1, int((when - start).total_seconds() // bucket_s))

    for task in tasks:
        if task.status.terminal and (i := index(task.finished_at)) is not None:
            finished[i] += 1
        if task.started_at is not None and task.run_at is not None and (i := index(task.started_at)) is not None:
            lags[i].append(max(0.0, (task.started_at - task.run_at).total_seconds()))
    out = [
        Bucket(start + dt.timedelta(seconds=i * bucket_s), finished[i], _percentile(lags[i], 0.5), max(lags[i]) if lags[i] else None)
        for i in range(buckets)
    ]
    return Series(out, bucket_s, len(tasks))


def oldest_waiting(scheduled: Sequence[TaskView], now: dt.datetime) -> Waiting:
    """Among SCHEDULED tasks, the one due the earliest (run_at <= now)."""
    due = [t for t in scheduled if t.status is TaskStatus.SCHEDULED and t.run_at is not None and t.run_at <= now]
    if not due:
        return Waiting(None, 0.0, len(scheduled))
    oldest = min(due, key=lambda t: t.run_at or now)
    return Waiting(oldest, (now - (oldest.run_at or now)).total_seconds(), len(scheduled))
