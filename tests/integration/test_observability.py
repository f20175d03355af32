"""Metrics and logs of real processes during a real run.

Every process of a cluster serves /metrics on its own port; the tests scrape
each one before and after some tasks (successes, a retry, a permanent
failure, a lease that expires while its worker is frozen) and check that the
specific series moved by what happened. Then they read the processes' logs:
one JSON object per line, with task id, lease token, shard and worker.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import LiveCluster, wait_for
from tests.observe import MetricsGroup, Samples, json_log_records, scrape

TYPE = "chaos.work"
SCHEDULE = "/leasesched.v1.TaskService/ScheduleTask"
POLL = "/leasesched.v1.TaskService/PollTask"
CLAIM = "/leasesched.v1.TaskUpdater/ClaimTask"
COMPLETE = "/leasesched.v1.TaskUpdater/CompleteTask"


class Scrapes:
    """The /metrics endpoints of one cluster's processes, by role."""

    def __init__(self, cluster: LiveCluster) -> None:
        assert isinstance(cluster.group, MetricsGroup)
        self.group = cluster.group
        assert cluster.task_service and cluster.task_updater
        self.procs = {
            "task-service": cluster.task_service,
            "task-updater": cluster.task_updater,
            "trigger": cluster.triggers[0],
            "worker": cluster.workers[0],
        }

    def one(self, role: str) -> Samples:
        return scrape(self.group.metrics_url(self.procs[role]))

    def all(self) -> dict[str, Samples]:
        return {role: self.one(role) for role in self.procs}


@pytest.fixture
def cluster(make_cluster) -> LiveCluster:
    return make_cluster(triggers=1, workers=1, slots=4, metrics=True)


def test_metrics_of_every_process_move_with_the_tasks(cluster: LiveCluster) -> None:
    scrapes = Scrapes(cluster)
    before = scrapes.all()
    # Each process exports its own metrics, present before anything happened.
    assert before["trigger"].get("leasesched_shards_owned") == cluster.cfg.logical_shards
    assert before["worker"].get("leasesched_worker_slots") == 4
    assert before["worker"].has("leasesched_worker_slots_busy")
    assert before["trigger"].has("leasesched_dispatch_queued") and before["trigger"].has("leasesched_dispatch_inflight")
    assert not before["task-service"].has("leasesched_shards_owned")  # only the trigger's

    ok = [cluster.schedule(seconds=0.1, retry_initial_s=0.2) for _ in range(6)]
    retried = cluster.schedule(seconds=0.1, fail=1, retry_initial_s=0.2)  # fails once, then succeeds
    permanent = cluster.schedule(seconds=0.1, fail=1, permanent=True)  # FAILED at once
    slow = [cluster.schedule(seconds=3.0) for _ in range(2)]
    # While the slow ones run, the worker's busy-slot gauge shows them.
    wait_for(lambda: scrapes.one("worker").get("leasesched_worker_slots_busy") >= 1, 30, "a busy worker slot on /metrics")
    with pytest.raises(grpc.RpcError) as err:
        cluster.poll(str(uuid.uuid4()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    ids = [*ok, retried, permanent, *slow]
    views = cluster.wait_terminal(ids, 60)
    assert views[permanent].status == pb.FAILED
    assert all(views[t].status == pb.SUCCEEDED for t in [*ok, retried, *slow])
    succeeded = len(ids) - 1
    claims = len(ids) + 1  # the retried task is claimed twice

    def moved() -> dict[str, Samples] | None:
        # Counters are recorded as the answers go out; give the last ones a moment.
        after = scrapes.all()
        done = after["worker"].delta(before["worker"], "leasesched_worker_executions_total") >= claims
        return after if done and after["task-updater"].delta(before["task-updater"], "leasesched_tasks_completed_total") >= succeeded else None

    after = wait_for(moved, 15, "the last counters to move")
    ts, tu, tr, wk = (after[r] for r in ("task-service", "task-updater", "trigger", "worker"))
    b_ts, b_tu, b_tr, b_wk = (before[r] for r in ("task-service", "task-updater", "trigger", "worker"))

    # TaskService: created tasks by type; latency by method and code.
    assert ts.delta(b_ts, "leasesched_tasks_scheduled_total", type=TYPE) == len(ids)
    assert ts.delta(b_ts, "leasesched_rpc_duration_seconds_count", method=SCHEDULE, code="OK") >= len(ids)
    assert ts.delta(b_ts, "leasesched_rpc_duration_seconds_count", method=POLL, code="NOT_FOUND") == 1
    assert ts.delta(b_ts, "leasesched_rpc_duration_seconds_bucket", method=SCHEDULE, code="OK", le="+Inf") >= len(ids)

    # TaskUpdater: every transition by type, and the dispatch lag of every claim.
    assert tu.delta(b_tu, "leasesched_tasks_claimed_total", type=TYPE) == claims
    assert tu.delta(b_tu, "leasesched_claims_unread_total", type=TYPE) <= len(ids)  # a retry's claim reads
    assert tu.delta(b_tu, "leasesched_tasks_completed_total", type=TYPE) == succeeded
    assert tu.delta(b_tu, "leasesched_tasks_failed_total", type=TYPE, reason="error") == 1
    assert tu.delta(b_tu, "leasesched_tasks_requeued_total", type=TYPE, reason="retry") == 1
    assert tu.delta(b_tu, "leasesched_dispatch_lag_seconds_count") == claims
    # A claim or completion travels alone, or with others pending in one
    # ClaimTasks / CompleteTasks call (leasesched/batching.py): one call per
    # batch, so at least one call and at most one per item.
    for unary, items in ((CLAIM, claims), (COMPLETE, succeeded)):
        calls = sum(tu.delta(b_tu, "leasesched_rpc_duration_seconds_count", method=m, code="OK") for m in (unary, unary + "s"))
        assert 1 <= calls <= items, (unary, calls, items)
    # Immediate tasks start within seconds of their time (the hint path; generous for a loaded machine).
    assert tu.delta(b_tu, "leasesched_dispatch_lag_seconds_bucket", le="2.0") >= len(ok)

    # Trigger: dispatches by type; owns every shard.
    assert tr.delta(b_tr, "leasesched_tasks_dispatched_total", type=TYPE) >= claims
    assert tr.get("leasesched_shards_owned") == cluster.cfg.logical_shards
    assert tr.get("leasesched_subscribed_workers") >= 1

    # Worker: executions by type and outcome; the slots are free again.
    assert wk.delta(b_wk, "leasesched_worker_executions_total", type=TYPE, outcome="ok") == succeeded
    assert wk.delta(b_wk, "leasesched_worker_executions_total", type=TYPE, outcome="error") == 1
    assert wk.delta(b_wk, "leasesched_worker_executions_total", type=TYPE, outcome="permanent") == 1
    assert wk.delta(b_wk, "leasesched_worker_execution_seconds_count") == claims
    assert wk.get("leasesched_worker_slots_busy") == 0

    check_logs(cluster, ids, views)

    # A new task whose hint reached its trigger is claimed without a read (the
    # hint carried its creation row, CreatedTask). A hint sent before
    # TaskService knew the trigger's shards is lost and the scan's dispatch
    # reads: schedule until one goes the hinted way.
    def claimed_unread() -> bool:
        cluster.wait_terminal([cluster.schedule(seconds=0.05)], 30)
        return scrapes.one("task-updater").delta(b_tu, "leasesched_claims_unread_total", type=TYPE) >= 1

    wait_for(claimed_unread, 90, "a claim without a read")


def check_logs(cluster: LiveCluster, ids: list[str], views: dict[str, pb.TaskView]) -> None:
    """Every process logs JSON lines; the important ones carry their task, lease, shard and worker."""
    assert cluster.task_service and cluster.task_updater
    service = json_log_records(cluster.task_service)
    updater = json_log_records(cluster.task_updater)
    trigger = json_log_records(cluster.triggers[0])
    worker = json_log_records(cluster.workers[0])
    for name, records in {"task-service": service, "task-updater": updater, "trigger": trigger, "worker": worker}.items():
        assert records, f"{name} logged nothing"
        for record in records:
            assert {"ts", "level", "logger", "msg", "pid"} <= record.keys(), record
        assert {r.get("role") for r in records} == {name}

    scheduled = {r["task_id"]: r for r in service if "scheduled" in r["msg"] and "task_id" in r}
    assert set(ids) <= scheduled.keys()
    assert all(isinstance(scheduled[t]["shard"], int) for t in ids)

    # The claim of every task names its task, lease token and worker.
    claims = [r for r in updater if r.get("lease_event") == "claimed"]
    for task_id in ids:
        mine = [r for r in claims if r.get("task_id") == task_id]
        assert mine, f"no claim line for {task_id}"
        final = views[task_id].lease_token
        assert final in {r["lease_token"] for r in mine}
        assert all(r["worker"] and isinstance(r["shard"], int) for r in mine)
    completed = {r["task_id"] for r in updater if r.get("lease_event") == "reported" and "lease_token" in r}
    assert {t for t in ids if views[t].status == pb.SUCCEEDED} <= completed

    # Shard ownership: one line per acquired shard, with the shard number.
    acquired = {r["shard"] for r in trigger if r["msg"].endswith("acquired") and "shard" in r}
    assert acquired == set(range(cluster.cfg.logical_shards))

    # On the worker, every line of an execution carries task, token and worker.
    running = [r for r in worker if "running attempt" in r["msg"]]
    assert {r["task_id"] for r in running} >= set(ids)
    for record in running:
        assert record["worker"] and record["lease_token"] >= 1, record
    accepted = [r for r in worker if "accepted, now" in r["msg"]]
    assert accepted and all({"task_id", "lease_token", "worker"} <= r.keys() for r in accepted)


def test_lease_expiry_shows_on_the_trigger(cluster: LiveCluster) -> None:
    """A worker frozen past its lease: the trigger counts the expiry and the re-queue."""
    scrapes = Scrapes(cluster)
    worker = cluster.workers[0]
    before = scrapes.one("trigger")
    task_id = cluster.schedule(seconds=4.0, lease_s=2.0)
    wait_for(lambda: cluster.poll(task_id).status == pb.RUNNING, 30, "the task to run")
    worker.pause()
    try:
        def expired() -> Samples | None:
            now = scrapes.one("trigger")
            return now if now.delta(before, "leasesched_lease_expirations_total", type=TYPE) >= 1 else None

        after = wait_for(expired, 30, "the trigger to count the lease expiry")
    finally:
        worker.resume()
    assert after.delta(before, "leasesched_tasks_requeued_total", type=TYPE, reason="lease_expired") == 1
    view = cluster.wait_terminal([task_id], 60)[task_id]
    assert view.status == pb.SUCCEEDED and view.attempt == 2
    lines = [r for r in json_log_records(cluster.triggers[0]) if "expired" in r["msg"] and r.get("task_id") == task_id]
    assert lines and lines[0]["lease_token"] >= 1 and isinstance(lines[0]["shard"], int) and lines[0]["worker"]
