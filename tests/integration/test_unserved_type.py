"""A task whose type no worker serves does not wait silently (issue 11, item 9).

Real processes: a TaskService reading the workers' ZooKeeper registrations.
A task of a type no live worker handles is marked ``no_worker_for_type`` by
PollTask and ListTasks and counted by ``leasesched_tasks_scheduled_without_worker``;
once a worker for the type subscribes, the mark goes and the task runs.
"""

from __future__ import annotations

import json
import uuid

from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import NAMESPACE, LiveCluster, wait_for
from tests.observe import scrape


def schedule(cluster: LiveCluster, task_type: str) -> str:
    spec = pb.TaskSpec(namespace=NAMESPACE, type=task_type, payload=json.dumps({"seconds": 0.1}).encode())
    return cluster.stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec, idempotency_key=uuid.uuid4().hex), timeout=10).task_id


def test_a_task_nobody_serves_is_marked_until_a_worker_comes(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=1, slots=4, metrics=True)
    assert cluster.task_service is not None
    served = schedule(cluster, "chaos.work")
    wait_for(lambda: cluster.poll(served).status == pb.SUCCEEDED, 30, "a task of a served type to run")

    # A type no worker registered (a typo, a handler module not deployed).
    url = cluster.group.metrics_url(cluster.task_service)  # type: ignore[attr-defined]
    before = scrape(url)
    nobody = schedule(cluster, "chaos.no_such_handler")
    view = wait_for(lambda: (v := cluster.poll(nobody)).no_worker_for_type and v, 15, "the unserved task to be marked")
    assert view.status == pb.SCHEDULED
    # A worker registers a moment after its first stream was accepted (it may run tasks before):
    # wait until the directory shows it, through a SCHEDULED task of its type that is not marked
    # while the other one is (unknown would mark neither).
    later = pb.TaskSpec(namespace=NAMESPACE, type="chaos.work")
    later.delay.FromSeconds(600)
    waiting_served = cluster.stub.ScheduleTask(pb.ScheduleTaskRequest(task=later), timeout=10).task_id
    wait_for(lambda: not cluster.poll(waiting_served).no_worker_for_type and cluster.poll(nobody).no_worker_for_type,
             15, "the directory to know the worker")  # fmt: skip
    before_served = scrape(url)
    served_again = schedule(cluster, "chaos.work")
    listed = {t.task_id: t for t in cluster.stub.ListTasks(pb.ListTasksRequest(namespace=NAMESPACE, page_size=100), timeout=10).tasks}
    assert listed[nobody].no_worker_for_type and not listed[served].no_worker_for_type
    after = scrape(url)
    assert after.delta(before, "leasesched_tasks_scheduled_without_worker_total", type="chaos.no_such_handler") == 1
    assert after.delta(before_served, "leasesched_tasks_scheduled_without_worker_total", type="chaos.work") == 0
    wait_for(lambda: cluster.poll(served_again).status == pb.SUCCEEDED, 30, "the second served task to run")

    # No worker at all: a served type becomes unserved too; a worker coming back clears it and runs it.
    for worker in list(cluster.workers):
        assert worker.terminate(30)
    waiting = schedule(cluster, "chaos.work")
    wait_for(lambda: cluster.poll(waiting).no_worker_for_type, 15, "the task to be marked while no worker runs")
    cluster.start_worker(4)
    wait_for(lambda: cluster.poll(waiting).status == pb.SUCCEEDED, 60, "the task to run once a worker subscribed")
    assert not cluster.poll(waiting).no_worker_for_type
