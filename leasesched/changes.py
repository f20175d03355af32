"""One typed value per change of a task row: ``TaskChange``.

Why a module of its own, in the core: the change is the vocabulary between
the one writer of task state (``leasesched.lifecycle``) and the stores
(``store.base.TaskStore.update_task``). The lifecycle decides *which* change
(policy); this module says *what* each change writes; the stores only turn
it into one conditional write. It imports the state machine and the model,
never a store, so both sides can import it.

Why per-transition constructors: every change that moves a task to a new
status is built by a named constructor (``TaskChange.claim``, ``.complete``,
``.fail``, ...) that asks ``states.target`` for the new status, so an
illegal transition raises ``IllegalTransition`` where the change is made,
before any write (the store's condition on the status read still decides
races). Code outside this module builds a ``TaskChange`` only through them
(``tests/unit/test_changes.py`` checks the product's sources for that).

Why a sentinel: "not written" must differ from "written as null".
``lease_expires_at=None`` clears the lease; a field left at ``UNSET`` is not
in the write at all (its column keeps what it holds). ``set_fields`` lists
the written ones, in field order.

Not here: the quarantine of an unreadable row (``Lifecycle._quarantine``)
writes raw columns (a status that may be no ``TaskStatus``, any column's
repair) through ``TaskStore.quarantine_task``; it is no transition of a
readable task, so it keeps its own raw shape.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Final

from leasesched.limits import MAX_ERROR_MESSAGE, MAX_ERROR_TYPE
from leasesched.model import Task
from leasesched.states import IllegalTransition, TaskStatus, Transition, allowed, target

# A new attempt (claimed, or waiting to be) shows no progress: the last
# attempt's "25% step 30 of 120" would read as if the task were running. A
# retry keeps the last failure's error, as the reason it waits (PollTask's
# error field).
_FRESH_PERCENT: Final = 0.0
_FRESH_MESSAGE: Final = ""


class Unset(enum.Enum):
    """The type of ``UNSET``: a field of a ``TaskChange`` that is not written."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


@dataclass(frozen=True, kw_only=True, repr=False)
class TaskChange:
    """The columns one conditional write of a ``tasks`` row sets; ``UNSET``
    fields are left as stored. Field names are ``Task`` field names (and the
    ``tasks`` columns of the same names). Build it with a constructor below."""

    status: TaskStatus | Unset = UNSET
    lease_token: int | Unset = UNSET
    lease_owner: str | None | Unset = UNSET
    lease_expires_at: int | None | Unset = UNSET
    started_at: int | None | Unset = UNSET
    finished_at: int | None | Unset = UNSET
    run_at: int | Unset = UNSET
    attempt: int | Unset = UNSET
    result: bytes | Unset = UNSET
    error: str | Unset = UNSET
    error_type: str | Unset = UNSET
    progress_percent: float | Unset = UNSET
    progress_message: str | Unset = UNSET
    cancel_requested: bool | Unset = UNSET
    lease_losses: int | Unset = UNSET
    payload: bytes | Unset = UNSET
    deadline_at: int | None | Unset = UNSET

    # ------------------------------------------------------------ reading

    def set_fields(self) -> dict[str, object]:
        """Field name → value of every written field, in field order (a store
        builds its write from this; a value may be None: "write null")."""
        return {
            f.name: value for f in dataclasses.fields(self) if (value := getattr(self, f.name)) is not UNSET
        }

    @property
    def new_status(self) -> TaskStatus | None:
        """The status this change writes, or None when it keeps the status."""
        return None if self.status is UNSET else self.status

    def apply(self, task: Task) -> Task:
        """``task`` as it is once this change is written (a new Task)."""
        return dataclasses.replace(task, **self.set_fields())  # type: ignore[arg-type]

    def __repr__(self) -> str:
        written = ", ".join(f"{name}={value!r}" for name, value in self.set_fields().items())
        return f"TaskChange({written})"

    # ------------------------------------------------------------ users

    @classmethod
    def cancel(cls, task: Task, now: int) -> TaskChange:
        """A user cancel of a task that is not running: CANCELLED at once. The
        request flag is kept, so the task reads as cancelled by request."""
        return cls(
            status=target(Transition.CANCEL, task.status),
            finished_at=now,
            error="cancelled by request",
            cancel_requested=True,
        )

    @classmethod
    def request_cancel(cls, task: Task) -> TaskChange:
        """A user cancel of a running task: only the flag its worker's next
        heartbeat answers. No status changes now; the request asks for
        ``CANCEL_ACK`` (or, with the worker gone, ``LEASE_EXPIRED_CANCEL``),
        so it is legal only where ``CANCEL_ACK`` is."""
        if not allowed(Transition.CANCEL_ACK, task.status):
            raise IllegalTransition(Transition.CANCEL_ACK, task.status)
        return cls(cancel_requested=True)

    # ------------------------------------------------------------ workers

    @classmethod
    def claim(cls, task: Task, worker_id: str, token: int, expires_at: int, now: int) -> TaskChange:
        """A worker takes the lease under the new, larger ``token``; the
        progress of any earlier attempt is cleared."""
        return cls(
            status=target(Transition.CLAIM, task.status),
            lease_token=token,
            lease_owner=worker_id,
            lease_expires_at=expires_at,
            started_at=now,
            progress_percent=_FRESH_PERCENT,
            progress_message=_FRESH_MESSAGE,
        )

    @classmethod
    def heartbeat(cls, expires_at: int, percent: float, message: str) -> TaskChange:
        """The lease holder extends its lease and reports progress. No
        transition (the status is not written), so no state-machine check:
        the write's condition (RUNNING, the holder's token) is the check, and
        a lost lease is the loser's ordinary answer, not an illegal call."""
        return cls(lease_expires_at=expires_at, progress_percent=percent, progress_message=message)

    @classmethod
    def complete(cls, current: TaskStatus, result: bytes, now: int, progress_message: str | None = None) -> TaskChange:
        """The handler returned: SUCCEEDED with its result, the lease ended.
        ``current`` is the status the write expects (a completion is written
        without reading the task first). ``progress_message``: the worker's
        last one, sent with the completion (None: the row keeps its own)."""
        return cls(
            status=target(Transition.COMPLETE, current),
            result=result,
            finished_at=now,
            progress_percent=100.0,
            progress_message=UNSET if progress_message is None else progress_message,
            lease_expires_at=None,
        )

    @classmethod
    def fail(cls, task: Task, error: str, error_type: str, now: int) -> TaskChange:
        """The attempt failed for good (permanent error, deadline passed, no attempt left): FAILED."""
        return cls(
            status=target(Transition.FAIL, task.status),
            finished_at=now,
            error=_cut_error(error),
            error_type=_cut_error_type(error_type),
            lease_expires_at=None,
        )

    @classmethod
    def retry(cls, task: Task, error: str, error_type: str, run_at: int) -> TaskChange:
        """The attempt failed and another is left: SCHEDULED again at ``run_at``
        as the next attempt, the failure's error kept as the reason it waits."""
        return cls(
            status=target(Transition.RETRY, task.status),
            attempt=task.attempt + 1,
            run_at=run_at,
            lease_owner=None,
            error=_cut_error(error),
            error_type=_cut_error_type(error_type),
            lease_expires_at=None,
            progress_percent=_FRESH_PERCENT,
            progress_message=_FRESH_MESSAGE,
        )

    @classmethod
    def cancel_ack(cls, task: Task, error: str, error_type: str, now: int) -> TaskChange:
        """The handler stopped after a cancel request: CANCELLED."""
        return cls(
            status=target(Transition.CANCEL_ACK, task.status),
            finished_at=now,
            error=_cut_error(error),
            error_type=_cut_error_type(error_type),
            lease_expires_at=None,
        )

    @classmethod
    def release(cls, task: Task, now: int) -> TaskChange:
        """Given back unrun: due again ``now``, the attempt not charged, and no
        error kept (a release is not a failure)."""
        return cls(
            status=target(Transition.RELEASE, task.status),
            run_at=now,
            lease_owner=None,
            error="",
            error_type="",
            lease_expires_at=None,
            progress_percent=_FRESH_PERCENT,
            progress_message=_FRESH_MESSAGE,
        )

    @classmethod
    def rate_limited(cls, task: Task, error: str, error_type: str, run_at: int) -> TaskChange:
        """The handler was rate limited (``worker.handlers.RateLimited``): due
        again at ``run_at``, when its gate opens again, as the *same* attempt
        (the remote side refused the call, the task did not fail). The error
        is kept as the reason it waits."""
        return cls(
            status=target(Transition.RATE_LIMITED, task.status),
            run_at=run_at,
            lease_owner=None,
            error=_cut_error(error),
            error_type=_cut_error_type(error_type),
            lease_expires_at=None,
            progress_percent=_FRESH_PERCENT,
            progress_message=_FRESH_MESSAGE,
        )

    # ------------------------------------------------------------ trigger

    @classmethod
    def lease_expired_retry(cls, task: Task, now: int) -> TaskChange:
        """The lease expired (plus grace) with attempts left: due again ``now``
        as the next attempt. Every lease expiry counts a lease loss: written by
        this same conditional write (on the token read), so the count costs no
        write of its own and two triggers can never both count one loss."""
        return cls(
            status=target(Transition.LEASE_EXPIRED_RETRY, task.status),
            attempt=task.attempt + 1,
            run_at=now,
            lease_owner=None,
            lease_expires_at=None,
            lease_losses=task.lease_losses + 1,
            error=f"lease expired on attempt {task.attempt}",
            error_type="LeaseExpired",
            progress_percent=_FRESH_PERCENT,
            progress_message=_FRESH_MESSAGE,
        )

    @classmethod
    def lease_expired_fail(cls, task: Task, now: int) -> TaskChange:
        """The lease expired on the last attempt: FAILED."""
        return cls(
            status=target(Transition.LEASE_EXPIRED_FAIL, task.status),
            finished_at=now,
            error=f"lease expired (attempt {task.attempt} of {task.max_attempts})",
            error_type="LeaseExpired",
            lease_expires_at=None,
            lease_losses=task.lease_losses + 1,
        )

    @classmethod
    def lease_expired_cancel(cls, task: Task, now: int) -> TaskChange:
        """The lease of a task with a cancel request expired: CANCELLED (a
        re-queued one could never be claimed again: claims refuse it)."""
        return cls(
            status=target(Transition.LEASE_EXPIRED_CANCEL, task.status),
            finished_at=now,
            error=f"cancelled by request; the lease expired on attempt {task.attempt}",
            error_type="LeaseExpired",
            lease_expires_at=None,
            lease_losses=task.lease_losses + 1,
        )

    @classmethod
    def deadline(cls, task: Task, reason: str, now: int) -> TaskChange:
        """The task waited or ran past its schedule-to-close / -start: FAILED."""
        return cls(
            status=target(Transition.DEADLINE, task.status),
            finished_at=now,
            error=reason,
            error_type="DeadlineExceeded",
            lease_expires_at=None,
        )


    # ------------------------------------------------------------ operators

    @classmethod
    def operator_retry(cls, task: Task, run_at: int, payload: bytes | None) -> TaskChange:
        """An operator's retry of a FAILED or CANCELLED task: SCHEDULED at
        ``run_at`` with a fresh attempt budget.

        Decision: ``attempt`` counts from 1 again (the budget is the task's
        own ``max_attempts``, as when it was scheduled), and ``lease_token``
        is raised by one: the token is the fencing number and only ever
        grows (a late report of the old run stays refused), and the raise
        keeps the task's version from ever repeating (``leasesched.versions``).
        The last run's outcome is cleared (result, error, finish, cancel
        request); ``deadline_at`` counts schedule_to_close afresh from
        ``run_at`` (an old deadline would fail the retry at its claim).
        ``payload`` None: the task keeps its payload."""
        deadline = run_at + task.timeouts.schedule_to_close_ms if task.timeouts.schedule_to_close_ms else None
        return cls(
            status=target(Transition.OPERATOR_RETRY, task.status),
            attempt=1,
            lease_token=task.lease_token + 1,
            lease_owner=None,
            lease_expires_at=None,
            started_at=None,
            finished_at=None,
            run_at=run_at,
            result=b"",
            error="",
            error_type="",
            progress_percent=_FRESH_PERCENT,
            progress_message=_FRESH_MESSAGE,
            cancel_requested=False,
            deadline_at=deadline,
            payload=UNSET if payload is None else payload,
        )

    @classmethod
    def resume(cls, task: Task, now: int) -> TaskChange:
        """A task waiting for its retry backoff is due ``now`` (same attempt;
        its last error stays as the reason it waited)."""
        return cls(status=target(Transition.RESUME, task.status), run_at=now)

    @classmethod
    def mark_failed(cls, task: Task, reason: str, now: int) -> TaskChange:
        """A waiting task stops retrying: FAILED, error type "MarkedFailed",
        the operator's reason as its error."""
        return cls(
            status=target(Transition.MARK_FAILED, task.status),
            finished_at=now,
            error=_cut_error(reason),
            error_type="MarkedFailed",
            lease_expires_at=None,
        )

    @classmethod
    def terminate(cls, task: Task, reason: str, now: int) -> TaskChange:
        """A running task's lease is revoked: FAILED ("Terminated") under a NEW
        lease token, so the worker's next heartbeat (and any report) under the
        old one is answered "lease lost" and the worker stops the handler as
        for any lost lease. No cooperation of the handler is needed."""
        return cls(
            status=target(Transition.TERMINATE, task.status),
            lease_token=task.lease_token + 1,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
            error=_cut_error(reason),
            error_type="Terminated",
        )


def _cut_error(error: str) -> str:
    """A worker's error text, cut to the column's bound: a long text is cut,
    never refused (the report of the attempt's end must land)."""
    return error[:MAX_ERROR_MESSAGE]


def _cut_error_type(error_type: str) -> str:
    return error_type[:MAX_ERROR_TYPE]
