"""SIGTERM of each process kind under load: a graceful stop, exit code 0, no task lost.

The way an operator restarts or scales down: SIGTERM to one process while
tasks flow. Each scenario checks that the process exits 0 on its own (the
harness would SIGKILL it after a timeout: that shows as -9), that it let go
of what it held on the way out (shards, leases, its ZooKeeper registration),
and then the chaos suite's invariants over every accepted task: none lost,
no overlapping executions, one accepted completion per SUCCEEDED task.
"""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from leasesched.testing import RunningProcess
from tests.chaos.load import Load, steady
from tests.chaos.test_chaos import finish, running_on
from tests.cluster import LiveCluster, wait_for
from tests.observe import MetricsGroup, json_log_records, scrape

# Longer than any graceful stop takes; a process still running then gets SIGKILL (exit code -9).
TERMINATE_TIMEOUT_S = 45.0


def sigterm(proc: RunningProcess) -> float:
    """SIGTERM ``proc``, wait until it is gone; return the seconds that took."""
    started = time.monotonic()
    assert proc.terminate(TERMINATE_TIMEOUT_S), f"{proc} was not running"
    return time.monotonic() - started


def assert_clean_exit(proc: RunningProcess, last_words: str) -> None:
    """Exit 0, the stop's last line logged, and no error on the way (a clean stop logs
    no ERROR, e.g. asyncio's "Task was destroyed but it is pending!")."""
    assert proc.exit_code == 0, f"{proc} exited with {proc.exit_code} after SIGTERM\n{proc.log_tail()}"
    records = json_log_records(proc)
    messages = [r["msg"] for r in records]
    assert any(last_words in m for m in messages), f"{proc} never logged {last_words!r}\n{proc.log_tail()}"
    errors = [r["msg"] for r in records if r.get("level") in ("ERROR", "CRITICAL")]
    assert not errors, f"{proc} logged errors while stopping: {errors[:3]}"
    assert "Task was destroyed" not in proc.log_path.read_text(errors="replace")


def serving(proc: RunningProcess) -> bool:
    assert proc.target
    try:
        with grpc.insecure_channel(proc.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_sigterm_worker_drains_then_releases_running_tasks(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=2, workers=1, slots=6, metrics=True)
    group = cluster.group
    assert isinstance(group, MetricsGroup) and cluster.task_updater
    group.role_args["worker"] = ("--drain-timeout", "1")  # long tasks outlast the drain and are released
    victim = cluster.start_worker(6)
    del group.role_args["worker"]
    cluster.wait_workers_subscribed()
    updater_before = scrape(group.metrics_url(cluster.task_updater))

    long = [cluster.schedule(seconds=8.0) for _ in range(6)]
    load = Load(cluster, count=200, per_second=40).start()
    wait_for(lambda: {t for t, _ in running_on(cluster, victim.pid)} & set(long), 60, "the victim to run a long task")
    wait_for(lambda: len(running_on(cluster, victim.pid)) >= 3, 30, "the victim to be busy")
    held = running_on(cluster, victim.pid)

    took = sigterm(victim)
    assert_clean_exit(victim, "stopped")
    assert took < 1 + 15, f"the worker took {took:.1f} s to stop with a 1 s drain"
    assert len(cluster.zk_members("worker")) == 1, "the stopped worker is still registered"
    released = {(t, token) for t, token in held if t in long}
    assert released

    report = finish(cluster, [*load.join(), *long], "SIGTERM worker")
    ledger = cluster.read_jsonl(cluster.ledger)
    for task_id, token in released:
        # The victim stopped the execution itself and another worker ran it again under a newer lease.
        ends = [r for r in ledger if r["event"] == "end" and (r["task_id"], r["token"]) == (task_id, token)]
        assert ends and ends[0]["stopped"], (task_id, ends)
        view = cluster.poll(task_id)
        assert view.status == pb.SUCCEEDED and view.lease_token > token
    assert report.re_executions >= len(released)
    # Given back at once (FailTask released), not left to expire.
    updater_after = scrape(group.metrics_url(cluster.task_updater))
    assert updater_after.delta(updater_before, "leasesched_tasks_requeued_total", reason="released") >= len(released)


def test_sigterm_trigger_hands_its_shards_over(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=2, workers=2, slots=8)
    load = Load(cluster, count=200, per_second=40, kinds=steady(0.4)).start()
    wait_for(lambda: len(load.ids) >= 40, 30, "load to build up in both triggers' shards")
    victim, survivor = cluster.triggers
    sigterm(victim)
    assert_clean_exit(victim, "trigger stopped")
    # It closed its ZooKeeper session on the way out: its registration is gone
    # at once (a killed trigger's stays until the session expires).
    assert victim.target not in cluster.zk_members("trigger")
    cluster.wait_all_shards_owned(timeout=20, by={survivor.target})
    finish(cluster, load.join(), "SIGTERM trigger")


def test_sigterm_task_updater_under_load(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=2, workers=2, slots=8)
    spare = cluster.group.start_serving("task-updater", cluster.cfg)
    wait_for(lambda: len(cluster.zk_members("task-updater")) == 2, 20, "the second TaskUpdater to register")
    load = Load(cluster, count=200, per_second=40).start()
    wait_for(lambda: len(load.ids) >= 60, 30, "load to build up")
    victim = cluster.task_updater
    assert victim is not None
    sigterm(victim)
    assert_clean_exit(victim, "task-updater stopped")
    assert victim.target not in cluster.zk_members("task-updater")
    cluster.task_updater = spare
    finish(cluster, load.join(), "SIGTERM TaskUpdater")


def test_sigterm_task_service_under_load(make_cluster) -> None:
    drain_s = 3.0
    cluster: LiveCluster = make_cluster({"shutdown_drain_s": drain_s}, triggers=2, workers=2, slots=8)
    spare = cluster.group.start_serving("task-service", cluster.cfg)
    load = Load(cluster, count=200, per_second=40).start()
    wait_for(lambda: len(load.ids) >= 60, 30, "load to build up")
    victim = cluster.task_service
    assert victim is not None
    stopper = threading.Thread(target=sigterm, args=(victim,), daemon=True)
    stopper.start()
    # Like a load balancer: once the victim stops answering SERVING, clients go to the spare.
    wait_for(lambda: not serving(victim), 20, "the stopping TaskService to leave SERVING", interval=0.05)
    left_serving = time.monotonic()
    old_channel = cluster._channel
    assert old_channel is not None
    # The drain: NOT_SERVING already, yet for a while a late client on the old
    # connection is still answered (without it these calls get UNAVAILABLE or CANCELLED).
    late_stub = pb_grpc.TaskServiceStub(old_channel)
    answered = 0
    while time.monotonic() < left_serving + drain_s / 2:
        late = late_stub.PollTask(pb.PollTaskRequest(task_id=load.ids[0]), timeout=5)
        assert late.task.task_id == load.ids[0]
        answered += 1
        time.sleep(0.05)
    assert time.monotonic() < left_serving + drain_s, "too slow to tell whether the drain answered"
    assert answered >= 3
    cluster.task_service, cluster._channel = spare, None
    stopper.join(TERMINATE_TIMEOUT_S + 15)
    assert not stopper.is_alive()
    assert_clean_exit(victim, "task-service stopped")
    finish(cluster, load.join(), "SIGTERM TaskService")
    if old_channel is not None:
        old_channel.close()


def test_sigterm_worker_releases_process_mode_handlers(make_cluster) -> None:
    """A SIGTERM reaches the worker's whole process group, handler children included:
    they must not die of it (a task failure, attempt charged) but be released."""
    cluster: LiveCluster = make_cluster(triggers=1, workers=0)
    argv = ["worker", "--module", "tests.process_handlers", "--slots", "2", "--drain-timeout", "1"]
    first = cluster.group.start("worker", cluster.cfg, argv=argv)
    wait_for(lambda: len(cluster.zk_members("worker")) == 1, 30, "the worker to register")
    ids = []
    for _ in range(2):
        spec = pb.TaskSpec(namespace="chaos", type="chaos.process", payload=b'{"seconds": 8}')
        spec.lease_duration.FromSeconds(4)
        ids.append(cluster.stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10).task_id)
    wait_for(lambda: all(cluster.poll(t).status == pb.RUNNING for t in ids), 60, "both tasks to run in child processes")
    sigterm(first)
    assert_clean_exit(first, "stopped")
    for task_id in ids:
        view = cluster.poll(task_id)
        assert view.status == pb.SCHEDULED and view.attempt == 1, (view.status, view.attempt, view.error, view.error_type)
    cluster.group.start("worker", cluster.cfg, argv=argv)
    views = cluster.wait_terminal(ids, 60)
    for view in views.values():
        # Released, not failed: the same attempt finished on the second worker.
        assert view.status == pb.SUCCEEDED and view.attempt == 1 and view.result == b"done", view
