"""At most one execution for every handler, cooperative or not (issue 10).

Real processes (TaskService, TaskUpdater, a trigger, workers running
``tests.fail_stop_handlers``) on the session's Cassandra and ZooKeeper, with
3 s leases. The handlers write a ledger (start / alive every 0.1 s / end), so
"not run twice at once" is checked from what really ran:

* an async handler that blocks the event loop longer than its lease: the
  worker's other executions keep their leases and succeed, once each, and the
  blocked task runs once;
* a thread handler that ignores ctx and runs past start_to_close: the task
  stays RUNNING under its lease until the thread returns, then is retried;
  no second execution meanwhile;
* a thread handler that ignores ctx while its worker cannot renew (the
  TaskUpdater is frozen with SIGSTOP): the worker ends itself with
  EXIT_FAIL_STOP before the trigger re-queues, and the task then runs
  elsewhere, never overlapping.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from typing import Any

from google.protobuf.duration_pb2 import Duration

from leasesched.v1 import scheduler_pb2 as pb
from leasesched.testing import RunningProcess, workers_subscribed
from tests.cluster import LiveCluster, wait_for
from worker.watchdog import EXIT_FAIL_STOP

LEASE_S = 4.0


def start_worker(cluster: LiveCluster, slots: int) -> RunningProcess:
    argv = ["worker", "--module", "tests.fail_stop_handlers", "--slots", str(slots), "--drain-timeout", "1"]
    return cluster.group.start("worker", cluster.cfg, argv=argv, env_extra={"LEASESCHED_TEST_LEDGER": str(cluster.ledger)})


def workers_ready(cluster: LiveCluster, count: int) -> None:
    wait_for(lambda: len(cluster.zk_members("worker")) == count, 30, f"{count} worker(s) to register")

    wait_for(lambda: workers_subscribed(cluster.cfg, count, 0), 30, "the workers to subscribe to the trigger")


def schedule(cluster: LiveCluster, task_type: str, start_to_close_s: float = 0.0, **payload: Any) -> str:
    spec = pb.TaskSpec(namespace="chaos", type=task_type, payload=json.dumps(payload).encode())
    spec.lease_duration.FromMilliseconds(int(LEASE_S * 1000))
    spec.retry_policy.maximum_attempts = 5
    spec.retry_policy.initial_interval.CopyFrom(Duration(nanos=200_000_000))
    if start_to_close_s:
        spec.timeouts.start_to_close.FromMilliseconds(int(start_to_close_s * 1000))
    request = pb.ScheduleTaskRequest(task=spec, idempotency_key=uuid.uuid4().hex)
    return cluster.stub.ScheduleTask(request, timeout=10).task_id


def runs(cluster: LiveCluster, task_id: str) -> list[dict[str, Any]]:
    """Executions of ``task_id`` from the ledger, by lease token: start, last alive, end, pid."""
    by_token: dict[int, dict[str, Any]] = defaultdict(dict)
    for record in cluster.read_jsonl(cluster.ledger):
        if record["task_id"] != task_id:
            continue
        run = by_token[record["token"]]
        run.update(token=record["token"], pid=record["pid"], attempt=record["attempt"])
        run[record["event"]] = max(run.get(record["event"], 0.0), record["t"])
    return sorted(by_token.values(), key=lambda r: r.get("start", 0.0))


def assert_never_overlapped(cluster: LiveCluster, task_id: str) -> list[dict[str, Any]]:
    found = runs(cluster, task_id)
    for earlier, later in zip(found, found[1:]):
        worked_until = earlier.get("end", earlier.get("alive", earlier["start"]))  # no end: its process ended itself
        assert worked_until < later["start"], f"{task_id}: token {earlier['token']} worked until {worked_until:.3f}, " \
                                              f"token {later['token']} started {later['start']:.3f}"  # fmt: skip
    return found


def test_a_handler_blocking_the_loop_does_not_take_the_other_leases_down(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=0)
    first = start_worker(cluster, slots=4)
    workers_ready(cluster, 1)
    polite = [schedule(cluster, "fs.polite", seconds=5.0) for _ in range(3)]
    wait_for(lambda: all(runs(cluster, t) for t in polite), 30, "the polite tasks to start on the first worker")
    blocker = schedule(cluster, "fs.block_loop", seconds=3 * LEASE_S)  # blocks the loop for three leases
    wait_for(lambda: runs(cluster, blocker), 30, "the blocking task to start")
    start_worker(cluster, slots=4)  # somewhere a re-queued task could run twice
    views = cluster.wait_terminal([*polite, blocker], 90)
    for task_id in [*polite, blocker]:
        found = assert_never_overlapped(cluster, task_id)
        view = views[task_id]
        assert view.status == pb.SUCCEEDED, (task_id, pb.TaskStatus.Name(view.status), view.error)
        assert len(found) == 1 and found[0]["pid"] == first.pid, f"{task_id} ran {len(found)} times: {found}"
        assert view.attempt == 1 and view.lease_token == found[0]["token"]
    assert first.is_running()


def test_a_thread_past_start_to_close_keeps_its_lease_until_it_returns(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=0)
    start_worker(cluster, slots=2)
    start_worker(cluster, slots=2)
    workers_ready(cluster, 2)
    task_id = schedule(cluster, "fs.stubborn", start_to_close_s=1.5, seconds=6.0, later_seconds=0.2)
    first = wait_for(lambda: runs(cluster, task_id), 30, "the stubborn task to start")[0]
    polls = 0
    while True:
        view = cluster.poll(task_id)
        ended = "end" in runs(cluster, task_id)[0]  # read after the poll: the thread may have returned since
        if ended:
            break
        assert view.status == pb.RUNNING and view.lease_token == first["token"], (
            f"given back while its handler still ran: {pb.TaskStatus.Name(view.status)} token {view.lease_token}"
        )
        polls += 1
        time.sleep(0.2)
    assert polls >= 15, "the handler did not outlive start_to_close"
    views = cluster.wait_terminal([task_id], 60)
    found = assert_never_overlapped(cluster, task_id)
    assert views[task_id].status == pb.SUCCEEDED and len(found) == 2 and views[task_id].attempt == 2
    assert found[1]["start"] > found[0]["end"]


def test_a_thread_that_cannot_be_stopped_ends_its_worker_before_the_requeue(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=0)
    workers = [start_worker(cluster, slots=2), start_worker(cluster, slots=2)]
    workers_ready(cluster, 2)
    task_id = schedule(cluster, "fs.stubborn", seconds=20.0, later_seconds=0.2)
    first = wait_for(lambda: runs(cluster, task_id), 30, "the stubborn task to start")[0]
    victim = next(w for w in workers if w.pid == first["pid"])
    updater = cluster.task_updater
    assert updater is not None
    updater.pause()  # no heartbeat is answered: the lease cannot be renewed
    paused = time.monotonic()
    try:
        wait_for(lambda: not victim.is_running(), 3 * LEASE_S, "the worker to end itself", interval=0.05)
        ended_after = time.monotonic() - paused
        view = cluster.poll(task_id)  # TaskService still answers: the trigger has not re-queued yet
        assert view.status == pb.RUNNING and view.lease_token == first["token"], pb.TaskStatus.Name(view.status)
    finally:
        updater.resume()
    assert victim.exit_code == EXIT_FAIL_STOP == 75, victim.log_tail()
    assert ended_after < LEASE_S, f"ended {ended_after:.2f} s after the TaskUpdater froze"
    assert "fail-stop" in victim.log_tail(200) and str(first["token"]) in victim.log_tail(200)
    views = cluster.wait_terminal([task_id], 60)
    found = assert_never_overlapped(cluster, task_id)
    assert views[task_id].status == pb.SUCCEEDED
    assert "end" not in found[0] and all(r["pid"] != victim.pid for r in found[1:])
