"""Issue 16, dead letters and stuck tasks, on the real Cassandra, ZooKeeper
and processes: FAILED tasks counted per type exactly (the failed_tasks index
the lifecycle writes), ListTasks' type and time filters paging correctly
over the Cassandra listing index, and the trigger's queue-age gauge rising
for a type no worker serves and falling once one comes."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from leasesched.testing.processes import worker_args
from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import NAMESPACE, LiveCluster, wait_for
from tests.observe import scrape

AGE = "leasesched_queue_oldest_age_seconds"
QUEUED = "leasesched_dispatch_queued_by_type"


def schedule(cluster: LiveCluster, task_type: str, delay_s: float = 0.0) -> str:
    spec = pb.TaskSpec(namespace=NAMESPACE, type=task_type, payload=b"{}")
    spec.retry_policy.maximum_attempts = 1
    if delay_s:
        spec.delay.FromMilliseconds(int(delay_s * 1000))
    request = pb.ScheduleTaskRequest(task=spec, idempotency_key=uuid.uuid4().hex)
    return cluster.stub.ScheduleTask(request, timeout=10).task_id


def ts_of(view: pb.TaskView, plus_ms: int = 0) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(view.created_at.ToMilliseconds() + plus_ms)
    return value


def pages(cluster: LiveCluster, page_size: int, **filters: Any) -> list[list[str]]:
    out: list[list[str]] = []
    token = ""
    while True:
        request = pb.ListTasksRequest(namespace=NAMESPACE, page_size=page_size, page_token=token, **filters)
        reply = cluster.stub.ListTasks(request, timeout=10)
        assert len(reply.tasks) <= page_size
        out.append([t.task_id for t in reply.tasks])
        token = reply.next_page_token
        if not token:
            return out
        assert len(out) < 100, "paging does not end"


def refused(cluster: LiveCluster, request: pb.ListTasksRequest) -> str:
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub.ListTasks(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value.details())


def test_dead_letters_filters_and_queue_age(make_cluster: Any) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=1, slots=4, metrics=True)
    trigger_url = cluster.group.metrics_url(cluster.triggers[0])  # type: ignore[attr-defined]

    # -- queue age: tasks of a type no worker serves wait in the trigger's queue
    waiting = [schedule(cluster, "dead.late") for _ in range(3)]
    wait_for(lambda: scrape(trigger_url).get(QUEUED, type="dead.late") == 3, 20, "the unserved tasks to be queued")
    first = scrape(trigger_url).get(AGE, type="dead.late")
    wait_for(lambda: scrape(trigger_url).get(AGE, type="dead.late") >= first + 1.5, 20, "the queue age to rise")
    assert scrape(trigger_url).get(AGE, type="chaos.work") == 0  # served types do not wait

    # A worker for the dead.* types comes: the queue drains and the age falls to 0.
    argv = worker_args("tests.dead_letter_handlers", 4, drain_timeout_s=5)
    cluster.workers.append(cluster.group.start("worker", cluster.cfg, argv=argv))
    wait_for(lambda: all(cluster.poll(t).status == pb.SUCCEEDED for t in waiting), 60, "the queued tasks to run")
    after = scrape(trigger_url)
    assert after.get(AGE, type="dead.late") == 0 and after.get(QUEUED, type="dead.late") == 0

    # -- dead letters: failed tasks of two types, counted per type exactly
    failing = [schedule(cluster, "dead.a") for _ in range(3)] + [schedule(cluster, "dead.b") for _ in range(2)]
    wait_for(lambda: all(cluster.poll(t).status == pb.FAILED for t in failing), 60, "the failing tasks to be FAILED")
    reply = cluster.stub.CountTasks(pb.CountTasksRequest(namespace=NAMESPACE, status=pb.FAILED), timeout=10)
    assert [(r.type, r.status, r.count) for r in reply.rows] == [("dead.a", pb.FAILED, 3), ("dead.b", pb.FAILED, 2)]
    assert reply.exact and reply.method == pb.FAILED_INDEX
    only_b = cluster.stub.CountTasks(pb.CountTasksRequest(namespace=NAMESPACE, status=pb.FAILED, type="dead.b"), timeout=10)
    assert [(r.type, r.count) for r in only_b.rows] == [("dead.b", 2)]
    overview = cluster.stub.CountTasks(pb.CountTasksRequest(namespace=NAMESPACE), timeout=10)
    counted = {(r.type, r.status): r.count for r in overview.rows}
    assert counted[("dead.late", pb.SUCCEEDED)] == 3 and counted[("dead.a", pb.FAILED)] == 3
    assert overview.method == pb.RECENT_SCAN and overview.exact
    # ... and listable: ListTasks with status FAILED and a type.
    listed = [t for page in pages(cluster, 2, status=pb.FAILED, type="dead.a") for t in page]
    assert sorted(listed) == sorted(failing[:3])

    # -- ListTasks filters over several pages of the Cassandra listing index
    listed_type = [schedule(cluster, "dead.listed", delay_s=3600) for _ in range(7)]
    for _ in range(3):
        schedule(cluster, "dead.other", delay_s=3600)
    views = {t: cluster.poll(t) for t in listed_type}
    newest_first = sorted(listed_type, key=lambda t: (views[t].created_at.ToMilliseconds(), uuid.UUID(t)), reverse=True)
    by_type = pages(cluster, 2, type="dead.listed")
    assert [t for page in by_type for t in page] == newest_first
    assert len(by_type) >= 4
    # created_after inclusive, created_before exclusive: the 2nd to the 5th oldest (distinct times).
    oldest_first = newest_first[::-1]
    times = [views[t].created_at.ToMilliseconds() for t in oldest_first]
    if len(set(times)) == len(times):
        window = pages(cluster, 2, type="dead.listed", created_after=ts_of(views[oldest_first[1]]),
                       created_before=ts_of(views[oldest_first[5]]))  # fmt: skip
        assert [t for page in window for t in page] == oldest_first[1:5][::-1]
    recent = pages(cluster, 3, created_after=ts_of(views[oldest_first[0]]))
    assert set(listed_type) <= {t for page in recent for t in page}
    assert not set(failing) & {t for page in recent for t in page}  # created before the range

    # A token carries its filters: used with other ones, it is refused.
    first_page = cluster.stub.ListTasks(pb.ListTasksRequest(namespace=NAMESPACE, page_size=2, type="dead.listed"), timeout=10)
    assert first_page.next_page_token
    assert "page_token" in refused(cluster, pb.ListTasksRequest(namespace=NAMESPACE, page_size=2, type="dead.other",
                                                                page_token=first_page.next_page_token))  # fmt: skip
    assert "type" in refused(cluster, pb.ListTasksRequest(namespace=NAMESPACE, type="not a type"))
    later, earlier = ts_of(views[oldest_first[-1]]), ts_of(views[oldest_first[0]])
    assert "created_after" in refused(cluster, pb.ListTasksRequest(namespace=NAMESPACE, created_after=later, created_before=earlier))

    # A rare type behind more rows than one call examines (10 x page_size, at least 200): the
    # first page comes back empty with a token, and paging on finds it.
    rare = schedule(cluster, "dead.rare", delay_s=3600)
    for _ in range(210):
        schedule(cluster, "dead.filler", delay_s=3600)
    first_rare = cluster.stub.ListTasks(pb.ListTasksRequest(namespace=NAMESPACE, page_size=1, type="dead.rare"), timeout=10)
    assert not first_rare.tasks and first_rare.next_page_token
    assert [t for page in pages(cluster, 1, type="dead.rare") for t in page] == [rare]
