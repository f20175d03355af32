"""Operator actions (OperatorService) on real processes, Cassandra and ZooKeeper:
retry, resume, mark failed, terminate, each conditional on the task's version.

Every action is tried first with a stale version: FAILED_PRECONDITION naming
``expected_version``, and the task unchanged. Terminate is shown on a handler
that ignores cancellation (``chaos.stubborn_process``): the execution ledger
shows it really stopped, no completion under the old lease was accepted, and
the worker logged the lost lease.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from leasesched.config import Config
from leasesched.loadtest import ledger as ledger_mod
from leasesched.history import HistoryEntry, HistoryKind, Operation
from leasesched.store.cassandra import CassandraStore
from leasesched.testing import RunningProcess
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.cluster import NAMESPACE, LiveCluster, wait_for
from tests.tokens import issue_tokens

STALE = "0000000000000000"


def operators(cluster: LiveCluster) -> pb_grpc.OperatorServiceStub:
    return pb_grpc.OperatorServiceStub(cluster._client_channel())


def schedule(cluster: LiveCluster, type_: str, lease_s: float = 3.0, max_attempts: int = 3, retry_initial_s: float = 0.5,
             **payload: Any) -> str:  # fmt: skip
    spec = pb.TaskSpec(namespace=NAMESPACE, type=type_, payload=json.dumps(payload).encode())
    spec.lease_duration.FromMilliseconds(int(lease_s * 1000))
    spec.retry_policy.maximum_attempts = max_attempts
    spec.retry_policy.initial_interval.CopyFrom(Duration(seconds=int(retry_initial_s), nanos=int(retry_initial_s * 1e9) % 10**9))
    return cluster.stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10).task_id


def executions(cluster: LiveCluster, task_id: str) -> dict[int, dict[str, Any]]:
    """lease token → {event: wall time, "attempt": n} from the execution ledger."""
    runs: dict[int, dict[str, Any]] = {}
    for r in cluster.read_jsonl(cluster.ledger):
        if r.get("task_id") == task_id and "token" in r:
            runs.setdefault(r["token"], {}).update({r["event"]: r["t"], "attempt": r["attempt"]})
    return runs


def history(cfg: Config, task_id: str) -> list[HistoryEntry]:
    async def read() -> list[HistoryEntry]:
        store = CassandraStore(cfg)
        await store.connect()
        try:
            return await store.read_history(uuid.UUID(task_id), 50)
        finally:
            await store.close()

    return asyncio.run(read())


def assert_conflict(call: Any, request: Any, before: pb.TaskView, cluster: LiveCluster) -> None:
    """A stale expected_version: FAILED_PRECONDITION naming the field and the current version; nothing changed."""
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert "expected_version" in err.value.details() and before.version in err.value.details(), err.value.details()
    after = cluster.poll(before.task_id)
    assert (after.status, after.attempt, after.lease_token, after.version) == (
        before.status, before.attempt, before.lease_token, before.version,
    )  # fmt: skip


def waiting_for_backoff(cluster: LiveCluster, task_id: str) -> pb.TaskView:
    def check() -> pb.TaskView | None:
        view = cluster.poll(task_id)
        return view if view.status == pb.SCHEDULED and view.attempt == 2 else None

    return wait_for(check, 30, "the task to wait for its retry backoff")


def test_retry_a_failed_task_with_a_new_payload_then_it_succeeds(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=2)
    task_id = cluster.schedule(seconds=0.05, fail=1, permanent=True, max_attempts=5)
    failed = cluster.wait_terminal([task_id], 30)[task_id]
    assert failed.status == pb.FAILED and failed.error_type == "PermanentError" and failed.version

    ops = operators(cluster)
    good = json.dumps({"seconds": 0.05}).encode()
    stale = pb.RetryTaskRequest(task_id=task_id, expected_version=STALE, reason="fixed the input", payload=good, has_payload=True)
    assert_conflict(ops.RetryTask, stale, failed, cluster)
    with pytest.raises(grpc.RpcError) as err:  # the reason is required
        ops.RetryTask(pb.RetryTaskRequest(task_id=task_id, expected_version=failed.version), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in err.value.details()

    reply = ops.RetryTask(
        pb.RetryTaskRequest(task_id=task_id, expected_version=failed.version, reason="fixed the input", payload=good,
                            has_payload=True), timeout=10,
    ).task  # fmt: skip
    assert reply.status == pb.SCHEDULED and reply.attempt == 1 and reply.lease_token == failed.lease_token + 1
    assert reply.version != failed.version
    done = cluster.wait_terminal([task_id], 30)[task_id]
    assert done.status == pb.SUCCEEDED and done.attempt == 1, done
    runs = executions(cluster, task_id)
    assert sorted(runs) == [failed.lease_token, failed.lease_token + 2], runs  # the retry raised the token once
    # The same (now stale) version cannot retry it again: a SUCCEEDED task is never run twice.
    with pytest.raises(grpc.RpcError) as err:
        ops.RetryTask(pb.RetryTaskRequest(task_id=task_id, expected_version=done.version, reason="again"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "SUCCEEDED" in err.value.details()
    ops_entries = [e for e in history(cluster.cfg, task_id) if e.kind is HistoryKind.OPERATION]
    assert [(e.operation, e.reason, e.operator) for e in ops_entries] == [(Operation.RETRY, "fixed the input", "")]


def test_resume_runs_a_task_waiting_for_a_long_backoff_at_once(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=2)
    task_id = cluster.schedule(seconds=0.05, fail=1, max_attempts=3, retry_initial_s=600)
    waiting = waiting_for_backoff(cluster, task_id)
    assert waiting.run_at.ToMilliseconds() > time.time() * 1000 + 400_000  # ten minutes off (less jitter)

    ops = operators(cluster)
    assert_conflict(ops.ResumeTask, pb.ResumeTaskRequest(task_id=task_id, expected_version=STALE, reason="x"), waiting, cluster)
    resumed_at = time.time()
    reply = ops.ResumeTask(pb.ResumeTaskRequest(task_id=task_id, expected_version=waiting.version, reason="the API is back"),
                           timeout=10).task  # fmt: skip
    assert reply.status == pb.SCHEDULED and reply.attempt == 2 and reply.run_at.ToMilliseconds() <= time.time() * 1000
    done = cluster.wait_terminal([task_id], 20)[task_id]
    assert done.status == pb.SUCCEEDED and done.attempt == 2
    second = [r for r in executions(cluster, task_id).values() if r["attempt"] == 2]
    assert len(second) == 1 and second[0]["start"] - resumed_at < 10.0, second


def test_mark_failed_stops_a_waiting_retry(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=2)
    task_id = cluster.schedule(seconds=0.05, fail=1, max_attempts=3, retry_initial_s=600)
    waiting = waiting_for_backoff(cluster, task_id)
    ops = operators(cluster)
    stale = pb.MarkTaskFailedRequest(task_id=task_id, expected_version=STALE, reason="x")
    assert_conflict(ops.MarkTaskFailed, stale, waiting, cluster)
    reply = ops.MarkTaskFailed(
        pb.MarkTaskFailedRequest(task_id=task_id, expected_version=waiting.version, reason="the customer left"), timeout=10
    ).task
    assert reply.status == pb.FAILED and reply.error_type == "MarkedFailed" and reply.error == "the customer left"
    view = cluster.poll(task_id)
    assert view.status == pb.FAILED and view.error_type == "MarkedFailed"
    assert len(executions(cluster, task_id)) == 1  # the waiting retry never ran
    # Nothing that moves a SCHEDULED task applies to it now.
    with pytest.raises(grpc.RpcError) as err:
        ops.ResumeTask(pb.ResumeTaskRequest(task_id=task_id, expected_version=view.version, reason="x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "FAILED" in err.value.details()


def worker_logs(cluster: LiveCluster) -> str:
    return "\n".join(p.log_path.read_text(errors="replace") for p in cluster.workers if p.log_path.exists())


def test_terminate_fences_a_handler_that_ignores_cancellation(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=2)
    task_id = schedule(cluster, "chaos.stubborn_process", lease_s=3.0, max_attempts=3, seconds=600)

    def started() -> pb.TaskView | None:
        view = cluster.poll(task_id)
        return view if view.status == pb.RUNNING and executions(cluster, task_id) else None

    running = wait_for(started, 30, "the stubborn handler to start")
    # A heartbeat (every lease/3) renews the lease but leaves the version alone:
    # a version read before it still terminates the task.
    renewed = wait_for(
        lambda: (v := cluster.poll(task_id)).lease_expires_at.ToMilliseconds() > running.lease_expires_at.ToMilliseconds() and v,
        10, "a heartbeat to renew the lease",
    )  # fmt: skip
    assert renewed.version == running.version

    ops = operators(cluster)
    stale = pb.TerminateTaskRequest(task_id=task_id, expected_version=STALE, reason="x")
    assert_conflict(ops.TerminateTask, stale, running, cluster)
    terminated_at = time.time()
    reply = ops.TerminateTask(
        pb.TerminateTaskRequest(task_id=task_id, expected_version=running.version, reason="stuck for an hour"), timeout=10
    ).task
    assert reply.status == pb.FAILED and reply.error_type == "Terminated" and reply.error == "stuck for an hour"
    assert reply.lease_token == running.lease_token + 1

    # The worker's next heartbeat learns the lease is gone and kills the child:
    # the execution ends (its process seen gone) a heartbeat and a stop later.
    still = cluster.wait_executions_settled(30)
    assert still == [], f"the terminated handler still runs: {still}"
    runs, _ = ledger_mod.executions(ledger_mod.read(cluster.ledger), cluster.exits())
    (run,) = [r for r in runs if r.task_id == task_id]
    # It ran until the terminate, then stopped within a heartbeat (lease/3) and the kill of its child.
    assert run.token == running.lease_token and run.ended == "exit", run.describe()
    assert terminated_at < run.end < terminated_at + 15, run.describe()
    wait_for(lambda: f"lease {running.lease_token} lost" in worker_logs(cluster), 20, "the worker to log the lost lease")
    completions = [r for r in cluster.read_jsonl(cluster.completions) if r["task_id"] == task_id]
    assert completions == []  # no completion under the old token (nor any other) was accepted
    final = cluster.poll(task_id)
    assert final.status == pb.FAILED and final.error_type == "Terminated" and final.lease_token == running.lease_token + 1
    assert len(executions(cluster, task_id)) == 1  # never re-run by a lease expiry
    entries = history(cluster.cfg, task_id)
    assert any(e.kind is HistoryKind.OPERATION and e.operation is Operation.TERMINATE for e in entries), entries
    assert any(e.kind is HistoryKind.ATTEMPT and e.outcome is not None and e.outcome.value == "TERMINATED"
               and e.lease_token == running.lease_token for e in entries), entries  # fmt: skip


def test_roles_client_and_worker_tokens_may_not_operate(module_config: Config, processes_group: Any) -> None:
    """With auth on: an operator token acts on its own namespace's tasks (and reads
    them); a client or worker token gets PERMISSION_DENIED for every operation,
    and an operator of another namespace cannot tell the task exists."""
    admin_tok, client_tok, worker_tok, operator_tok, other_tok = [
        t for t, _ in issue_tokens(module_config, [
            ("ops", "admin", "root"), ("ops", "client", "app"), ("ops", "worker", "w"), ("ops", "operator", "alice"),
            ("elsewhere", "operator", "bob"),
        ])
    ]  # fmt: skip
    cfg = module_config.with_overrides(auth="on", token=admin_tok)
    service: RunningProcess = processes_group.start_serving("task-service", cfg)
    assert service.target

    def stubs(token: str) -> tuple[pb_grpc.TaskServiceStub, pb_grpc.OperatorServiceStub]:
        channel = sync_channel(service.target or "", cfg, token=token)
        return pb_grpc.TaskServiceStub(channel), pb_grpc.OperatorServiceStub(channel)

    tasks, _ = stubs(client_tok)
    spec = pb.TaskSpec(namespace="ops", type="ops.work", payload=b"{}")
    spec.delay.FromSeconds(3600)
    task_id = tasks.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10).task_id
    view = tasks.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10).task
    request = pb.MarkTaskFailedRequest(task_id=task_id, expected_version=view.version, reason="cleanup")
    for token in (client_tok, worker_tok, other_tok):
        _, ops = stubs(token)
        for call, req in ((ops.MarkTaskFailed, request), (ops.TerminateTask, pb.TerminateTaskRequest(
                task_id=task_id, expected_version=view.version, reason="x"))):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                call(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (token[:20], err.value.details())
    assert tasks.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10).task.version == view.version  # unchanged

    op_tasks, ops = stubs(operator_tok)
    with pytest.raises(grpc.RpcError) as err:  # an operator cannot schedule: a client's right
        op_tasks.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert op_tasks.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10).task.version == view.version
    reply = ops.MarkTaskFailed(request, timeout=10).task
    assert reply.status == pb.FAILED and reply.error_type == "MarkedFailed"
    entries = [e for e in history(cfg, task_id) if e.kind is HistoryKind.OPERATION]
    assert [(e.operation, e.operator, e.reason) for e in entries] == [(Operation.MARK_FAILED, "alice", "cleanup")]

    # Bulk, by type, with the operator token: a dry run counts, the real one applies each on its own version.
    bulk_spec = pb.TaskSpec(namespace="ops", type="ops.bulk", payload=b"{}")
    bulk_spec.delay.FromSeconds(3600)
    ids = {tasks.ScheduleTask(pb.ScheduleTaskRequest(task=bulk_spec), timeout=10).task_id for _ in range(3)}
    request_bulk = pb.BulkOperateRequest(operation=pb.BULK_MARK_FAILED, namespace="ops", type="ops.bulk", max_count=10,
                                         rate_per_second=100, reason="bulk cleanup", dry_run=True)  # fmt: skip
    dry = ops.BulkOperate(request_bulk, timeout=40)
    assert (dry.matched, dry.applied) == (3, 0)
    request_bulk.dry_run = False
    done = ops.BulkOperate(request_bulk, timeout=40)
    assert (done.matched, done.applied, done.conflicts, done.failed) == (3, 3, 0, 0) and set(done.applied_task_ids) == ids
    assert all(op_tasks.PollTask(pb.PollTaskRequest(task_id=i), timeout=10).task.error_type == "MarkedFailed" for i in ids)
    _, client_ops = stubs(client_tok)
    with pytest.raises(grpc.RpcError) as err:
        client_ops.BulkOperate(request_bulk, timeout=40)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_version_is_the_condition_of_the_write_on_cassandra(module_config: Config) -> None:
    """On the real store: a change of any version column landing between an
    action's read and its write (here a cancel request: status and token kept)
    makes the LWT fail, nothing written; a heartbeat does not (same version);
    the IF on a null finished_at and on run_at as ms holds."""
    from leasesched.changes import TaskChange
    from leasesched.lifecycle import Lifecycle, OperatorAction
    from leasesched.model import Task, now_ms
    from leasesched.store.base import Expect
    from leasesched.states import TaskStatus
    from leasesched.versions import TaskVersion, version_of

    async def run() -> None:
        store = CassandraStore(module_config)
        await store.connect()
        try:
            life = Lifecycle(store)
            now = now_ms()
            task = Task(task_id=uuid.uuid4(), namespace="ops", type="t", payload=b"", shard=0, created_at=now, run_at=now)
            await life.schedule(task)
            lease = await life.claim(task.task_id, "w1", 0)
            read = await life.read(task.task_id)
            assert read is not None and read.finished_at is None
            await life.heartbeat(task.task_id, lease.token, 5.0, "x")  # not a change of the version
            beaten = await life.read(task.task_id)
            assert beaten is not None and version_of(beaten) == version_of(read)
            # Someone's cancel request lands between the operator's read and write.
            await life.cancel(task.task_id)
            stale = Expect(TaskStatus.RUNNING, lease_token=read.lease_token, version=TaskVersion.of(read))
            result = await store.update_task(task.task_id, stale, TaskChange.terminate(read, "r", now_ms()))
            assert not result.applied
            after = await life.read(task.task_id, serial=True)
            assert after is not None and after.status == TaskStatus.RUNNING and after.lease_token == read.lease_token
            with pytest.raises(Exception, match="expected_version"):
                await life.terminate(task.task_id, version_of(read), OperatorAction("", "r"))
            done = await life.terminate(task.task_id, version_of(after), OperatorAction("", "r"))
            stored = await life.read(task.task_id, serial=True)
            assert stored == done and stored.status == TaskStatus.FAILED and stored.error_type == "Terminated"
        finally:
            await store.close()

    asyncio.run(run())
