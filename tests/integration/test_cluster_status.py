"""``leasesched cluster status`` on a live cluster (real processes, Cassandra,
ZooKeeper): what an operator reads there must be the cluster's real state:
every shard owned exactly once, the triggers with the workers subscribed to
them, the worker holding the lease of the task it runs, tasks by status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import LiveCluster, wait_for
from tests.tokens import issue_tokens


def status(cluster: LiveCluster, *args: str) -> str:
    """The command as an operator runs it, in its own process."""
    argv = [sys.executable, "-m", "leasesched.cli.main", "cluster", "status", *args]
    env = {**os.environ, **cluster.cfg.to_env()}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cluster_status_shows_shards_triggers_workers_and_leases(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=2, workers=2, slots=2)
    task_id = cluster.schedule(seconds=30.0, lease_s=3.0)
    running = wait_for(lambda: (v := cluster.poll(task_id)).status == pb.RUNNING and v, 30, "the task to run")

    def lease_shown() -> dict[str, Any] | None:
        report = json.loads(status(cluster, "--json"))
        leases = {(t, token) for w in report["services"]["worker"].values() for t, token in w.get("leases", [])}
        return report if (task_id, running.lease_token) in leases else None

    report = wait_for(lease_shown, 20, "the worker's registration to show the task's lease")
    shards = cluster.cfg.logical_shards
    assert report["logical_shards"] == shards
    assert report["shards_owned"] == shards and report["shards_without_owner"] == []
    triggers = report["services"]["trigger"]
    assert len(triggers) == 2
    owned = [set(t["shards"]) for t in triggers.values()]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(range(shards))
    workers = set(report["services"]["worker"])
    assert len(workers) == 2
    assert all(set(t["workers"]) == workers for t in triggers.values())
    holders = [w for w, data in report["services"]["worker"].items() if any(t == task_id for t, _ in data["leases"])]
    assert holders == [running.lease_owner]  # exactly one worker believes it holds the lease: the one Cassandra names
    assert report["tasks_by_status"].get("RUNNING", 0) >= 1
    assert len(report["services"]["task-service"]) == 1 and len(report["services"]["task-updater"]) == 1

    text = status(cluster)
    assert f"logical shards: {shards}, owned: {shards}" in text
    assert "WITHOUT OWNER" not in text
    assert text.count("2 workers subscribed") == 2
    assert f"lease {task_id} token {running.lease_token}" in text
    assert "NO WORKER" not in text and report["scheduled_without_worker"] == {}
    cluster.stub.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=10)
    assert cluster.wait_terminal([task_id], 30)[task_id].status == pb.CANCELLED

    # A task of a type no registered worker serves is named.
    spec = pb.TaskSpec(namespace="chaos", type="chaos.nobody_serves_this")
    cluster.stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10)
    assert json.loads(status(cluster, "--json"))["scheduled_without_worker"] == {"chaos/chaos.nobody_serves_this": 1}
    assert "NO WORKER for chaos/chaos.nobody_serves_this: 1 SCHEDULED task(s)" in status(cluster)


def run_status(cfg: Config, token: str | None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "leasesched.cli.main", "cluster", "status"]
    env = {**os.environ, **cfg.to_env(), "LEASESCHED_TOKEN": token or ""}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_cluster_status_with_auth_on_needs_an_admin_token(module_config: Config) -> None:
    """Decision (docs/operations.md, "Who may run cluster status"): admins only,
    the token checked against the store; anything else is one line, exit 1."""
    cfg = module_config.with_overrides(auth="on")
    wanted = [("ops", "admin", "admin"), ("default", "client", "client"), ("default", "worker", "worker")]
    tokens = {name: made[0] for (_, _, name), made in zip(wanted, issue_tokens(cfg, wanted))}

    def refused(token: str | None, *needles: str) -> None:
        result = run_status(cfg, token)
        assert result.returncode != 0 and result.stdout == "", (result.returncode, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr  # one line, no traceback
        for needle in ("admin", *needles):
            assert needle in lines[0], lines[0]

    refused(None, "LEASESCHED_TOKEN")
    refused(tokens["client"], "client token", "'default'")
    refused(tokens["worker"], "worker token")
    refused("lsk_0123456789abcdef_not-the-secret", "unknown or revoked")
    refused("not-a-token", "malformed")
    ok = run_status(cfg, tokens["admin"])
    assert ok.returncode == 0, ok.stderr
    assert "logical shards:" in ok.stdout
