"""Fair share on real processes (issue 15): ``concurrency_key`` survives the
round trip through Cassandra, and a flood under one key does not hold back a
few tasks under another (one worker with few slots, so tasks queue in the
trigger's dispatcher, where fair share decides)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.cluster import LiveCluster, wait_for

FLOOD = 300
FEW = 5


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


def starts(cluster: LiveCluster) -> dict[str, float]:
    """task id → first START time, from the execution ledger."""
    first: dict[str, float] = {}
    for record in cluster.read_jsonl(cluster.ledger):
        if record["event"] == "start":
            first.setdefault(record["task_id"], record["t"])
    return first


def test_a_flood_under_one_key_does_not_hold_back_another_key(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=2)
    with ThreadPoolExecutor(8) as pool:
        flood = list(pool.map(lambda _: cluster.schedule(seconds=0.2, concurrency_key="flood"), range(FLOOD)))
    scheduled_at = time.time()
    few = [cluster.schedule(seconds=0.05, concurrency_key="quiet") for _ in range(FEW)]
    wait_for(lambda: all(t in starts(cluster) for t in few), 120, f"the {FEW} tasks of the second key to start")
    seen = starts(cluster)
    last_few = max(seen[t] for t in few)
    flood_before = sum(1 for t in flood if t in seen and seen[t] <= last_few)
    flood_meanwhile = sum(1 for t in flood if t in seen and scheduled_at <= seen[t] <= last_few)
    # Without fair share the few wait behind every flood task still queued (FIFO within a priority).
    assert flood_before < FLOOD // 2, f"{flood_before} flood tasks started before the last of the {FEW} others"
    # With it they alternate: 5 others need about 10 dispatches (2 slots, tasks still in flight).
    assert flood_meanwhile <= 3 * FEW + 4, f"{flood_meanwhile} flood tasks started while the {FEW} others waited"


AGEING_STEP_S = 1.0


def test_ageing_starts_a_low_priority_task_under_a_steady_high_priority_stream(make_cluster) -> None:
    """A priority-0 task under a stream of priority-9 tasks that keeps one
    slot's queue full: without ageing it would wait for as long as the stream
    lasts; with a step of 1 s and the cap 9 it reaches the top level after
    (9 - 0) x 1 s, then starts with the next free slot (DispatchPolicy)."""
    cluster = make_cluster(
        overrides={"priority_ageing_step_s": AGEING_STEP_S, "priority_ageing_cap": 9}, triggers=1, workers=1, slots=1
    )
    stop = threading.Event()
    stream: list[str] = []

    def feed() -> None:  # ~5 tasks a second of 0.3 s each into one slot (about 3 a second): the queue only grows
        while not stop.is_set():
            stream.append(cluster.schedule(seconds=0.3, priority=9, lease_s=10.0))
            stop.wait(0.2)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        wait_for(lambda: len(starts(cluster)) >= 3, 60, "the priority-9 stream to run")
        low = cluster.schedule(seconds=0.05, priority=0, lease_s=10.0)
        due = time.time()
        wait_for(lambda: low in starts(cluster), 60, "the priority-0 task to start")
    finally:
        stop.set()
        feeder.join(10)
    waited = starts(cluster)[low] - due
    bound = (9 - 0) * AGEING_STEP_S + 0.3  # the promotions, then the task in the slot finishes
    assert waited <= bound + 2.0, f"the priority-0 task waited {waited:.1f} s, over the bound of {bound:.1f} s (+2 s dispatch slack)"
    # It really was starved until aged: priority-9 tasks kept starting before it.
    seen = starts(cluster)
    overtaken = sum(1 for t in stream if t in seen and due < seen[t] < seen[low])
    assert overtaken >= 5, f"only {overtaken} priority-9 tasks started before it: the stream did not hold it back"
