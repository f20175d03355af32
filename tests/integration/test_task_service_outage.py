"""TaskService while Cassandra is down, and after it comes back (issue 2).

In a module of its own: it stops the session's shared Cassandra, and a failure
here must not cascade into other modules. The ``finally`` below starts
Cassandra again whatever happens, so the rest of the session finds it running.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from leasesched.config import Config
from leasesched.infra.local import LocalInfra
from leasesched.testing import RunningProcess
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

T = TypeVar("T")

# A call while Cassandra is down must fail fast, not hang: the driver's request
# timeout is 5 s and a client waiting longer than this would be a bug.
PROMPT_S = 15.0
RECOVERY_S = 90.0


def _spec(ns: str) -> pb.TaskSpec:
    s = pb.TaskSpec(namespace=ns, type="outage.test", payload=b"p")
    s.delay.FromSeconds(3600)
    return s


def _unavailable_promptly(call: Callable[..., Any], request: Any) -> grpc.RpcError:
    started = time.monotonic()
    try:
        call(request, timeout=60)  # far above PROMPT_S, so a hang is measured, not cut off
    except grpc.RpcError as err:
        elapsed = time.monotonic() - started
        assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{err.code().name}: {err.details()}"
        assert "Cassandra" in (err.details() or ""), err.details()
        assert elapsed < PROMPT_S, f"UNAVAILABLE only after {elapsed:.1f} s"
        return err
    raise AssertionError(f"{call} succeeded while Cassandra was stopped")


def _eventually(probe: Callable[[], T], timeout: float, what: str) -> T:
    """``probe()``'s first result that does not raise grpc.RpcError, within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            return probe()
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not within {timeout:.0f} s; last error {last}")
        time.sleep(0.25)


def test_cassandra_outage_is_unavailable_then_recovers(
    infra: LocalInfra, module_config: Config, task_service: RunningProcess, task_stub: pb_grpc.TaskServiceStub
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:10]}"
    before = [task_stub.ScheduleTask(pb.ScheduleTaskRequest(task=_spec(ns)), timeout=10).task_id for _ in range(3)]
    pid = task_service.pid

    try:
        assert infra.cassandra.stop(), "Cassandra was not running"
        assert not infra.cassandra.status().listening

        _unavailable_promptly(task_stub.ScheduleTask, pb.ScheduleTaskRequest(task=_spec(ns)))
        _unavailable_promptly(
            task_stub.ScheduleTask, pb.ScheduleTaskRequest(task=_spec(ns), idempotency_key="during-outage")
        )
        _unavailable_promptly(task_stub.PollTask, pb.PollTaskRequest(task_id=before[0]))
        _unavailable_promptly(task_stub.CancelTask, pb.CancelTaskRequest(task_id=before[1]))
        _unavailable_promptly(task_stub.ListTasks, pb.ListTasksRequest(namespace=ns))
        # Bad input is still told apart from the outage: validation needs no store.
        try:
            task_stub.PollTask(pb.PollTaskRequest(task_id="nope"), timeout=10)
            raise AssertionError("a malformed id was accepted")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert task_service.is_running()
    finally:
        if not infra.cassandra.is_running():
            infra.cassandra.start()
        infra.cassandra.wait_ready(module_config.cassandra_start_timeout_s)

    # The same process recovers by itself: no restart, no reconnect command.
    first = _eventually(lambda: task_stub.PollTask(pb.PollTaskRequest(task_id=before[0]), timeout=10), RECOVERY_S, "PollTask")
    assert task_service.is_running() and task_service.pid == pid
    assert first.task.status == pb.SCHEDULED

    # Tasks accepted before the outage are all still there, unchanged.
    for task_id in before:
        assert task_stub.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10).task.status == pb.SCHEDULED
    # Writes work again (conditional ones included), and nothing the outage refused was half-created.
    after = _eventually(
        lambda: task_stub.ScheduleTask(pb.ScheduleTaskRequest(task=_spec(ns), idempotency_key="during-outage"), timeout=10),
        RECOVERY_S,
        "ScheduleTask",
    )
    assert after.created
    cancelled = task_stub.CancelTask(pb.CancelTaskRequest(task_id=before[1]), timeout=10).task
    assert cancelled.status == pb.CANCELLED
    listed = task_stub.ListTasks(pb.ListTasksRequest(namespace=ns, page_size=100), timeout=10).tasks
    assert {t.task_id for t in listed} == {*before, after.task_id}
