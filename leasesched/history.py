"""A task's history: one entry per attempt, and one per operator action.

Why a separate table and not columns of the task row: the task row is the
unit of every conditional write, and a history that grows with each attempt
would make every LWT read and rewrite more. History entries are plain writes
(no Paxos round) beside the state change they describe; they are a record for
people, never an input to a decision, so a lost entry costs a line in a view,
never a guarantee. Bounded per task (``history_max_entries``): the oldest
entries past the bound are not shown and are removed.

An attempt's entry is keyed by its lease token (unique per attempt, growing)
and written when the attempt ends; the attempt that runs is the task row
itself, shown as a RUNNING entry by ``AttemptHistory.read``.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass


class AttemptOutcome(enum.Enum):
    """How one attempt ended (RUNNING: it has not ended yet)."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # the handler failed (error_type / error say how)
    LEASE_LOST = "LEASE_LOST"  # its lease expired: the trigger took the task back
    CANCELLED = "CANCELLED"  # it stopped on a cancel request
    TIMED_OUT = "TIMED_OUT"  # start_to_close or schedule_to_close passed
    RELEASED = "RELEASED"  # the worker gave it back unrun (shutdown, a full limit)
    RATE_LIMITED = "RATE_LIMITED"  # the remote side said "later" (gate closed)
    TERMINATED = "TERMINATED"  # an operator revoked its lease (TerminateTask)


class Operation(enum.Enum):
    """An operator's action on one task (services: RetryTask, ResumeTask, ...)."""

    RETRY = "RETRY"
    RESUME = "RESUME"
    MARK_FAILED = "MARK_FAILED"
    TERMINATE = "TERMINATE"


class HistoryKind(enum.Enum):
    ATTEMPT = "ATTEMPT"
    OPERATION = "OPERATION"


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a task's history. Times are epoch milliseconds.

    ATTEMPT entries fill ``attempt``, ``lease_token``, ``worker_id``,
    ``started_at`` (claim), ``ended_at`` (None while running), ``outcome``,
    ``error_type`` / ``error`` and the last progress. OPERATION entries fill
    ``operation``, ``operator`` (the token's name or id; "" with auth off),
    ``reason``, ``started_at`` (when it was done) and the task's ``attempt``
    and ``lease_token`` at that moment.
    """

    task_id: uuid.UUID
    kind: HistoryKind
    started_at: int
    attempt: int = 0
    lease_token: int = 0
    worker_id: str = ""
    ended_at: int | None = None
    outcome: AttemptOutcome | None = None
    error_type: str = ""
    error: str = ""
    progress_percent: float = 0.0
    progress_message: str = ""
    operation: Operation | None = None
    operator: str = ""
    reason: str = ""
    entry_id: uuid.UUID | None = None  # OPERATION entries: their own id; ATTEMPT entries: None (keyed by token)

    @property
    def key(self) -> str:
        """The entry's clustering key beside its time: ``a`` + the lease token
        (zero-padded, so keys sort as tokens do) for an attempt, whose end then
        overwrites its claim; ``o`` + its own id for an operation."""
        return f"a{self.lease_token:020d}" if self.kind is HistoryKind.ATTEMPT else f"o{self.entry_id}"

