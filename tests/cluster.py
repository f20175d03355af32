"""A whole leasesched cluster of real processes for one test, and the checks
every life-cycle and chaos test applies to what happened.

The cluster (``LiveCluster``): ``leasesched.testing.Cluster`` — TaskService,
TaskUpdater, N triggers and M workers, started and waited for as the load test
and ``local up`` do it — with workers running ``tests.chaos_handlers``, against
the session's real Cassandra and ZooKeeper, with its own keyspace and
ZooKeeper root. Handlers write an execution ledger
(``leasesched.loadtest.ledger``: START where their code starts, END where it
really stops); a watcher thread appends the moment it saw a process that ran
handlers gone (kill -9, a worker's fail-stop exit, a killed handler child);
workers write the accepted completions.

The invariants (``check_invariants``):
* none lost — every accepted task is terminal at the end;
* no overlap — no two executions of one task under different lease tokens
  overlap in time (the ledger's own intervals);
* inside the lease (store check) — every execution under token t lies between
  the TaskUpdater's acceptance of the claim of t and the first of: a newer
  token claimed, a report under t accepted (from the TaskUpdaters' logs);
* one completion — each SUCCEEDED task has at most one completion its worker
  saw accepted, under the lease token the task finished with; when the answer
  was lost (store down, worker killed), a completion was at least sent under
  that token. No other lease's completion is ever accepted.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import psutil
from google.protobuf.duration_pb2 import Duration

from leasesched import testing
from leasesched.config import Config
from leasesched.loadtest import ledger as ledger_mod
from leasesched.store import schema
from leasesched.testing import Cluster, ProcessGroup, RunningProcess
from leasesched.transport import SERVER_GONE_CODES, sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.chaos_handlers import LEDGER_ENV

NAMESPACE = "chaos"
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """``leasesched.testing.wait_for`` that fails the test (AssertionError) at the deadline."""
    try:
        return testing.wait_for(condition, timeout, what, interval)
    except testing.NotReady as exc:
        raise AssertionError(str(exc)) from None


def cluster_config(base: Config, name: str) -> Config:
    """Fast leases and failover, so scenarios take seconds, not minutes."""
    tag = f"{name[:24]}_{uuid.uuid4().hex[:8]}".lower()
    return base.with_overrides(
        keyspace=f"c_{tag}",
        zk_root=f"/leasesched-test/{tag}",
        lease_grace_s=1.0,
        claim_timeout_s=3.0,
        zk_session_timeout_s=4.0,
        partition_settle_s=0.5,
        scan_interval_s=0.3,
    )


def _proc_start_time(pid: int) -> float | None:
    """The start time of a live process (None when it is gone or a zombie): tells a pid from its reuse."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return None if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) else proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class ExitWatch:
    """Appends an exit line to the ledger when a process that ran a handler is seen gone.

    Every pid that wrote a START is watched (workers, and the children of
    process-mode handlers) every ``interval`` s. Its end lies between the last
    poll that saw it alive and the first that saw it gone; the time written is
    the *last seen alive*, so the checks judge only what is proven (writing
    the first-seen-gone time made a child that its worker had killed and
    reaped before reporting look as if it ran 1 ms past that report, when the
    poll came 20 ms late on a busy CI machine). The start time from /proc
    tells a reused pid apart.
    """

    def __init__(self, ledger: Path, interval: float = 0.02) -> None:
        self.ledger = ledger
        self.interval = interval
        self.exits: dict[int, float] = {}
        self._watched: dict[int, float] = {}  # pid → its start time
        self._alive_at: dict[int, float] = {}  # pid → when a poll last saw it alive
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exit-watch", daemon=True)

    def start(self) -> "ExitWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def seen_gone(self, pid: int, at: float) -> None:
        if pid not in self.exits:
            self.exits[pid] = at
            ledger_mod.append_record(self.ledger, ledger_mod.exit_record(pid, at))

    def _new_pids(self) -> set[int]:
        try:
            with open(self.ledger, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return set()
        cut = chunk.rfind(b"\n") + 1
        self._offset += cut
        pids = set()
        for line in chunk[:cut].splitlines():
            if b'"event":"start"' in line:
                try:
                    pids.add(int(json.loads(line)["pid"]))
                except (ValueError, KeyError):
                    continue
        return pids

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self._new_pids() - set(self._watched) - set(self.exits):
                started = _proc_start_time(pid)
                if started is None:
                    self.seen_gone(pid, time.time())  # never seen alive: its START line bounds it
                else:
                    self._watched[pid] = started
                    self._alive_at[pid] = time.time()
            for pid, started in list(self._watched.items()):
                polled = time.time()
                if _proc_start_time(pid) != started:
                    del self._watched[pid]
                    self.seen_gone(pid, self._alive_at.pop(pid, polled))
                else:
                    self._alive_at[pid] = polled

    def live_pids(self) -> set[int]:
        return set(self._watched)


class LiveCluster(Cluster):
    """A ``Cluster`` of chaos-handler workers with its execution ledger, the
    exit watcher, a client, and the ledger's readers.

    ``group`` owns the processes (also those a test starts through
    ``cluster.group``); ``dispose`` stops them all.
    """

    def __init__(self, cfg: Config, group: ProcessGroup, folder: Path, client_token: str = "") -> None:
        self.folder = folder
        super().__init__(
            cfg,
            group,
            worker_module="tests.chaos_handlers",
            slots=8,
            drain_timeout_s=10,
            worker_extra_args=["--ledger", str(self.completions)],
            worker_env={LEDGER_ENV: str(self.ledger)},
        )
        self.killed_at: dict[int, float] = {}  # pid → time of kill -9 (after it was gone)
        self.client_token = client_token  # with auth on: the token the test client presents
        self._channel: grpc.Channel | None = None
        self._watch: ExitWatch | None = None

    @property
    def ledger(self) -> Path:
        return self.folder / "ledger.jsonl"

    @property
    def completions(self) -> Path:
        return self.folder / "completions.jsonl"

    # ------------------------------------------------------------ processes

    def start(self, triggers: int = 2, workers: int = 2, slots: int | None = 8, **kwargs: float) -> "LiveCluster":
        schema.apply(self.cfg)
        self._watch = ExitWatch(self.ledger).start()
        super().start(triggers, workers, slots, **kwargs)
        return self

    def kill9(self, proc: RunningProcess) -> None:
        proc.kill9()  # returns once the process is gone
        self.killed_at[proc.pid] = time.time()  # exits() merges it with the watcher's observations

    # ------------------------------------------------------------ client

    @property
    def stub(self) -> pb_grpc.TaskServiceStub:
        return pb_grpc.TaskServiceStub(self._client_channel())

    @property
    def gates(self) -> pb_grpc.GateServiceStub:
        """GateService, served by the same TaskService process."""
        return pb_grpc.GateServiceStub(self._client_channel())

    @property
    def limits(self) -> pb_grpc.LimitServiceStub:
        """LimitService (concurrency limits), served by the same TaskService process."""
        return pb_grpc.LimitServiceStub(self._client_channel())

    @property
    def schedules(self) -> pb_grpc.ScheduleServiceStub:
        """ScheduleService, served by the same TaskService process."""
        return pb_grpc.ScheduleServiceStub(self._client_channel())

    def _client_channel(self) -> grpc.Channel:
        if self._channel is None:
            assert self.task_service and self.task_service.target
            self._channel = sync_channel(self.task_service.target, self.cfg, token=self.client_token or None)
        return self._channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._watch is not None:
            self._watch.stop()

    def dispose(self) -> None:
        """After a test: close, stop every process started for it, drop its keyspace."""
        self.close()
        self.group.stop_all()
        try:
            schema.drop_keyspace(self.cfg)
        except Exception:  # noqa: BLE001 - a test that left Cassandra down already failed
            pass

    def schedule(
        self,
        seconds: float = 0.2,
        delay_s: float = 0.0,
        priority: int | None = None,
        lease_s: float = 3.0,
        max_attempts: int = 5,
        key: str = "",
        retry_initial_s: float = 0.5,
        retry_unavailable: bool = True,
        concurrency_key: str = "",
        gate: str = "",
        **payload: Any,
    ) -> str:
        """Schedule one chaos.work task; retries UNAVAILABLE (and the other answers of a
        server that is going away) with the same idempotency key."""
        spec = pb.TaskSpec(
            namespace=NAMESPACE, type="chaos.work", payload=json.dumps({"seconds": seconds, **payload}).encode(), gate=gate,
            concurrency_key=concurrency_key,
        )
        if delay_s:
            spec.delay.FromMilliseconds(int(delay_s * 1000))
        if priority is not None:
            spec.priority, spec.has_priority = priority, True
        spec.lease_duration.FromMilliseconds(int(lease_s * 1000))
        spec.retry_policy.maximum_attempts = max_attempts
        spec.retry_policy.initial_interval.CopyFrom(Duration(nanos=int(retry_initial_s * 1e9) % 10**9, seconds=int(retry_initial_s)))
        request = pb.ScheduleTaskRequest(task=spec, idempotency_key=key or uuid.uuid4().hex)
        deadline = time.monotonic() + 90
        while True:
            try:
                return self.stub.ScheduleTask(request, timeout=10).task_id
            except grpc.RpcError as err:
                retriable = err.code() in SERVER_GONE_CODES or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                if not retriable or not retry_unavailable or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def poll(self, task_id: str) -> pb.TaskView:
        return self.stub.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10).task

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, pb.TaskView]:
        views: dict[str, pb.TaskView] = {}

        def check() -> bool:
            for task_id in ids:
                if task_id in views:
                    continue
                view = self.poll(task_id)
                if view.status in TERMINAL:
                    views[task_id] = view
            return len(views) == len(ids)

        try:
            wait_for(check, timeout, "every task to finish", interval=0.5)
        except AssertionError as exc:
            stuck = [t for t in ids if t not in views][:5]
            detail = {t: pb.TaskStatus.Name(self.poll(t).status) for t in stuck}
            raise AssertionError(f"{exc}; {len(ids) - len(views)} not terminal, e.g. {detail}") from None
        return views

    # ------------------------------------------------------------ ledger

    def read_jsonl(self, path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def exits(self) -> dict[int, float]:
        """pid → when it was seen gone (the test's kills and the watcher's observations)."""
        seen = dict(self._watch.exits) if self._watch is not None else {}
        for pid, at in self.killed_at.items():
            seen[pid] = min(at, seen.get(pid, math.inf))
        return seen

    def open_executions(self) -> list[ledger_mod.Execution]:
        runs, _ = ledger_mod.executions(ledger_mod.read(self.ledger), self.exits())
        return [e for e in runs if e.ended == "open"]

    def wait_executions_settled(self, timeout: float) -> list[ledger_mod.Execution]:
        """Wait until every execution wrote its END or its process was seen gone; return
        the ones still running at the deadline (a handler that outlives its task)."""
        deadline = time.monotonic() + timeout
        while True:
            still = self.open_executions()
            if not still or time.monotonic() > deadline:
                return still
            time.sleep(0.1)

    def store_events(self) -> ledger_mod.StoreEvents:
        """Claims and reports as every TaskUpdater of this cluster logged them."""
        records: list[dict[str, Any]] = []
        for proc in self.group.processes:
            if proc.name.startswith("task-updater") and proc.log_path.exists():
                for line in proc.log_path.read_text(errors="replace").splitlines():
                    if line.startswith("{"):
                        try:
                            records.append(json.loads(line))
                        except ValueError:
                            continue  # a line cut by a kill
        return ledger_mod.store_events_from_logs(records)


@dataclass
class Report:
    tasks: int
    executions: int
    re_executions: int
    overlaps: list[str]
    lost: list[str]
    completion_errors: list[str]
    by_status: dict[str, int]
    store_violations: list[str] = field(default_factory=list)
    still_running: list[str] = field(default_factory=list)
    overlapping: list[tuple[ledger_mod.Execution, ledger_mod.Execution]] = field(default_factory=list, repr=False)
    store_offenders: list[ledger_mod.Execution] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        return (
            f"tasks={self.tasks} executions={self.executions} re-executions={self.re_executions} "
            f"overlaps={len(self.overlaps)} store-violations={len(self.store_violations)} lost={len(self.lost)} "
            f"completion-errors={len(self.completion_errors)} still-running={len(self.still_running)} status={self.by_status}"
        )


def check_invariants(cluster: LiveCluster, views: dict[str, pb.TaskView], settle_s: float = 30.0) -> Report:
    """The invariants over what the ledger, the TaskUpdaters' logs and the completions say.

    First waits (up to ``settle_s``) until no execution is open any more: a
    handler may outlive its task, and the checks judge whole executions.
    """
    cluster.wait_executions_settled(settle_s)
    verdict = ledger_mod.check(ledger_mod.read(cluster.ledger), store=cluster.store_events(), exits=cluster.exits())
    lost = [t for t, v in views.items() if v.status not in TERMINAL]
    accepted: dict[str, list[int]] = defaultdict(list)
    sent: dict[str, set[int]] = defaultdict(set)
    for record in cluster.read_jsonl(cluster.completions):
        if record["event"] == "complete":
            accepted[record["task_id"]].append(record["token"])
        elif record["event"] == "complete_sent":
            sent[record["task_id"]].add(record["token"])
    completion_errors = []
    for task_id, view in views.items():
        tokens = accepted.get(task_id, [])
        if view.status != pb.SUCCEEDED:
            if tokens:
                completion_errors.append(f"{task_id}: {pb.TaskStatus.Name(view.status)} but a completion was accepted")
            continue
        if len(tokens) > 1 or any(t != view.lease_token for t in tokens):
            completion_errors.append(f"{task_id}: accepted completions under tokens {tokens}, final token {view.lease_token}")
        elif not tokens and view.lease_token not in sent.get(task_id, set()):
            # No acknowledged completion is fine only when one was sent under
            # the final token and its answer was lost (store down, worker killed).
            completion_errors.append(f"{task_id}: SUCCEEDED under token {view.lease_token} without a completion sent")
    statuses: dict[str, int] = defaultdict(int)
    for view in views.values():
        statuses[pb.TaskStatus.Name(view.status)] += 1
    return Report(
        tasks=len(views),
        executions=verdict.executions,
        re_executions=verdict.re_executions,
        overlaps=verdict.overlaps,
        lost=lost,
        completion_errors=completion_errors,
        by_status=dict(statuses),
        store_violations=verdict.store_violations,
        still_running=verdict.still_running,
        overlapping=verdict.overlapping,
        store_offenders=verdict.store_offenders,
    )
