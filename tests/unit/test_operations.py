"""Operator actions over the in-memory store: each transition, each conflict
(a stale version is FAILED_PRECONDITION and changes nothing, also when the
task changes between the action's read and its write), the version's
stability under heartbeats, the history entries, and the roles."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest

from leasesched import auth
from leasesched.auth import Principal, current_principal
from leasesched.config import Config
from leasesched.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from leasesched.history import AttemptOutcome, HistoryKind, Operation
from leasesched.lifecycle import Lifecycle, OperatorAction
from leasesched.model import DueEntry, RetryPolicy, Task, Timeouts, now_ms
from leasesched.server.auth_interceptor import roles_for
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.versions import version_of
from services.operator_service import OperatorService

ACT = OperatorAction("alice", "because")
STALE = "0000000000000000"


def new_task(**kw: object) -> Task:
    now = now_ms()
    base: dict[str, object] = dict(
        task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"p", shard=3, created_at=now, run_at=now,
        first_run_at=now, retry=RetryPolicy(maximum_attempts=3, initial_interval_ms=600_000),
    )  # fmt: skip
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


async def running(store: MemoryStore, life: Lifecycle, **kw: object) -> Task:
    task = (await life.schedule(new_task(**kw))).task
    await life.claim(task.task_id, "w1", 0)
    found = await life.read(task.task_id)
    assert found is not None
    return found


async def failed(store: MemoryStore, life: Lifecycle) -> Task:
    task = await running(store, life)
    await life.fail(task.task_id, task.lease_token, "boom", "ValueError", non_retryable=True)
    return store.tasks[task.task_id]


async def waiting(store: MemoryStore, life: Lifecycle) -> Task:
    """SCHEDULED at attempt 2, due in about ten minutes (its retry backoff)."""
    task = await running(store, life)
    await life.fail(task.task_id, task.lease_token, "boom", "ValueError")
    found = store.tasks[task.task_id]
    assert found.status == TaskStatus.SCHEDULED and found.attempt == 2 and found.run_at > now_ms() + 60_000
    return found


# ------------------------------------------------------------------ the version


async def test_version_changes_with_every_state_change_but_not_with_a_heartbeat(store: MemoryStore, life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    seen = [version_of(task)]
    lease = await life.claim(task.task_id, "w1", 0)
    seen.append(version_of(store.tasks[task.task_id]))
    await life.heartbeat(task.task_id, lease.token, 50.0, "half way")
    assert version_of(store.tasks[task.task_id]) == seen[-1]  # progress and a renewed lease: same version
    await life.cancel(task.task_id)  # a running task: only the cancel request
    seen.append(version_of(store.tasks[task.task_id]))
    await life.acknowledge_cancel(task.task_id, lease.token, "stopped")
    seen.append(version_of(store.tasks[task.task_id]))
    assert len(set(seen)) == len(seen), seen


async def test_retry_then_mark_failed_then_retry_never_repeats_a_version(store: MemoryStore, life: Lifecycle) -> None:
    """The one transition that resets a column (retry: attempt 1) raises the lease token: no ABA."""
    task = await failed(store, life)
    seen = [version_of(task)]
    at = now_ms() + 60_000
    for _ in range(3):
        done = await life.retry(task.task_id, seen[-1], ACT, run_at=at)
        seen.append(version_of(done))
        done = await life.mark_failed(task.task_id, seen[-1], ACT)
        seen.append(version_of(done))
    assert len(set(seen)) == len(seen), seen


# ------------------------------------------------------------------ retry


async def test_retry_resets_the_budget_raises_the_token_and_schedules_a_run(store: MemoryStore, life: Lifecycle) -> None:
    task = await failed(store, life)
    store.due.clear()
    done = await life.retry(task.task_id, version_of(task), ACT, payload=b"new")
    stored = store.tasks[task.task_id]
    assert stored == done
    assert (stored.status, stored.attempt, stored.lease_token) == (TaskStatus.SCHEDULED, 1, task.lease_token + 1)
    assert stored.payload == b"new" and stored.error == "" and stored.finished_at is None and stored.run_at <= now_ms()
    (entry,) = store.due
    assert (entry.kind, entry.attempt, entry.lease_token) == (DueEntry.RUN, 1, stored.lease_token)
    # The old lease's late report stays refused: the token only grows.
    with pytest.raises(FailedPrecondition):
        await life.fail(task.task_id, task.lease_token, "late", "X")
    lease = await life.claim(task.task_id, "w2", 1)
    assert lease.token == task.lease_token + 2
    assert await life.complete(task.task_id, lease.token, b"ok") == TaskStatus.SUCCEEDED


async def test_retry_of_a_cancelled_task_at_a_time_with_a_fresh_deadline(store: MemoryStore, life: Lifecycle) -> None:
    task = (await life.schedule(new_task(timeouts=Timeouts(schedule_to_close_ms=5000), deadline_at=now_ms() + 5000))).task
    cancelled = await life.cancel(task.task_id)
    assert cancelled.status == TaskStatus.CANCELLED
    at = now_ms() + 3_600_000
    done = await life.retry(task.task_id, version_of(cancelled), ACT, run_at=at)
    assert done.status == TaskStatus.SCHEDULED and done.run_at == at and done.deadline_at == at + 5000
    assert not done.cancel_requested and done.payload == b"p"


async def test_retry_of_a_running_or_succeeded_task_is_refused(store: MemoryStore, life: Lifecycle) -> None:
    task = await running(store, life)
    with pytest.raises(FailedPrecondition, match="RUNNING"):
        await life.retry(task.task_id, version_of(task), ACT)
    await life.complete(task.task_id, task.lease_token, b"")
    done = store.tasks[task.task_id]
    with pytest.raises(FailedPrecondition, match="SUCCEEDED"):
        await life.retry(task.task_id, version_of(done), ACT)
    assert store.tasks[task.task_id] == done


# ------------------------------------------------------------------ resume, mark failed


async def test_resume_makes_a_waiting_retry_due_now(store: MemoryStore, life: Lifecycle) -> None:
    task = await waiting(store, life)
    store.due.clear()
    done = await life.resume(task.task_id, version_of(task), ACT)
    assert done.status == TaskStatus.SCHEDULED and done.attempt == 2 and done.run_at <= now_ms()
    (entry,) = store.due
    assert entry.attempt == 2 and entry.due_at <= now_ms()
    with pytest.raises(FailedPrecondition, match="due already"):
        await life.resume(task.task_id, version_of(done), ACT)


async def test_resume_of_a_first_attempt_is_refused(store: MemoryStore, life: Lifecycle) -> None:
    task = (await life.schedule(new_task(run_at=now_ms() + 60_000))).task
    with pytest.raises(FailedPrecondition, match="attempt 1"):
        await life.resume(task.task_id, version_of(task), ACT)
    assert store.tasks[task.task_id] == task


async def test_mark_failed(store: MemoryStore, life: Lifecycle) -> None:
    task = await waiting(store, life)
    done = await life.mark_failed(task.task_id, version_of(task), OperatorAction("alice", "do not retry"))
    assert (done.status, done.error_type, done.error) == (TaskStatus.FAILED, "MarkedFailed", "do not retry")
    assert store.tasks[task.task_id] == done
    with pytest.raises(FailedPrecondition):  # a worker's claim of a stale dispatch: refused
        await life.claim(task.task_id, "w1", 2, now=task.run_at)


# ------------------------------------------------------------------ terminate


async def test_terminate_fences_the_worker_and_gives_back_its_slots(store: MemoryStore, life: Lifecycle) -> None:
    task = await running(store, life)
    released: list[tuple[uuid.UUID, int]] = []

    async def release(t: Task, token: int) -> None:
        released.append((t.task_id, token))

    life.admission.release = release  # type: ignore[method-assign]
    done = await life.terminate(task.task_id, version_of(task), OperatorAction("alice", "stuck"))
    assert (done.status, done.error_type, done.error) == (TaskStatus.FAILED, "Terminated", "stuck")
    assert done.lease_token == task.lease_token + 1 and done.lease_expires_at is None
    assert released == [(task.task_id, task.lease_token)]
    # Heartbeat, completion and failure under the old token: all refused (fenced).
    with pytest.raises(FailedPrecondition, match="lease lost"):
        await life.heartbeat(task.task_id, task.lease_token, 10.0, "")
    with pytest.raises(FailedPrecondition):
        await life.complete(task.task_id, task.lease_token, b"late")
    with pytest.raises(FailedPrecondition):
        await life.fail(task.task_id, task.lease_token, "late", "X")
    assert store.tasks[task.task_id] == done
    # The trigger's lease check of the old lease finds nothing to do.
    assert await life.expire_lease(store.tasks[task.task_id], now=now_ms() + 10**7) is None


async def test_terminate_writes_the_ended_attempt_and_the_operation_to_history(store: MemoryStore, life: Lifecycle) -> None:
    task = await running(store, life)
    await life.terminate(task.task_id, version_of(task), OperatorAction("alice", "stuck"))
    entries = await store.read_history(task.task_id, 10)
    attempt = [e for e in entries if e.kind is HistoryKind.ATTEMPT]
    operation = [e for e in entries if e.kind is HistoryKind.OPERATION]
    assert [(e.outcome, e.lease_token, e.worker_id, e.started_at) for e in attempt] == [
        (AttemptOutcome.TERMINATED, task.lease_token, "w1", task.started_at)
    ]
    assert [(e.operation, e.operator, e.reason, e.lease_token) for e in operation] == [
        (Operation.TERMINATE, "alice", "stuck", task.lease_token + 1)
    ]
    assert operation[0].entry_id is not None


async def test_a_failed_history_write_does_not_fail_the_operation(store: MemoryStore, life: Lifecycle) -> None:
    task = await waiting(store, life)
    store.fail_next.add("add_history")
    done = await life.mark_failed(task.task_id, version_of(task), ACT)
    assert store.tasks[task.task_id].status == TaskStatus.FAILED == done.status


# ------------------------------------------------------------------ conflicts


async def _each_op(store: MemoryStore, life: Lifecycle) -> list[tuple[str, Task, Any]]:
    """(name, task in the state the operation needs, the call with a version)."""
    return [
        ("retry", await failed(store, life), life.retry),
        ("resume", await waiting(store, life), life.resume),
        ("mark_failed", await waiting(store, life), life.mark_failed),
        ("terminate", await running(store, life), life.terminate),
    ]


async def test_each_operation_with_a_stale_version_changes_nothing(store: MemoryStore, life: Lifecycle) -> None:
    for name, task, call in await _each_op(store, life):
        due = set(store.due)
        with pytest.raises(FailedPrecondition) as err:
            await call(task.task_id, STALE, ACT)
        assert "expected_version" in str(err.value) and version_of(task) in str(err.value), name
        assert store.tasks[task.task_id] == task, name
        assert set(store.due) == due, name  # not even a due entry
        assert not store.history.get(task.task_id, {}) or all(
            e.kind is not HistoryKind.OPERATION for e in store.history[task.task_id].values()
        ), name


async def test_each_operation_loses_to_a_change_between_its_read_and_its_write(store: MemoryStore, life: Lifecycle) -> None:
    """The version is the write's condition, not only a check before it: a
    change landing in between (here: a cancel request, a resume by someone
    else, a worker's report) makes the write fail, with nothing written."""
    for name, task, call in await _each_op(store, life):
        version = version_of(task)
        real_update = store.update_task
        moved: dict[str, Task] = {}

        async def racing_update(task_id: uuid.UUID, expect: Any, change: Any) -> Any:
            store.update_task = real_update  # type: ignore[method-assign]
            now = store.tasks[task_id]
            # Someone else's change of a version column, with the status and the token kept.
            store.tasks[task_id] = now.replace(cancel_requested=not now.cancel_requested)
            moved["task"] = store.tasks[task_id]
            return await real_update(task_id, expect, change)

        store.update_task = racing_update  # type: ignore[method-assign]
        with pytest.raises(FailedPrecondition) as err:
            await call(task.task_id, version, ACT)
        assert version_of(moved["task"]) in str(err.value), name
        assert store.tasks[task.task_id] == moved["task"], name


# ------------------------------------------------------------------ the service and the roles


def test_roles_of_the_operator_service() -> None:
    for method in ("RetryTask", "ResumeTask", "MarkTaskFailed", "TerminateTask", "BulkOperate"):
        assert roles_for(f"/leasesched.v1.OperatorService/{method}") == {"operator", "admin"}
    assert roles_for("/leasesched.v1.TaskService/PollTask") == {"client", "operator", "admin"}
    assert roles_for("/leasesched.v1.TaskService/ListTasks") == {"client", "operator", "admin"}
    # An operator reads what the dashboard shows: counts, history, schedules, gates, limits; it changes none.
    for read in ("TaskService/CountTasks", "TaskService/GetTaskHistory", "ScheduleService/ListSchedules",
                 "ScheduleService/DescribeSchedule", "GateService/ListGates", "LimitService/ListLimits"):  # fmt: skip
        assert "operator" in roles_for(f"/leasesched.v1.{read}"), read
    for change in ("TaskService/CancelTask", "ScheduleService/CreateSchedule", "GateService/SetGate", "LimitService/SetLimit"):
        assert "operator" not in roles_for(f"/leasesched.v1.{change}"), change
    assert roles_for("/leasesched.v1.TaskService/ScheduleTask") == {"client", "admin"}
    assert roles_for("/leasesched.v1.TaskService/CancelTask") == {"client", "admin"}
    assert "operator" in auth.ROLES
    _, record = auth.new_token("ns", "operator", "alice")
    assert record.role == "operator"


async def test_service_names_the_operator_and_checks_the_namespace(store: MemoryStore, life: Lifecycle) -> None:
    service = OperatorService(Config(), life)
    task = await waiting(store, life)
    request = pb.MarkTaskFailedRequest(task_id=str(task.task_id), expected_version=version_of(task), reason="cleanup")
    token = current_principal.set(Principal("abcd", "other", "operator", "bob"))
    try:
        with pytest.raises(PermissionDenied):
            await service.MarkTaskFailed(request, None)  # type: ignore[arg-type]
        assert store.tasks[task.task_id] == task
        current_principal.set(Principal("abcd", "ns", "operator", "alice"))
        reply = await service.MarkTaskFailed(request, None)  # type: ignore[arg-type]
    finally:
        current_principal.reset(token)
    assert reply.task.status == pb.FAILED and reply.task.version == version_of(store.tasks[task.task_id])
    (entry,) = [e for e in store.history[task.task_id].values() if e.kind is HistoryKind.OPERATION]
    assert entry.operator == "alice" and entry.reason == "cleanup"


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.RetryTaskRequest(task_id="nope", expected_version="v", reason="r"), "task_id"),
        (pb.RetryTaskRequest(task_id=str(uuid.uuid4()), reason="r"), "expected_version"),
        (pb.RetryTaskRequest(task_id=str(uuid.uuid4()), expected_version="v"), "reason"),
        (pb.RetryTaskRequest(task_id=str(uuid.uuid4()), expected_version="v", reason="x" * 501), "reason"),
        (pb.RetryTaskRequest(task_id=str(uuid.uuid4()), expected_version="v", reason="r", payload=b"x" * 2048,
                             has_payload=True), "payload"),  # fmt: skip
    ],
)
async def test_bad_input_names_the_field(life: Lifecycle, request_: pb.RetryTaskRequest, field: str) -> None:
    service = OperatorService(Config(max_payload_bytes=1024), life)
    with pytest.raises(InvalidArgument, match=field):
        await service.RetryTask(request_, None)  # type: ignore[arg-type]


async def test_bulk_applies_by_filter_counts_conflicts_and_honours_max_count(store: MemoryStore, life: Lifecycle) -> None:
    service = OperatorService(Config(), life)
    tasks = [await waiting(store, life) for _ in range(4)]
    other = await waiting(store, life)
    store.tasks[other.task_id] = other.replace(type="other")
    request = pb.BulkOperateRequest(
        operation=pb.BULK_MARK_FAILED, namespace="ns", type="t", max_count=10, rate_per_second=1000, reason="cleanup",
        dry_run=True,
    )  # fmt: skip
    dry = await service.BulkOperate(request, None)  # type: ignore[arg-type]
    assert (dry.matched, dry.applied) == (4, 0)
    assert all(store.tasks[t.task_id].status == TaskStatus.SCHEDULED for t in tasks)

    request.dry_run = False
    request.max_count = 3
    answer = await service.BulkOperate(request, None)  # type: ignore[arg-type]
    assert (answer.matched, answer.applied, answer.conflicts, answer.failed) == (3, 3, 0, 0)
    assert sum(store.tasks[t.task_id].status == TaskStatus.FAILED for t in tasks) == 3
    assert store.tasks[other.task_id].status == TaskStatus.SCHEDULED
    assert set(answer.applied_task_ids) <= {str(t.task_id) for t in tasks}


async def test_bulk_refuses_a_bad_filter(life: Lifecycle) -> None:
    service = OperatorService(Config(), life)
    base = dict(operation=pb.BULK_RETRY, namespace="ns", max_count=1, reason="r")
    for bad, field in (
        ({"max_count": 0}, "max_count"), ({"max_count": 10_001}, "max_count"), ({"rate_per_second": 1001}, "rate_per_second"),
        ({"status": pb.RUNNING}, "status"), ({"operation": 0}, "operation"), ({"reason": ""}, "reason"),
    ):  # fmt: skip
        with pytest.raises(InvalidArgument, match=field):
            await service.BulkOperate(pb.BulkOperateRequest(**{**base, **bad}), None)  # type: ignore[arg-type]


async def test_bulk_counts_a_task_that_changed_since_it_was_listed_as_a_conflict(store: MemoryStore, life: Lifecycle) -> None:
    service = OperatorService(Config(), life)
    tasks = [await waiting(store, life) for _ in range(2)]
    real_list = life.list

    async def listed_then_changed(query: Any) -> Any:
        page = await real_list(query)
        victim = tasks[0].task_id
        store.tasks[victim] = store.tasks[victim].replace(run_at=store.tasks[victim].run_at + 1)  # someone moved it
        return page

    life.list = listed_then_changed  # type: ignore[method-assign]
    request = pb.BulkOperateRequest(operation=pb.BULK_MARK_FAILED, namespace="ns", max_count=10, rate_per_second=1000,
                                    reason="cleanup")  # fmt: skip
    answer = await service.BulkOperate(request, None)  # type: ignore[arg-type]
    assert (answer.matched, answer.applied, answer.conflicts) == (2, 1, 1)
    assert store.tasks[tasks[0].task_id].status == TaskStatus.SCHEDULED


def test_grpc_code_of_a_stale_version_is_failed_precondition() -> None:
    from leasesched.server.error_mapping import code_for

    assert code_for(FailedPrecondition("x")) == grpc.StatusCode.FAILED_PRECONDITION


async def test_bulk_stops_before_the_calls_time_limit_and_says_so(store: MemoryStore, life: Lifecycle) -> None:
    """The server cuts a call at rpc_timeout_s: a bulk paced past it answers what
    it did before then (stopped_at_time_limit), never loses its counts."""
    service = OperatorService(Config(rpc_timeout_s=3.2), life)  # 0.5 s of work after the 3 s margin
    tasks = [await waiting(store, life) for _ in range(5)]
    request = pb.BulkOperateRequest(operation=pb.BULK_MARK_FAILED, namespace="ns", max_count=10, rate_per_second=2,
                                    reason="cleanup")  # fmt: skip
    answer = await service.BulkOperate(request, None)  # type: ignore[arg-type]
    assert answer.stopped_at_time_limit and answer.applied == answer.matched == 1, answer
    assert sum(store.tasks[t.task_id].status == TaskStatus.FAILED for t in tasks) == 1
    answer = await OperatorService(Config(), life).BulkOperate(request, None)  # type: ignore[arg-type]
    assert not answer.stopped_at_time_limit and answer.applied == 4
