"""The task state machine: every legal transition, in one place.

Every component (TaskService, TaskUpdater, trigger) asks this module before it
writes a new status, and the store conditions each write on the status it read,
so an illegal or lost-race transition can never reach Cassandra.

    SCHEDULED ──claim──▶ RUNNING ──complete──▶ SUCCEEDED
        │  ▲                │ │ └──fail (no retry left / non-retryable)──▶ FAILED
        │  └──retry/expire──┘ └──cancel acknowledged──▶ CANCELLED
        ├──cancel──▶ CANCELLED
        └──deadline passed──▶ FAILED

    SCHEDULED / RUNNING / (a status that is no TaskStatus) ──quarantine──▶ FAILED

    Operator actions (OperatorService; docs/operations.md, "Operator actions"):
    FAILED / CANCELLED ──operator_retry──▶ SCHEDULED   (a fresh attempt budget)
    SCHEDULED ──resume──▶ SCHEDULED                   (a waiting retry is due now)
    SCHEDULED ──mark_failed──▶ FAILED
    RUNNING ──terminate──▶ FAILED                     (a new lease token fences the worker)

The operator retry is the one way out of a terminal state: "terminal" means
no *automatic* transition leaves it (no worker, trigger or deadline moves it);
only a person, with the task's current version in hand, can.

A stored row the scheduler cannot read (a time past year 9999, an unknown
status, ...) is *quarantined*: failed with error type "Unreadable" and its bad
columns repaired, by one conditional write (``Lifecycle.read``). A terminal
row keeps its status: only its bad columns are repaired.

There is no persisted DISPATCHED state: a dispatch is a hint to a worker, the
claim is the transition. That saves one conditional write per task, and a
duplicate dispatch is harmless because only one claim can win.
"""

from __future__ import annotations

import enum


class TaskStatus(enum.Enum):
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class Transition(enum.Enum):
    """Why a task changes status; each has exactly one legal source set."""

    CLAIM = "claim"  # a worker takes the lease
    COMPLETE = "complete"  # the handler returned
    RETRY = "retry"  # retriable failure with attempts left
    FAIL = "fail"  # non-retriable failure, or no attempt left
    LEASE_EXPIRED_RETRY = "lease_expired_retry"  # trigger re-queues after expiry + grace
    LEASE_EXPIRED_FAIL = "lease_expired_fail"  # expiry with no attempt left
    LEASE_EXPIRED_CANCEL = "lease_expired_cancel"  # expiry of a task whose cancel was requested
    RELEASE = "release"  # worker gives the task back on shutdown
    RATE_LIMITED = "rate_limited"  # the handler was rate limited: waits for its gate, attempt not charged
    CANCEL = "cancel"  # user cancel of a task that is not running
    CANCEL_ACK = "cancel_ack"  # worker stopped a running task after a cancel request
    DEADLINE = "deadline"  # schedule-to-close / schedule-to-start passed
    QUARANTINE = "quarantine"  # the stored row cannot be read; see quarantined_status
    # Operator actions (each conditional on the version the operator read):
    OPERATOR_RETRY = "operator_retry"  # a FAILED / CANCELLED task runs again, attempt budget reset
    RESUME = "resume"  # a task waiting for its retry backoff is due now
    MARK_FAILED = "mark_failed"  # a waiting task stops retrying: FAILED
    TERMINATE = "terminate"  # a running task's lease is revoked (new token): FAILED


TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})

_S = TaskStatus
TRANSITIONS: dict[Transition, tuple[frozenset[TaskStatus], TaskStatus]] = {
    Transition.CLAIM: (frozenset({_S.SCHEDULED}), _S.RUNNING),
    Transition.COMPLETE: (frozenset({_S.RUNNING}), _S.SUCCEEDED),
    Transition.RETRY: (frozenset({_S.RUNNING}), _S.SCHEDULED),
    Transition.FAIL: (frozenset({_S.RUNNING}), _S.FAILED),
    Transition.LEASE_EXPIRED_RETRY: (frozenset({_S.RUNNING}), _S.SCHEDULED),
    Transition.LEASE_EXPIRED_FAIL: (frozenset({_S.RUNNING}), _S.FAILED),
    Transition.LEASE_EXPIRED_CANCEL: (frozenset({_S.RUNNING}), _S.CANCELLED),
    Transition.RELEASE: (frozenset({_S.RUNNING}), _S.SCHEDULED),
    Transition.RATE_LIMITED: (frozenset({_S.RUNNING}), _S.SCHEDULED),
    Transition.CANCEL: (frozenset({_S.SCHEDULED}), _S.CANCELLED),
    Transition.CANCEL_ACK: (frozenset({_S.RUNNING}), _S.CANCELLED),
    Transition.DEADLINE: (frozenset({_S.SCHEDULED, _S.RUNNING}), _S.FAILED),
    Transition.QUARANTINE: (frozenset({_S.SCHEDULED, _S.RUNNING}), _S.FAILED),
    Transition.OPERATOR_RETRY: (frozenset({_S.FAILED, _S.CANCELLED}), _S.SCHEDULED),
    Transition.RESUME: (frozenset({_S.SCHEDULED}), _S.SCHEDULED),
    Transition.MARK_FAILED: (frozenset({_S.SCHEDULED}), _S.FAILED),
    Transition.TERMINATE: (frozenset({_S.RUNNING}), _S.FAILED),
}


class IllegalTransition(Exception):
    """A component asked for a transition the state machine does not allow."""

    def __init__(self, transition: Transition, current: TaskStatus) -> None:
        sources = ", ".join(sorted(s.value for s in TRANSITIONS[transition][0]))
        super().__init__(f"cannot {transition.value} a {current.value} task (allowed from: {sources})")
        self.transition = transition
        self.current = current


def target(transition: Transition, current: TaskStatus) -> TaskStatus:
    """The status ``transition`` leads to from ``current``; raises if illegal."""
    sources, to = TRANSITIONS[transition]
    if current not in sources:
        raise IllegalTransition(transition, current)
    return to


def allowed(transition: Transition, current: TaskStatus) -> bool:
    return current in TRANSITIONS[transition][0]


def quarantined_status(current: TaskStatus | None) -> TaskStatus:
    """The status an unreadable row gets. ``current`` is its stored status, or
    None when that is itself unreadable (unknown text, null): such a row is
    failed like a live one. A terminal row keeps its status: its outcome is
    history, and terminal states have no way out."""
    if current is None:
        return TRANSITIONS[Transition.QUARANTINE][1]
    if current.terminal:
        return current
    return target(Transition.QUARANTINE, current)
