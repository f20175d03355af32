"""Noisy neighbours, on a real TaskService with auth on, over the real Cassandra.

Namespace A floods PollTask and ScheduleTask from many threads (in its own
process, tests/integration/noisy_flood.py) far beyond a small quota and beyond
the server's whole concurrency cap; namespace B polls its own tasks at a
modest steady rate meanwhile. A must be refused (RESOURCE_EXHAUSTED naming
its namespace) for its excess, B must see no error at all and correct
answers. B's poll latency alone and during the flood is printed (the numbers
are in BENCHMARKS.md, "Noisy neighbour"); only a very generous sanity bound is
asserted — speed is measured by the benchmarks, not asserted here.
"""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest

from leasesched.config import Config
from leasesched.testing import ProcessGroup, RunningProcess
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.tokens import issue_tokens
from tests.processes import REPO

NOISY, QUIET = "noisy-a", "quiet-b"
FLOOD_THREADS = 24  # more than the whole cap below: without a per-namespace share, A alone fills it
B_RATE = 20.0  # B's polls per second: well within the quota every namespace has
B_POLLS = 120  # per phase: ~6 s
SANITY_P99_S = 2.0  # not a speed target: only "B was not starved"


@dataclass
class Tokens:
    admin: str
    noisy: str
    quiet: str


def create_tokens(cfg: Config) -> Tokens:
    wanted = [(ns, role, f"noisy-neighbour-{ns}") for ns, role in (("ops", "admin"), (NOISY, "client"), (QUIET, "client"))]
    return Tokens(*(plaintext for plaintext, _ in issue_tokens(cfg, wanted)))


@dataclass
class Flood:
    """The flooding process: started, waited for (it says when it has been limited), stopped."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, target: str, token: str, task_id: str, schedule_every: int, expect: str) -> "Flood":
        argv = [sys.executable, "-m", "tests.integration.noisy_flood", target, token, NOISY, task_id,
                str(FLOOD_THREADS), str(schedule_every), expect]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        flood = cls(proc)
        threading.Thread(target=flood._read, daemon=True).start()
        return flood

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.lines.get(timeout=timeout)))
        except queue.Empty:
            raise AssertionError(f"the flood process did not report {what} within {timeout:.0f} s") from None

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        summary = self.next_line(30, "its summary")
        self.proc.wait(10)
        return summary

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Quiet:
    """Namespace B: a few tasks of its own, polled at a steady rate, every answer checked."""

    stub: pb_grpc.TaskServiceStub
    tasks: dict[str, tuple[str, int]] = field(default_factory=dict)  # task id → (type, run_at in s)

    def schedule(self, n: int, admin: pb_grpc.TaskServiceStub) -> None:
        """Set up by an admin (no quota), so the test's small budgets go to the measured calls only."""
        for i in range(n):
            spec = pb.TaskSpec(namespace=QUIET, type=f"quiet.work{i}", payload=b"x", delay=timedelta(hours=1))
            reply = admin.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10)
            self.tasks[reply.task_id] = (spec.type, reply.run_at.seconds)

    def poll_steadily(self, count: int, rate: float) -> tuple[list[float], list[str]]:
        """Latencies (s) and failures (any error or wrong answer) of ``count`` polls, one every 1/rate s."""
        latencies, failures = [], []
        ids = list(self.tasks)
        start = time.monotonic()
        for i in range(count):
            due = start + i / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing the steady rate, not waiting for a condition
            task_id = ids[i % len(ids)]
            t0 = time.perf_counter()
            try:
                view = self.stub.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10).task
            except grpc.RpcError as err:
                failures.append(f"{err.code().name}: {err.details()}")
                continue
            latencies.append(time.perf_counter() - t0)
            if (view.task_id, view.namespace, (view.type, view.run_at.seconds), view.status) != (
                task_id, QUIET, self.tasks[task_id], pb.SCHEDULED,
            ):  # fmt: skip
                failures.append(f"wrong answer for {task_id}: {view}")
        return latencies, failures


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


@dataclass
class Cluster:
    cfg: Config
    tokens: Tokens
    service: RunningProcess

    def stub(self, token: str) -> pb_grpc.TaskServiceStub:
        assert self.service.target
        return pb_grpc.TaskServiceStub(sync_channel(self.service.target, self.cfg, token=token))


@pytest.fixture
def make_cluster(module_config: Config, processes_group: ProcessGroup) -> Iterator[Any]:
    def make(**limits: Any) -> Cluster:
        base = module_config.with_overrides(auth="on", task_service_max_concurrent_rpcs=16, **limits)
        tokens = create_tokens(base)
        cfg = base.with_overrides(token=tokens.admin)  # the service's own identity
        return Cluster(cfg, tokens, processes_group.start_serving("task-service", cfg))

    yield make


def run_scenario(cluster: Cluster, schedule_every: int, expect: str, label: str) -> tuple[dict[str, Any], list[float], list[float]]:
    """B alone, then B during A's flood. Returns A's summary and B's latencies (alone, flooded)."""
    admin = cluster.stub(cluster.tokens.admin)
    quiet = Quiet(cluster.stub(cluster.tokens.quiet))
    quiet.schedule(3, admin)
    spec = pb.TaskSpec(namespace=NOISY, type="noisy.flood", payload=b"x", delay=timedelta(hours=1))
    noisy_task = admin.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10).task_id

    alone, failures = quiet.poll_steadily(B_POLLS, B_RATE)
    assert failures == [], f"B failed with nobody else calling: {failures[:5]}"

    assert cluster.service.target
    flood = Flood.start(cluster.service.target, cluster.tokens.noisy, noisy_task, schedule_every, expect)
    try:
        flood.next_line(60, f"being refused by its {expect} limit")  # the flood is on and the quota refuses
        flooded, failures = quiet.poll_steadily(B_POLLS, B_RATE)
        summary = flood.stop()
    finally:
        flood.kill()
    assert cluster.service.is_running(), cluster.service.log_tail()
    a50, a99 = percentiles(alone)
    f50, f99 = percentiles(flooded)
    counts = summary["counts"]
    print(
        f"\n[{label}] B PollTask latency, {B_POLLS} polls at {B_RATE:g}/s: alone p50 {a50:.1f} ms p99 {a99:.1f} ms; "
        f"during A's flood ({FLOOD_THREADS} threads) p50 {f50:.1f} ms p99 {f99:.1f} ms; B errors {len(failures)}\n"
        f"[{label}] A's answers: {json.dumps(counts)}; refused by: {json.dumps(summary['refusals'])}\n"
        f"[{label}] A's refusals: {json.dumps(summary['messages'])}"
    )
    assert failures == [], f"B failed during A's flood ({len(failures)} of {B_POLLS}): {failures[:5]}"
    assert f99 / 1000 < SANITY_P99_S, f"B starved: p99 {f99:.0f} ms during the flood"
    return summary, alone, flooded


def test_a_flooding_namespace_is_limited_by_its_own_quota_and_another_keeps_working(make_cluster: Any) -> None:
    """A small rate quota: A's excess polls and schedules are refused, B is untouched.

    The quota (the same for every namespace) is above B's steady 20/s and far
    below what A's 12 slots serve even on a loaded machine, so the buckets (not
    only the share) are what refuse A."""
    cluster: Cluster = make_cluster(
        poll_rate_per_namespace=50.0, poll_burst=50.0, schedule_rate_per_namespace=5.0, schedule_burst=5.0,
        namespace_max_concurrent_rpcs=12,
    )  # fmt: skip
    started = time.monotonic()
    summary, _, _ = run_scenario(cluster, schedule_every=5, expect="rate", label="rate quota")
    elapsed = time.monotonic() - started
    counts, messages = summary["counts"], summary["messages"]
    for method in ("PollTask", "ScheduleTask"):
        assert set(counts[method]) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
        assert counts[method]["RESOURCE_EXHAUSTED"] > counts[method].get("OK", 0), counts  # mostly refused
    assert f"namespace {NOISY!r} is over its write rate limit" in messages["ScheduleTask"].get("rate", ""), messages
    assert f"namespace {NOISY!r} is over its read rate limit" in messages["PollTask"].get("rate", ""), messages
    # What A got through is its quota (burst + rate × time), not what it asked for.
    assert counts["PollTask"].get("OK", 0) <= 50 + 50 * elapsed, counts
    assert counts["ScheduleTask"].get("OK", 0) <= 5 + 5 * elapsed, counts


def test_a_namespace_cannot_take_the_whole_concurrency_cap(make_cluster: Any) -> None:
    """Generous rates: only the share (4 of 16 slots) bounds A, and B still gets in."""
    cluster: Cluster = make_cluster(namespace_max_concurrent_rpcs=4)
    summary, _, _ = run_scenario(cluster, schedule_every=0, expect="share", label="concurrency share")
    polls = summary["counts"]["PollTask"]
    assert set(polls) <= {"OK", "RESOURCE_EXHAUSTED"}, polls
    assert polls.get("OK", 0) > 0 and polls["RESOURCE_EXHAUSTED"] > 0, polls
    message = summary["messages"]["PollTask"].get("share", "")
    assert f"namespace {NOISY!r} already has 4 TaskService calls in progress" in message, summary
