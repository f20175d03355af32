"""Chaos: real processes, real failures, a few hundred tasks per scenario.

Each scenario runs load through a cluster of real processes, breaks something
(kill -9 a worker, SIGSTOP one past its lease, kill -9 a trigger, restart
ZooKeeper, stop Cassandra), waits for every accepted task to finish, and then
checks the invariants from the execution ledger: none lost, no overlapping
executions, exactly one accepted completion per SUCCEEDED task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from leasesched.v1 import scheduler_pb2 as pb
from tests.chaos.load import Load, steady
from tests.cluster import LiveCluster, Report, check_invariants, wait_for

REPORT_FILE = Path(__file__).resolve().parents[2] / ".leasesched" / "chaos-report.jsonl"


def running_on(cluster: LiveCluster, pid: int) -> set[tuple[str, int]]:
    starts, ends = set(), set()
    for r in cluster.read_jsonl(cluster.ledger):
        if r["event"] in ("start", "end") and r["pid"] == pid:
            (starts if r["event"] == "start" else ends).add((r["task_id"], r["token"]))
    return starts - ends


def finish(cluster: LiveCluster, ids: list[str], scenario: str, timeout: float = 180) -> Report:
    views = cluster.wait_terminal(ids, timeout)
    report = check_invariants(cluster, views)
    REPORT_FILE.parent.mkdir(parents=True, exist_ok=True)
    with REPORT_FILE.open("a") as out:
        out.write(json.dumps({"scenario": scenario, "summary": report.summary(), "t": time.time()}) + "\n")
    print(f"\n[{scenario}] {report.summary()}")
    assert report.tasks == len(ids) >= 200
    assert not report.lost, report.lost[:5]
    assert not report.overlaps, report.overlaps[:5]
    assert not report.store_violations, report.store_violations[:5]
    assert not report.completion_errors, report.completion_errors[:5]
    return report


def test_kill9_worker_mid_task(make_cluster) -> None:
    cluster = make_cluster(triggers=2, workers=3, slots=6)
    load = Load(cluster, count=300, per_second=40).start()
    victim = cluster.workers[0]
    held = wait_for(lambda: running_on(cluster, victim.pid) if len(running_on(cluster, victim.pid)) >= 3 else None,
                    60, "the victim worker to be running tasks")  # fmt: skip
    cluster.kill9(victim)
    report = finish(cluster, load.join(), "kill -9 worker")
    interrupted = {task for task, _ in held}
    assert report.re_executions >= len(interrupted) >= 3
    # The interrupted tasks were finished by another worker, under a newer lease.
    for task_id in interrupted:
        view = cluster.poll(task_id)
        assert view.status == pb.SUCCEEDED and view.lease_owner != ""


def test_sigstop_worker_longer_than_its_lease(make_cluster) -> None:
    cluster = make_cluster(triggers=2, workers=2, slots=6)
    load = Load(cluster, count=250, per_second=40).start()
    victim = cluster.workers[0]
    wait_for(lambda: len(running_on(cluster, victim.pid)) >= 3, 60, "the victim worker to be running tasks")
    victim.pause()
    paused_at = time.time()
    time.sleep(0.2)  # a write already in the kernel lands; after that the frozen ledger cannot change
    frozen = running_on(cluster, victim.pid)
    assert frozen, "the victim had executions in flight when it was frozen"
    # The leases (3 s) expire, the trigger re-queues after the grace, the other worker runs them.
    wait_for(
        lambda: all(cluster.poll(t).lease_token > token for t, token in frozen), 30, "the frozen tasks to be re-claimed"
    )
    assert time.time() - paused_at > 3.0
    victim.resume()
    report = finish(cluster, load.join(), "SIGSTOP worker past its lease")
    assert report.re_executions >= len(frozen)
    ledger = cluster.read_jsonl(cluster.ledger)
    completions = cluster.read_jsonl(cluster.completions)
    for task_id, token in frozen:
        # It stopped that execution itself (its last step came before the freeze), and never
        # completed under the lost lease.
        ends = [r for r in ledger if r["event"] == "end" and (r["task_id"], r["token"]) == (task_id, token)]
        assert ends and ends[0]["stopped"] and ends[0].get("worked_until", ends[0]["t"]) <= paused_at + 0.05, (task_id, ends)
        assert not [c for c in completions if (c["task_id"], c["token"]) == (task_id, token)]


def test_kill9_trigger_under_load(make_cluster) -> None:
    cluster = make_cluster(triggers=2, workers=2, slots=8)
    load = Load(cluster, count=300, per_second=40, kinds=steady(0.4)).start()
    wait_for(lambda: len(load.ids) >= 80, 30, "load to build up in both triggers' shards")
    victim, survivor = cluster.triggers
    cluster.kill9(victim)
    cluster.wait_all_shards_owned(timeout=30, by={survivor.target})
    finish(cluster, load.join(), "kill -9 trigger")


def test_zookeeper_restart_under_load(make_cluster, infra) -> None:
    cluster = make_cluster(triggers=2, workers=2, slots=8)
    load = Load(cluster, count=300, per_second=40).start()
    wait_for(lambda: len(load.ids) >= 80, 30, "load to build up")
    try:
        infra.zookeeper.stop()
        time.sleep(3.0)  # the outage itself
    finally:
        infra.zookeeper.start()
        infra.zookeeper.wait_ready(60)
    cluster.wait_all_shards_owned(timeout=60)
    finish(cluster, load.join(), "ZooKeeper restart")


def test_cassandra_down_for_seconds_under_load(make_cluster, infra) -> None:
    cluster = make_cluster(triggers=2, workers=2, slots=8)
    load = Load(cluster, count=300, per_second=30).start()
    wait_for(lambda: len(load.ids) >= 90, 30, "load to build up")
    try:
        infra.cassandra.stop()
        outage_started = time.monotonic()
        wait_for(lambda: load.unavailable > 0, 30, "services to answer UNAVAILABLE")
        time.sleep(max(0.0, 4.0 - (time.monotonic() - outage_started)))
    finally:
        infra.cassandra.start()
        infra.cassandra.wait_ready(120)
    report = finish(cluster, load.join(), "Cassandra down")
    assert load.unavailable > 0
    print(f"[Cassandra down] clients saw {load.unavailable} UNAVAILABLE answers and retried with the same key")
    assert report.by_status.get("SUCCEEDED", 0) == report.tasks
