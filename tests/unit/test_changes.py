"""TaskChange (issue 12): each transition's constructor writes exactly the
columns the lifecycle wrote as a field dict before, asks the state machine
(an illegal source status raises before any write), and the stores write
only the set fields, None as null."""

from __future__ import annotations

import ast
import dataclasses
import uuid
from pathlib import Path
from typing import Callable

import pytest

from leasesched.changes import UNSET, TaskChange
from leasesched.limits import MAX_ERROR_MESSAGE, MAX_ERROR_TYPE
from leasesched.model import RetryPolicy, Task
from leasesched.states import TRANSITIONS, IllegalTransition, TaskStatus, Transition
from leasesched.store.base import Expect
from leasesched.store.cassandra import _change_columns
from leasesched.store.memory import MemoryStore

REPO = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000_000
S = TaskStatus


def task(status: TaskStatus = S.RUNNING, **kw: object) -> Task:
    base: dict[str, object] = dict(
        task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"p", shard=3, status=status,
        attempt=2, retry=RetryPolicy(maximum_attempts=3), lease_token=7, lease_owner="w1",
        lease_expires_at=NOW + 5000, progress_percent=40.0, progress_message="step 4",
        created_at=NOW - 10_000, run_at=NOW - 9000, first_run_at=NOW - 9000, started_at=NOW - 8000,
    )  # fmt: skip
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


# Each constructor, the transition it makes, and what it must write: the field
# dicts lifecycle.py built by hand before TaskChange (same keys, same values).
CASES: dict[str, tuple[Transition, Callable[[TaskStatus], TaskChange], dict[str, object]]] = {
    "claim": (
        Transition.CLAIM,
        lambda s: TaskChange.claim(task(s), "w2", 8, NOW + 30_000, NOW),
        {"status": S.RUNNING, "lease_token": 8, "lease_owner": "w2", "lease_expires_at": NOW + 30_000,
         "started_at": NOW, "progress_percent": 0.0, "progress_message": ""},
    ),
    "complete": (
        Transition.COMPLETE,
        lambda s: TaskChange.complete(s, b"out", NOW),
        {"status": S.SUCCEEDED, "result": b"out", "finished_at": NOW, "progress_percent": 100.0,
         "lease_expires_at": None},
    ),
    "fail": (
        Transition.FAIL,
        lambda s: TaskChange.fail(task(s), "boom", "ValueError", NOW),
        {"error": "boom", "error_type": "ValueError", "lease_expires_at": None, "status": S.FAILED,
         "finished_at": NOW},
    ),
    "retry": (
        Transition.RETRY,
        lambda s: TaskChange.retry(task(s), "boom", "ValueError", NOW + 2000),
        {"error": "boom", "error_type": "ValueError", "lease_expires_at": None, "progress_percent": 0.0,
         "progress_message": "", "status": S.SCHEDULED, "attempt": 3, "run_at": NOW + 2000, "lease_owner": None},
    ),
    "cancel_ack": (
        Transition.CANCEL_ACK,
        lambda s: TaskChange.cancel_ack(task(s), "stopped", "Cancelled", NOW),
        {"error": "stopped", "error_type": "Cancelled", "lease_expires_at": None, "status": S.CANCELLED,
         "finished_at": NOW},
    ),
    "release": (
        Transition.RELEASE,
        lambda s: TaskChange.release(task(s), NOW),
        {"error": "", "error_type": "", "lease_expires_at": None, "progress_percent": 0.0, "progress_message": "",
         "status": S.SCHEDULED, "run_at": NOW, "lease_owner": None},
    ),
    "rate_limited": (
        Transition.RATE_LIMITED,
        lambda s: TaskChange.rate_limited(task(s), "HTTP 429", "HTTP429", NOW + 5000),
        {"error": "HTTP 429", "error_type": "HTTP429", "lease_expires_at": None, "progress_percent": 0.0,
         "progress_message": "", "status": S.SCHEDULED, "run_at": NOW + 5000, "lease_owner": None},
    ),
    "cancel": (
        Transition.CANCEL,
        lambda s: TaskChange.cancel(task(s), NOW),
        {"status": S.CANCELLED, "finished_at": NOW, "error": "cancelled by request", "cancel_requested": True},
    ),
    "lease_expired_cancel": (
        Transition.LEASE_EXPIRED_CANCEL,
        lambda s: TaskChange.lease_expired_cancel(task(s), NOW),
        {"status": S.CANCELLED, "finished_at": NOW, "error": "cancelled by request; the lease expired on attempt 2",
         "error_type": "LeaseExpired", "lease_expires_at": None, "lease_losses": 1},
    ),
    "lease_expired_fail": (
        Transition.LEASE_EXPIRED_FAIL,
        lambda s: TaskChange.lease_expired_fail(task(s), NOW),
        {"status": S.FAILED, "finished_at": NOW, "error": "lease expired (attempt 2 of 3)",
         "error_type": "LeaseExpired", "lease_expires_at": None, "lease_losses": 1},
    ),
    "lease_expired_retry": (
        Transition.LEASE_EXPIRED_RETRY,
        lambda s: TaskChange.lease_expired_retry(task(s), NOW),
        {"progress_percent": 0.0, "progress_message": "", "status": S.SCHEDULED, "attempt": 3, "run_at": NOW,
         "lease_owner": None, "lease_expires_at": None, "error": "lease expired on attempt 2",
         "error_type": "LeaseExpired", "lease_losses": 1},
    ),
    "deadline": (
        Transition.DEADLINE,
        lambda s: TaskChange.deadline(task(s), "schedule_to_close of 5 ms exceeded", NOW),
        {"status": S.FAILED, "finished_at": NOW, "error": "schedule_to_close of 5 ms exceeded",
         "error_type": "DeadlineExceeded", "lease_expires_at": None},
    ),
    # Operator actions (OperatorService): the retry resets the attempt budget and
    # raises the lease token (the fencing number only grows), terminate fences.
    "operator_retry": (
        Transition.OPERATOR_RETRY,
        lambda s: TaskChange.operator_retry(task(s, finished_at=NOW - 1), NOW + 3000, b"new"),
        {"status": S.SCHEDULED, "lease_token": 8, "lease_owner": None, "lease_expires_at": None, "started_at": None,
         "finished_at": None, "run_at": NOW + 3000, "attempt": 1, "result": b"", "error": "", "error_type": "",
         "progress_percent": 0.0, "progress_message": "", "cancel_requested": False, "payload": b"new",
         "deadline_at": None},
    ),
    "resume": (
        Transition.RESUME,
        lambda s: TaskChange.resume(task(s), NOW),
        {"status": S.SCHEDULED, "run_at": NOW},
    ),
    "mark_failed": (
        Transition.MARK_FAILED,
        lambda s: TaskChange.mark_failed(task(s), "bad input, do not retry", NOW),
        {"status": S.FAILED, "finished_at": NOW, "error": "bad input, do not retry", "error_type": "MarkedFailed",
         "lease_expires_at": None},
    ),
    "terminate": (
        Transition.TERMINATE,
        lambda s: TaskChange.terminate(task(s), "stuck on a dead host", NOW),
        {"status": S.FAILED, "lease_token": 8, "lease_owner": None, "lease_expires_at": None, "finished_at": NOW,
         "error": "stuck on a dead host", "error_type": "Terminated"},
    ),
    # No status of its own: a request asks for CANCEL_ACK, so it is legal where that is.
    "request_cancel": (
        Transition.CANCEL_ACK,
        lambda s: TaskChange.request_cancel(task(s)),
        {"cancel_requested": True},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_each_constructor_writes_what_its_transition_wrote(name: str) -> None:
    transition, build, expected = CASES[name]
    (source, *_) = sorted(TRANSITIONS[transition][0], key=lambda s: s.value)
    change = build(source)
    assert change.set_fields() == expected
    assert change.new_status == expected.get("status")


@pytest.mark.parametrize(
    "name, status",
    [(n, s) for n, (t, _, _) in CASES.items() for s in TaskStatus if s not in TRANSITIONS[t][0]],
)
def test_an_illegal_source_status_raises_before_any_write(name: str, status: TaskStatus) -> None:
    transition, build, _ = CASES[name]
    with pytest.raises(IllegalTransition) as err:
        build(status)
    assert err.value.transition == transition and err.value.current == status


def test_every_constructor_and_status_changing_transition_is_covered() -> None:
    constructors = {n for n, v in vars(TaskChange).items() if isinstance(v, classmethod)}
    assert constructors == set(CASES) | {"heartbeat"}
    # Every transition of a readable task has its constructor; QUARANTINE
    # writes raw columns (leasesched/changes.py says why).
    assert {t for t, _, _ in CASES.values()} == set(Transition) - {Transition.QUARANTINE}


def test_complete_goes_through_the_state_machine() -> None:
    assert TaskChange.complete(S.RUNNING, b"", NOW).status == S.SUCCEEDED
    for status in (S.SCHEDULED, S.SUCCEEDED, S.FAILED, S.CANCELLED):
        with pytest.raises(IllegalTransition, match="cannot complete"):
            TaskChange.complete(status, b"", NOW)


def test_a_heartbeat_writes_no_status() -> None:
    change = TaskChange.heartbeat(NOW + 30_000, 55.5, "half")
    assert change.set_fields() == {"lease_expires_at": NOW + 30_000, "progress_percent": 55.5, "progress_message": "half"}
    assert change.new_status is None and change.status is UNSET


def test_unset_is_not_none() -> None:
    """None is a value ("write null": clear the lease); UNSET is "not written"."""
    change = TaskChange.complete(S.RUNNING, b"r", NOW)
    assert change.lease_expires_at is None and "lease_expires_at" in change.set_fields()
    assert change.lease_owner is UNSET and "lease_owner" not in change.set_fields()
    before = task()
    after = change.apply(before)
    assert after.lease_expires_at is None  # cleared
    assert after.lease_owner == "w1"  # untouched
    assert (after.status, after.result, after.finished_at, after.progress_percent) == (S.SUCCEEDED, b"r", NOW, 100.0)
    unchanged = {f.name for f in dataclasses.fields(Task)} - set(change.set_fields())
    assert all(getattr(after, f) == getattr(before, f) for f in unchanged)
    assert before.status == S.RUNNING  # apply makes a new Task
    assert repr(change) == (
        "TaskChange(status=<TaskStatus.SUCCEEDED: 'SUCCEEDED'>, lease_expires_at=None, finished_at=1700000000000, "
        "result=b'r', progress_percent=100.0)"
    )


@pytest.mark.parametrize("end", ["fail", "retry", "cancel_ack"])
def test_a_worker_error_is_cut_to_the_columns_bounds(end: str) -> None:
    long_error, long_type = "e" * (MAX_ERROR_MESSAGE + 100), "T" * (MAX_ERROR_TYPE + 10)
    running = task()
    change = {
        "fail": lambda: TaskChange.fail(running, long_error, long_type, NOW),
        "retry": lambda: TaskChange.retry(running, long_error, long_type, NOW),
        "cancel_ack": lambda: TaskChange.cancel_ack(running, long_error, long_type, NOW),
    }[end]()
    assert change.error == "e" * 4096 and change.error_type == "T" * 256


def test_cassandra_writes_the_set_fields_as_columns() -> None:
    """Status as its text, None as null, unset fields not at all; one column
    order per constructor (the prepared-statement cache key)."""
    cols = _change_columns(TaskChange.lease_expired_retry(task(), NOW))
    assert cols == {
        "status": "SCHEDULED", "lease_owner": None, "lease_expires_at": None, "run_at": NOW, "attempt": 3,
        "error": "lease expired on attempt 2", "error_type": "LeaseExpired", "progress_percent": 0.0,
        "progress_message": "", "lease_losses": 1,
    }  # fmt: skip
    assert list(cols) == [f.name for f in dataclasses.fields(TaskChange) if f.name in cols]
    assert _change_columns(TaskChange.heartbeat(NOW, 1.0, "m")) == {
        "lease_expires_at": NOW, "progress_percent": 1.0, "progress_message": "m"
    }  # fmt: skip


def test_every_field_of_a_change_is_a_task_field_and_a_column() -> None:
    task_fields = {f.name for f in dataclasses.fields(Task)}
    assert {f.name for f in dataclasses.fields(TaskChange)} <= task_fields
    everything = TaskChange(**{f.name: getattr(task(), f.name) for f in dataclasses.fields(TaskChange)})
    assert set(_change_columns(everything)) == {f.name for f in dataclasses.fields(TaskChange)}


async def test_the_memory_store_writes_only_the_set_fields() -> None:
    store = MemoryStore()
    running = task()
    await store.insert_task(running)
    result = await store.update_task(running.task_id, Expect(S.RUNNING, lease_token=7), TaskChange.heartbeat(NOW, 9.0, "m"))
    assert result.applied
    stored = store.tasks[running.task_id]
    assert (stored.lease_expires_at, stored.progress_percent, stored.progress_message) == (NOW, 9.0, "m")
    assert stored == dataclasses.replace(running, lease_expires_at=NOW, progress_percent=9.0, progress_message="m")
    stale = await store.update_task(running.task_id, Expect(S.RUNNING, lease_token=6), TaskChange.complete(S.RUNNING, b"", NOW))
    assert not stale.applied and store.tasks[running.task_id] == stored


def test_only_the_constructors_build_a_change() -> None:
    """Product code builds a TaskChange only through its transition's
    constructor (so through the state machine), never field by field."""
    offenders = []
    for folder in ("leasesched", "services", "trigger", "worker"):
        for path in (REPO / folder).rglob("*.py"):
            if path == REPO / "leasesched" / "changes.py" or "v1" in path.relative_to(REPO).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                    if name == "TaskChange":
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []

