"""Fair share on real processes (issue 15): ``concurrency_key`` survives the
round trip through Cassandra."""

from __future__ import annotations

import uuid

from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc


def test_concurrency_key_round_trip_through_schedule_poll_and_list(task_stub: pb_grpc.TaskServiceStub) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    spec = pb.TaskSpec(namespace=namespace, type="t", concurrency_key="partner-7")
    spec.delay.FromSeconds(3600)
    keyed = task_stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec, idempotency_key="k1"), timeout=10).task_id
    plain = pb.TaskSpec(namespace=namespace, type="t")
    plain.delay.FromSeconds(3600)
    unkeyed = task_stub.ScheduleTask(pb.ScheduleTaskRequest(task=plain), timeout=10).task_id
    assert task_stub.PollTask(pb.PollTaskRequest(task_id=keyed), timeout=10).task.concurrency_key == "partner-7"
    assert task_stub.PollTask(pb.PollTaskRequest(task_id=unkeyed), timeout=10).task.concurrency_key == ""
    listed = task_stub.ListTasks(pb.ListTasksRequest(namespace=namespace), timeout=10).tasks
    assert {v.task_id: v.concurrency_key for v in listed} == {keyed: "partner-7", unkeyed: ""}
    # The key is part of the request: the same idempotency key with another group is refused.
    other = pb.TaskSpec()
    other.CopyFrom(spec)
    other.concurrency_key = "partner-8"
    try:
        task_stub.ScheduleTask(pb.ScheduleTaskRequest(task=other, idempotency_key="k1"), timeout=10)
    except Exception as err:  # noqa: BLE001 - grpc.RpcError
        assert err.code().name == "ALREADY_EXISTS"  # type: ignore[attr-defined]
    else:
        raise AssertionError("a different concurrency_key under the same idempotency key was accepted")
    bad = pb.TaskSpec(namespace=namespace, type="t", concurrency_key="a b")
    try:
        task_stub.ScheduleTask(pb.ScheduleTaskRequest(task=bad), timeout=10)
    except Exception as err:  # noqa: BLE001
        assert err.code().name == "INVALID_ARGUMENT" and "concurrency_key" in err.details()  # type: ignore[attr-defined]
    else:
        raise AssertionError("a malformed concurrency_key was accepted")
