"""ScheduleTasks (issue 17) against a real cluster (TaskService, a trigger and
a worker as processes, on the session's Cassandra and ZooKeeper; auth off,
so the per-task namespace check is covered by tests/unit/test_schedule_batch.py):
a batch's tasks all run; good and bad tasks in one call each get their own
result and the bad ones leave nothing behind (not even their idempotency
key); a key repeated inside a call and across calls names one task; a call
over the limit is refused whole, naming it."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc
import pytest

from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import NAMESPACE, LiveCluster, wait_for

Code = grpc.StatusCode
TIMEOUT = 20.0


def task(namespace: str = NAMESPACE, type: str = "chaos.work", payload: bytes = b"", key: str = "", later: bool = False) -> pb.ScheduleTaskRequest:
    spec = pb.TaskSpec(namespace=namespace, type=type, payload=payload)
    if later:
        spec.delay.FromSeconds(3600)
    return pb.ScheduleTaskRequest(task=spec, idempotency_key=key)


def codes(reply: pb.ScheduleTasksResponse) -> list[Code]:
    by_number = {c.value[0]: c for c in Code}
    return [Code.OK if r.WhichOneof("result") == "scheduled" else by_number[r.error.code] for r in reply.results]


def listed(cluster: LiveCluster, namespace: str) -> set[str]:
    reply = cluster.stub.ListTasks(pb.ListTasksRequest(namespace=namespace, page_size=1000), timeout=TIMEOUT)
    assert not reply.next_page_token
    return {t.task_id for t in reply.tasks}


def test_schedule_batches(make_cluster: Any) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=1, slots=8)
    stub = cluster.stub
    started = time.monotonic()

    # -- 50 tasks in one call: all accepted, in order, and all run.
    work = json.dumps({"seconds": 0.01}).encode()
    reply = stub.ScheduleTasks(pb.ScheduleTasksRequest(tasks=[task(payload=work) for _ in range(50)]), timeout=TIMEOUT)
    assert codes(reply) == [Code.OK] * 50 and all(r.scheduled.created for r in reply.results)
    ids = [r.scheduled.task_id for r in reply.results]
    assert len(set(ids)) == 50
    views = cluster.wait_terminal(ids, timeout=40)
    assert {v.status for v in views.values()} == {pb.SUCCEEDED}
    print(f"\n50 tasks scheduled and run in {time.monotonic() - started:.1f} s")

    # -- good and bad tasks in one call, each with its own result.
    ns = f"batch-{uuid.uuid4().hex[:8]}"
    too_big = b"x" * (cluster.cfg.max_payload_bytes + 1)
    mixed = [
        task(ns, later=True, key="a"),                      # 0 created
        task(ns, type="9bad", later=True, key="bad-key"),   # 1 bad type (its key must stay unused)
        task(ns, payload=too_big, later=True),              # 2 payload over the limit
        task(ns, later=True, key="a"),                      # 3 the same key and request: task 0
        task(ns, type="other", later=True, key="a"),        # 4 the same key, another request
        task(ns, later=True),                               # 5 created
    ]  # fmt: skip
    reply = stub.ScheduleTasks(pb.ScheduleTasksRequest(tasks=mixed), timeout=TIMEOUT)
    assert codes(reply) == [Code.OK, Code.INVALID_ARGUMENT, Code.INVALID_ARGUMENT, Code.OK, Code.ALREADY_EXISTS, Code.OK]
    results = reply.results
    assert results[1].error.message.startswith("tasks[1]: type '9bad' is invalid")
    assert results[2].error.message.startswith(f"tasks[2]: payload is {len(too_big)} bytes, over the limit")
    assert results[4].error.message.startswith("tasks[4]: idempotency_key 'a' was already used")
    first = results[0].scheduled.task_id
    assert results[3].scheduled.task_id == first
    assert sorted([results[0].scheduled.created, results[3].scheduled.created]) == [False, True]
    assert listed(cluster, ns) == {first, results[5].scheduled.task_id}  # nothing of the refused ones
    # Across calls: the same key finds the same task; the refused task's key was never bound.
    again = stub.ScheduleTasks(
        pb.ScheduleTasksRequest(tasks=[task(ns, later=True, key="a"), task(ns, later=True, key="bad-key")]), timeout=TIMEOUT
    )
    assert codes(again) == [Code.OK, Code.OK]
    assert again.results[0].scheduled.task_id == first and not again.results[0].scheduled.created
    assert again.results[1].scheduled.created
    single = stub.ScheduleTask(task(ns, later=True, key="a"), timeout=TIMEOUT)  # and ScheduleTask agrees
    assert single.task_id == first and not single.created

    # -- over the limit (or empty): refused whole, naming the limit; nothing written.
    for count in (501, 0):
        with pytest.raises(grpc.RpcError) as info:
            stub.ScheduleTasks(pb.ScheduleTasksRequest(tasks=[task(ns, later=True)] * count), timeout=TIMEOUT)
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert f"tasks {count} entries is out of range 1..500 entries" in str(info.value.details())
    wait_for(lambda: len(listed(cluster, ns)) == 3, 5, "the listing to hold the three created tasks only")
    print(f"all in {time.monotonic() - started:.1f} s")
