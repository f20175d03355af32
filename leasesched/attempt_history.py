"""Recording each attempt of a task in its history (issue 16), for the lifecycle.

Why a class beside the lifecycle and not inside it: the lifecycle decides
state; this only writes a record of what it decided, and must never change
that decision. So every method here swallows its own failures: a history
write that fails is counted (``leasesched_history_write_failures_total``) and
logged at most once per ``LOG_EVERY_S`` per process, and the RPC or trigger
step that changed the state goes on as if it had succeeded. The lifecycle
calls it only AFTER its conditional write applied: an entry for a change that
did not happen would be a lie, while a missing entry is only a gap.

What it costs on the hot path (plain writes, no Paxos round; measured in
BENCHMARKS.md, "Attempt history: what it costs" and issue 17's verdict):
nothing for an attempt that succeeds, ONE insert for every other end. Two
attempts have no entry of their own, because the task row already says all
an entry would: the attempt that is running (the row is RUNNING, with its
lease token, claim time, worker and live progress), and the attempt that
succeeded (the row is SUCCEEDED for good, with the same facts, its finish
time and the worker's last progress, which the completion writes). ``read``
shows both from the row the caller read anyway (GetTaskHistory reads it to
check who may see it), unless an entry with that lease token was written
(as a version before this one did). So the claim writes nothing, a
heartbeat writes nothing, and a completion is its one conditional write.
Every other end (a failure, a retry, an expired lease, a cancel, a release,
an operator's action) writes its entry, keyed by the lease token: the row
moves on past that attempt. An end entry whose write fails leaves a gap
(the attempt is not shown), never a wrong line.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Final

from leasesched.errors import Unavailable
from leasesched.history import AttemptOutcome, HistoryEntry, HistoryKind, Operation
from leasesched.limits import MAX_ERROR_MESSAGE, MAX_ERROR_TYPE
from leasesched.model import Task
from leasesched.states import TaskStatus
from leasesched.observability import metrics
from leasesched.store.base import StoreUnavailable, TaskStore

log = logging.getLogger(__name__)

LOG_EVERY_S: Final = 10.0  # at most one warning per this many seconds per process: a store outage fails every write

# Error types the worker reports for a handler stopped by a timeout
# (worker/execution.py: start_to_close) and the lifecycle writes for a
# schedule_to_close that passed while it ran: these attempts ended TIMED_OUT,
# not FAILED.
TIMEOUT_ERROR_TYPES: Final = frozenset({"StartToCloseTimeout", "DeadlineExceeded"})

def failure_outcome(error_type: str) -> AttemptOutcome:
    """FAILED, or TIMED_OUT for an attempt a timeout ended."""
    return AttemptOutcome.TIMED_OUT if error_type in TIMEOUT_ERROR_TYPES else AttemptOutcome.FAILED


def attempt_entry(task: Task, outcome: AttemptOutcome, ended_at: int | None = None, error_type: str = "", error: str = "") -> HistoryEntry:
    """The ATTEMPT entry of the attempt ``task`` runs (its claim time, token,
    worker and last progress, from the row) with ``outcome``."""
    return HistoryEntry(
        task_id=task.task_id,
        kind=HistoryKind.ATTEMPT,
        started_at=task.started_at or 0,
        attempt=task.attempt,
        lease_token=task.lease_token,
        worker_id=task.lease_owner or "",
        ended_at=ended_at,
        outcome=outcome,
        error_type=error_type[:MAX_ERROR_TYPE],
        error=error[:MAX_ERROR_MESSAGE],
        progress_percent=task.progress_percent,
        progress_message=task.progress_message,
    )


def row_entry(task: Task) -> HistoryEntry | None:
    """The attempt the task row itself describes, as a history entry: the
    running one (RUNNING), or the one that succeeded (SUCCEEDED is final, so
    the row keeps describing it). None for any other row, or one never claimed."""
    if task.started_at is None:
        return None
    if task.status is TaskStatus.RUNNING:
        return attempt_entry(task, AttemptOutcome.RUNNING)
    if task.status is TaskStatus.SUCCEEDED:
        return attempt_entry(task, AttemptOutcome.SUCCEEDED, task.finished_at)
    return None


class AttemptHistory:
    """Writes a task's ATTEMPT entries: the outcome of every attempt that did
    not succeed, at its end (the running and the succeeded attempt are the row).

    ``max_entries`` bounds each task's history (``Config.history_max_entries``).
    Reads are bounded by it (their LIMIT); the removal of older entries
    (``TaskStore.trim_history``: a read of ``max_entries`` keys and one range
    delete) runs at a claim, and only at every ``trim_every``-th lease token
    past the bound. A task with fewer claims than the bound (nearly all: the
    default bound is 100, ``max_attempts`` 3) never pays for it; one that is
    released or rate limited for ever pays one trim per ``trim_every``
    claims, and holds at most ``max_entries + trim_every`` entries (plus
    operator entries) in between.
    """

    def __init__(self, store: TaskStore, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"history_max_entries must be at least 1, not {max_entries}")
        self.store = store
        self.max_entries = max_entries
        self.trim_every = max(1, max_entries // 10)
        self._last_log = 0.0
        self._unlogged = 0

    async def started(self, task: Task) -> None:
        """The claim of ``task`` (as it is after the claim) applied: nothing is
        written (the running attempt is the row, see ``read``); old entries
        are trimmed now and then."""
        token = task.lease_token
        if token > self.max_entries and token % self.trim_every == 0:
            try:
                await self.store.trim_history(task.task_id, self.max_entries)
            except Exception as exc:  # noqa: BLE001 - see the module docstring
                self._failed(task, "trim", exc)

    async def ended(
        self, task: Task, outcome: AttemptOutcome, ended_at: int, error_type: str = "", error: str = ""
    ) -> None:
        """The attempt ``task`` runs (as read before its end: its token, claim
        time, worker, last progress) ended with ``outcome`` at ``ended_at``."""
        if task.started_at is None:
            return  # never claimed (a row from before started_at was written): no entry to end
        entry = attempt_entry(task, outcome, ended_at, error_type, error)
        await self._write(entry)

    async def operated(self, task: Task, operation: Operation, operator: str, reason: str, at: int) -> None:
        """An operator's ``operation`` applied; ``task`` as it is after it."""
        entry = HistoryEntry(
            task_id=task.task_id,
            kind=HistoryKind.OPERATION,
            started_at=at,
            attempt=task.attempt,
            lease_token=task.lease_token,
            operation=operation,
            operator=operator,
            reason=reason,
            entry_id=uuid.uuid4(),
        )
        await self._write(entry)

    async def read(self, task_id: uuid.UUID, limit: int = 0, current: Task | None = None) -> list[HistoryEntry]:
        """The task's newest entries, newest first: at most ``limit``, and
        never more than the bound (0: the bound). ``current``: the task row as
        the caller read it; a RUNNING task's attempt is shown from it (the
        attempt has no entry until it ends). Raises ``Unavailable``."""
        bounded = self.max_entries if limit <= 0 else min(limit, self.max_entries)
        try:
            entries = await self.store.read_history(task_id, bounded)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        from_row = row_entry(current) if current is not None else None
        if from_row is None or any(e.kind is HistoryKind.ATTEMPT and e.lease_token == from_row.lease_token for e in entries):
            return entries
        newest_first = sorted([from_row, *entries], key=lambda e: (e.started_at, e.key), reverse=True)
        return newest_first[:bounded]

    async def _write(self, entry: HistoryEntry) -> None:
        try:
            await self.store.add_history(entry)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            self._failed(entry, "write", exc)

    def _failed(self, what: HistoryEntry | Task, action: str, exc: Exception) -> None:
        metrics.history_write_failures.inc()
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_S:
            self._unlogged += 1
            return
        also = f" ({self._unlogged} more since the last warning)" if self._unlogged else ""
        self._last_log, self._unlogged = now, 0
        log.warning("history %s of task %s failed: %s: %s%s", action, what.task_id, type(exc).__name__, exc, also)

