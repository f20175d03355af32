"""The whole life cycle on real processes: TaskService, TaskUpdater, triggers,
workers, against the real Cassandra and ZooKeeper. Every test ends with the
same invariants as the chaos tests (none lost, no overlap, one completion)."""

from __future__ import annotations

import time


from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import LiveCluster, check_invariants, wait_for
from tests.observe import scrape


def executions(cluster: LiveCluster, task_id: str) -> list[dict]:
    runs: dict[int, dict] = {}
    for r in cluster.read_jsonl(cluster.ledger):
        if r["task_id"] == task_id:
            runs.setdefault(r["token"], {}).update({r["event"]: r["t"], "attempt": r["attempt"]})
    return [runs[t] for t in sorted(runs)]


def assert_clean(cluster: LiveCluster, views: dict[str, pb.TaskView]) -> None:
    report = check_invariants(cluster, views)
    assert not report.overlaps, report.overlaps[:5]
    assert not report.lost, report.lost[:5]
    assert not report.completion_errors, report.completion_errors[:5]


def test_immediate_and_delayed_tasks_run_on_time(make_cluster) -> None:
    cluster = make_cluster(triggers=2, workers=2, slots=4)
    before = time.time()
    now_ids = [cluster.schedule(seconds=0.05) for _ in range(10)]
    delayed = {cluster.schedule(seconds=0.05, delay_s=d): before + d for d in (2.0, 3.0, 4.0)}
    views = cluster.wait_terminal(now_ids + list(delayed), timeout=60)
    assert all(v.status == pb.SUCCEEDED for v in views.values())
    # Never early (correctness). How late is the benchmark's business; the loose
    # bound here only catches a task that waited for some slow fallback path.
    for task_id, run_at in delayed.items():
        start = executions(cluster, task_id)[0]["start"]
        assert start >= run_at - 0.05, "a delayed task started before its run time"
        assert start - run_at < 10.0, f"started {start - run_at:.2f} s late"
    for task_id in now_ids:
        view = views[task_id]
        assert view.started_at.ToMilliseconds() - view.run_at.ToMilliseconds() < 10_000
    assert_clean(cluster, views)


def test_progress_is_visible_through_poll(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=2)
    task_id = cluster.schedule(seconds=3.0, lease_s=1.5, progress=True)  # heartbeat every 0.5 s

    def progress_seen() -> bool:
        view = cluster.poll(task_id)
        return view.status == pb.RUNNING and view.progress.percent > 0 and view.progress.message.startswith("step")

    wait_for(progress_seen, 20, "progress reported by the handler to show in PollTask")
    views = cluster.wait_terminal([task_id], 30)
    assert views[task_id].status == pb.SUCCEEDED and views[task_id].progress.percent == 100
    assert_clean(cluster, views)


def test_retries_follow_backoff_then_succeed_and_non_retryable_fails_at_once(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=4)
    retried = cluster.schedule(seconds=0.05, fail=2, max_attempts=3, retry_initial_s=1.0)
    exhausted = cluster.schedule(seconds=0.05, fail=5, max_attempts=2, retry_initial_s=0.5)
    permanent = cluster.schedule(seconds=0.05, fail=1, permanent=True, max_attempts=5)
    views = cluster.wait_terminal([retried, exhausted, permanent], 60)

    assert views[retried].status == pb.SUCCEEDED and views[retried].attempt == 3
    runs = executions(cluster, retried)
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    gaps = [b["start"] - a["end"] for a, b in zip(runs, runs[1:])]
    # initial 1 s, coefficient 2: waits of at least 0.8 s then 1.6 s (jitter
    # shortens by at most 20 %); the upper bounds are loose (machine load).
    assert 0.75 <= gaps[0] < 10.0 and 1.55 <= gaps[1] < 15.0, gaps

    assert views[exhausted].status == pb.FAILED and views[exhausted].attempt == 2
    assert "planned failure on attempt 2" in views[exhausted].error

    assert views[permanent].status == pb.FAILED and views[permanent].attempt == 1
    assert views[permanent].error_type == "PermanentError"
    assert len(executions(cluster, permanent)) == 1
    assert_clean(cluster, views)


def test_cancel_queued_and_running(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=1, slots=2)
    queued = cluster.schedule(delay_s=60)
    running = cluster.schedule(seconds=30, lease_s=1.5)
    wait_for(lambda: cluster.poll(running).status == pb.RUNNING, 20, "the long task to run")

    reply = cluster.stub.CancelTask(pb.CancelTaskRequest(task_id=queued), timeout=10)
    assert reply.task.status == pb.CANCELLED
    reply = cluster.stub.CancelTask(pb.CancelTaskRequest(task_id=running), timeout=10)
    assert reply.task.status == pb.RUNNING and reply.task.cancel_requested

    views = cluster.wait_terminal([queued, running], 20)  # the worker learns it at its next heartbeat
    assert views[running].status == pb.CANCELLED
    assert executions(cluster, queued) == []
    assert len(executions(cluster, running)) == 1
    assert_clean(cluster, views)


def test_priority_order_when_workers_are_scarce(make_cluster) -> None:
    # One trigger: priority is a per-trigger order (across triggers it is best effort).
    cluster = make_cluster(triggers=1, workers=1, slots=1, metrics=True)
    blocker = cluster.schedule(seconds=120.0, lease_s=1.5)  # holds the only slot until cancelled
    wait_for(lambda: cluster.poll(blocker).status == pb.RUNNING, 20, "the blocker to occupy the only slot")
    low = [cluster.schedule(seconds=0.05, priority=1) for _ in range(3)]
    high = [cluster.schedule(seconds=0.05, priority=9) for _ in range(3)]
    mid = [cluster.schedule(seconds=0.05, priority=5) for _ in range(3)]
    trigger_metrics = cluster.group.metrics_url(cluster.triggers[0])
    wait_for(lambda: scrape(trigger_metrics).get("leasesched_dispatch_queued") == 9, 20, "all nine to wait in the trigger")
    cluster.stub.CancelTask(pb.CancelTaskRequest(task_id=blocker), timeout=10)
    views = cluster.wait_terminal([blocker, *low, *high, *mid], 60)
    assert views[blocker].status == pb.CANCELLED
    order = sorted(low + high + mid, key=lambda t: executions(cluster, t)[0]["start"])
    assert set(order[:3]) == set(high) and set(order[3:6]) == set(mid) and set(order[6:]) == set(low)
    assert_clean(cluster, views)


def test_every_shard_has_one_owner_and_survives_a_killed_trigger(make_cluster) -> None:
    cluster = make_cluster(triggers=2, workers=1, slots=8)
    owners = cluster.wait_all_shards_owned()
    by_trigger = {o[0] for o in owners.values()}
    assert len(by_trigger) == 2, "both triggers own shards"

    victim, survivor = cluster.triggers
    delayed = [cluster.schedule(seconds=0.05, delay_s=6) for _ in range(40)]  # due after the kill
    cluster.kill9(victim)
    moved_at = time.monotonic()
    cluster.wait_all_shards_owned(timeout=30, by={survivor.target})
    print(f"shards moved to the surviving trigger in {time.monotonic() - moved_at:.1f} s")
    views = cluster.wait_terminal(delayed, 60)
    assert all(v.status == pb.SUCCEEDED for v in views.values())
    assert_clean(cluster, views)
