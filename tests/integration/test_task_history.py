"""Issue 16, attempt history, on real processes against the real Cassandra and
ZooKeeper: every attempt of a task is recorded (worker, lease token, claim and
end, outcome, error, last progress), GetTaskHistory and ``leasesched task
history`` show it, a worker killed mid-task leaves a LEASE_LOST attempt and
``lease_losses`` 1 on the task. The attempts recorded must match the
execution ledger the workers' handlers write (tests/chaos_handlers.py)."""

from __future__ import annotations

import os
import subprocess

import grpc
import pytest

from leasesched.client import Client
from leasesched.history import AttemptOutcome
from leasesched.testing import LEASESCHED_BIN
from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import LiveCluster, check_invariants, wait_for
from tests.processes import REPO

OUTCOME = pb.HistoryOutcome


def history(cluster: LiveCluster, task_id: str, limit: int = 0) -> list[pb.TaskHistoryEntry]:
    reply = cluster.stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id, limit=limit), timeout=10)
    return list(reply.entries)


def ledger_pids(cluster: LiveCluster, task_id: str) -> dict[int, int]:
    """lease token → pid of the worker process whose handler ran it (the execution ledger)."""
    return {r["token"]: r["pid"] for r in cluster.read_jsonl(cluster.ledger) if r["task_id"] == task_id and r["event"] == "start"}


def pid_of(worker_id: str) -> int:
    """The pid in a default worker id, ``<host>-<pid>-<4 hex>`` (worker/runner.py)."""
    return int(worker_id.rsplit("-", 2)[1])


def assert_clean(cluster: LiveCluster, views: dict[str, pb.TaskView]) -> None:
    report = check_invariants(cluster, views)
    assert not report.overlaps and not report.lost and not report.completion_errors, cluster.summary()


def test_failures_then_success_are_three_attempts_with_their_workers_and_tokens(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=2, slots=2)
    task_id = cluster.schedule(seconds=0.3, fail=2, max_attempts=3, retry_initial_s=0.2, progress=True)
    views = cluster.wait_terminal([task_id], 90)
    assert views[task_id].status == pb.SUCCEEDED and views[task_id].attempt == 3

    # The completion's entry is written right after its state change: the
    # answer may be on its way when the task already reads SUCCEEDED.
    entries = wait_for(
        lambda: (h := history(cluster, task_id)) and h[0].outcome == OUTCOME.HISTORY_OUTCOME_SUCCEEDED and h,
        20, "the completion's history entry",
    )  # fmt: skip
    assert [(e.attempt, e.lease_token, e.outcome) for e in entries] == [
        (3, 3, OUTCOME.HISTORY_OUTCOME_SUCCEEDED),
        (2, 2, OUTCOME.HISTORY_OUTCOME_FAILED),
        (1, 1, OUTCOME.HISTORY_OUTCOME_FAILED),
    ]  # fmt: skip
    pids = ledger_pids(cluster, task_id)
    for entry in entries:
        assert entry.kind == pb.HISTORY_ENTRY_KIND_ATTEMPT
        assert pid_of(entry.worker_id) == pids[entry.lease_token], "the worker that ran it, as the ledger says"
        assert entry.ended_at.ToMilliseconds() >= entry.started_at.ToMilliseconds() > 0
    assert [e.error for e in entries[1:]] == ["planned failure on attempt 2", "planned failure on attempt 1"]
    assert entries[0].error == "" and entries[0].progress.percent == 100.0
    assert entries[0].started_at.ToMilliseconds() == views[task_id].started_at.ToMilliseconds()
    # Newest first and one after the other: each attempt started after the previous one ended.
    assert entries[1].ended_at.ToMilliseconds() <= entries[0].started_at.ToMilliseconds()
    assert len(history(cluster, task_id, limit=1)) == 1
    with Client(cluster.task_service.target, config=cluster.cfg) as client:  # type: ignore[union-attr]
        lines = client.history(task_id)
        assert [line.outcome for line in lines] == [AttemptOutcome.SUCCEEDED, AttemptOutcome.FAILED, AttemptOutcome.FAILED]

    # Hostile input: the field named, and a missing task is NOT_FOUND like PollTask's.
    for bad, code, field in (("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT, "task_id"),
                             ("00000000-0000-0000-0000-000000000001", grpc.StatusCode.NOT_FOUND, "")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as refused:
            history(cluster, bad)
        assert refused.value.code() == code and field in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as refused:
        history(cluster, task_id, limit=-1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in (refused.value.details() or "")
    assert_clean(cluster, views)


def test_a_killed_worker_leaves_a_lost_lease_then_the_success_and_the_cli_prints_it(make_cluster) -> None:
    cluster = make_cluster(triggers=1, workers=2, slots=2)
    # 6 s of work reporting progress, on a 2 s lease: the kill is in the middle.
    task_id = cluster.schedule(seconds=6.0, lease_s=2.0, max_attempts=3, progress=True)

    def running_with_progress() -> pb.TaskView | None:
        view = cluster.poll(task_id)
        return view if view.status == pb.RUNNING and view.progress.message.startswith("step") else None

    running = wait_for(running_with_progress, 60, "the task to run and report progress")
    victim = next(w for w in cluster.workers if w.pid == pid_of(running.lease_owner))
    cluster.kill9(victim)
    views = cluster.wait_terminal([task_id], 90)
    final = views[task_id]
    assert final.status == pb.SUCCEEDED and final.lease_losses == 1 and not final.stuck

    entries = wait_for(
        lambda: (h := history(cluster, task_id)) and h[0].outcome == OUTCOME.HISTORY_OUTCOME_SUCCEEDED and h,
        20, "the completion's history entry",
    )  # fmt: skip
    assert [e.outcome for e in entries] == [OUTCOME.HISTORY_OUTCOME_SUCCEEDED, OUTCOME.HISTORY_OUTCOME_LEASE_LOST]
    succeeded, lost = entries
    assert lost.worker_id == running.lease_owner and lost.lease_token == running.lease_token
    assert succeeded.worker_id == final.lease_owner != running.lease_owner
    assert succeeded.lease_token == final.lease_token > lost.lease_token
    assert lost.error_type == "LeaseExpired"
    assert lost.progress.message.startswith("step"), "the last progress the lost attempt reported"
    # The lease ran out after the kill, plus the grace: the end is recorded then, not at the kill.
    assert lost.ended_at.ToMilliseconds() >= victim_killed_ms(cluster, victim.pid)

    # The CLI, as a user runs it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASESCHED_")}
    argv = [str(LEASESCHED_BIN), "task", "--target", cluster.task_service.target, "history", task_id]  # type: ignore[union-attr]
    shown = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["ATTEMPT", "TOKEN", "OUTCOME"]
    assert lines[1].split()[:3] == ["2", str(succeeded.lease_token), "SUCCEEDED"] and final.lease_owner in lines[1]
    assert lines[2].split()[:3] == ["1", str(lost.lease_token), "LEASE_LOST"] and running.lease_owner in lines[2]
    assert "LeaseExpired: lease expired on attempt 1" in lines[3]
    polled = subprocess.run([*argv[:-2], "poll", task_id], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert "lost 1 time(s)" in polled.stdout and "STUCK" not in polled.stdout
    assert_clean(cluster, views)


def victim_killed_ms(cluster: LiveCluster, pid: int) -> int:
    return int(cluster.killed_at[pid] * 1000)
