"""One load test, from start to report.

1. (``local``) start Cassandra and ZooKeeper if needed, a fresh keyspace and
   ZooKeeper root, TaskService, TaskUpdater, N triggers and M bench workers;
2. probe the store's raw plain-write and LWT capacity (same driver settings);
3. drive TaskService open-loop for ``duration`` s: ScheduleTask at its rate,
   PollTask at its own rate on random already-accepted tasks, a live progress
   bar with current rates; CPU seconds per process over that window; optional
   py-spy profiles;
   With ``schedules`` > 0, before the load: create that many periodic
   schedules (``schedule_load.SchedulePlan``) whose slots span exactly the
   load window, and start the window at their first slot;
   With ``groups`` > 0, every task of the load gets a concurrency key
   ``g0..g{N-1}`` (``groups.GroupPlan``), and with ``flood`` > 0 that many
   tasks for ``g0`` are scheduled in one burst before the window starts;
   With ``limit_per_key`` and/or ``gate_rate`` (``flow.FlowPlan``), before
   the load: a default key limit ``*`` in the load's namespace and/or a gate
   ``load-<run id>`` that every task of the load names; both removed (a
   limit that was there before: put back) once the load has drained;
4. drain: wait until every accepted task, and every expected slot's task,
   has finished (or ``drain`` s passed), then read every accepted task back
   with PollTask: its final status and finish time; the schedules' tasks
   are read with ListTasks of the namespace, their counters with
   DescribeSchedule, and the schedules deleted;
5. read the execution ledger: dispatch lag, executions, overlaps;
6. write ``report.json`` and ``chart.png`` to the results folder;
7. stop what it started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import backoff
import grpc
import psutil
from tqdm import tqdm

from leasesched.config import Config
from leasesched.loadtest import ledger as ledger_mod
from leasesched.loadtest.arrival import open_loop, open_loop_batches
from leasesched.loadtest.bench_tasks import BENCH_MODULE, LEDGER_ENV, NAMESPACE, TASK_TYPE, make_payload
from leasesched.loadtest.cpu import CpuMeter
from leasesched.loadtest.flow import FlowPlan
from leasesched.loadtest.groups import BurstStats, GroupedTask, GroupPlan
from leasesched.loadtest.metrics import MethodStats
from leasesched.loadtest.schedule_load import Counters, SchedulePlan, SlotTask
from leasesched.schedules import Overlap
from leasesched.testing import Cluster, ProcessGroup
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
MAX_DRAIN_EXTENSION_S = 300.0  # the drain waits for delayed tasks due at most this long after the load
DUE_MARGIN_S = 5.0  # a task due this close to the drain's end is not expected to have finished
SCHEDULE_CONCURRENCY = 64  # schedule RPCs (create, describe, delete) in flight at once
LIST_PAGE_SIZE = 500  # ListTasks page size when reading the schedules' tasks back
FLOOD_CONCURRENCY = 128  # flood ScheduleTask calls in flight at once: "as fast as the service takes them"
FLOOD_TRIES = 20  # a flood ScheduleTask refused with RESOURCE_EXHAUSTED is sent again, backing off, up to this often
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]


@dataclass
class LoadOptions:
    schedule_rate: float = 1000.0  # ScheduleTask per second (open loop)
    poll_rate: float = 3000.0  # PollTask per second (open loop)
    duration_s: float = 60.0
    delayed_fraction: float = 0.2  # share of tasks scheduled with a delay
    delay_min_s: float = 1.0
    delay_max_s: float = 10.0
    payload_bytes: int = 256
    handler_ms: float = 0.0
    priority_min: int = 5
    priority_max: int = 5
    idempotency_keys: bool = False
    # Tasks per ScheduleTasks call: 1 = one ScheduleTask per task (the default); N > 1: the tasks due at each tick
    # (arrival.open_loop_batches) leave in ScheduleTasks calls of up to N, each task's latency the call's.
    schedule_batch: int = 1
    timeout_s: float = 10.0  # per-RPC deadline
    max_inflight: int = 2_000  # per method; past it a due request is counted as not sent
    channels: int = 4
    drain_s: float = 60.0  # after the load (and after the last delayed task is due)
    verify_concurrency: int = 200
    probe_s: float = 5.0  # 0: no store probe
    probe_concurrency: int = 128
    profile: list[str] = field(default_factory=list)  # process names or roles to py-spy
    progress: bool = True
    # Where the load goes. local=True: start a cluster (below); else target (+ ledger if the workers write one).
    local: bool = True
    target: str = ""
    ledger: str = ""
    triggers: int = 2
    workers: int = 2
    slots: int = 64
    start_infra: bool = True
    stop_infra: bool = False
    keep_data: bool = False
    results_dir: str = "results"
    label: str = ""
    # Periodic schedules (0: none): created before the load, firing the bench no-op over exactly the load window.
    schedules: int = 0
    schedule_every_s: float = 10.0
    schedule_jitter_s: float = 0.0
    schedule_handler_ms: float = 0.0
    # ALLOW_ALL by default: every slot must then have a task, so "missed" is never a legitimate skip.
    schedule_overlap: str = Overlap.ALLOW_ALL.value
    # Concurrency-key groups (0: none, the tasks have no key): g0..g{groups-1}; g0 gets flood_share of the load
    # (None: uniform) and ``flood`` tasks in one burst before it. Left out of the report's options when 0.
    groups: int = 0
    flood_share: float | None = None
    flood: int = 0
    # Flow control (None: none): a default key limit "*" of this many running tasks (needs groups), and a gate
    # every task of the load names (gate_burst None: 1). Set up before the load, removed after; left out of the
    # report's options when neither is given.
    limit_per_key: int | None = None
    gate_rate: float | None = None
    gate_burst: int | None = None


def _now_tag() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class LoadTest:
    def __init__(self, opts: LoadOptions, cfg: Config) -> None:
        self.o = opts
        self.cfg = cfg
        self.run_id = uuid.uuid4().hex[:8]
        self.infra_pids: dict[str, int] = {}
        name = f"{_now_tag()}-{opts.label or 'run'}-{self.run_id}"
        self.folder = Path(opts.results_dir).resolve() / name
        self.cluster: Cluster | None = None
        self.tasks: dict[str, tuple[float, int, bool]] = {}  # task id → (intended send wall time, run_at ms, immediate)
        self.answered: dict[str, float] = {}  # task id → wall time its ScheduleTask answer arrived (stage breakdown)
        self.accepted: list[str] = []
        self.preflight = 0
        self.final: dict[str, Any] = {}
        self.due_by_ms = 0
        self.machine_series: list[dict[str, float]] = []  # machine CPU busy % and load average, every second of the load
        self.plan: SchedulePlan | None = None  # the run's schedules, when it has any
        self.schedule_tasks: list[SlotTask] = []  # the tasks they created, as listed after the drain
        self.schedule_counters = Counters()
        self.schedule_create_s = 0.0
        self.schedule_create_failed = 0
        self.schedule_created_at = 0.0  # wall time the creation ended
        self.group_plan = GroupPlan.from_options(opts.groups, opts.flood_share, opts.flood)
        self.grouped: dict[str, GroupedTask] = {}  # task id → its group, for every accepted task given a key
        self.burst = BurstStats()
        self.flow_plan = FlowPlan.from_options(opts.limit_per_key, opts.gate_rate, opts.gate_burst, opts.groups, self.run_id)
        self.gated: list[str] = []  # ids of the accepted tasks that name the run's gate
        self.flow_setup: dict[str, Any] = {}  # what setting the limit and gate up, and removing them, answered
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up

    def _setup_local(self) -> None:
        from leasesched.infra.local import LocalInfra
        from leasesched.store import schema

        base = self.cfg.with_overrides(keyspace=f"bench_{self.run_id}", zk_root=f"/leasesched-bench/{self.run_id}")
        self.cfg = base
        infra = LocalInfra.from_config(base)
        if self.o.start_infra:
            _say(f"infra: starting Cassandra and ZooKeeper under {base.home} (idempotent) ...")
            infra.up()
        self.infra_pids = {s.name: s.pid for s in infra.status() if s.pid}
        _say(f"schema: keyspace {base.keyspace}")
        schema.apply(base)
        service_env: dict[str, str] = {}
        worker_env: dict[str, str] = {}
        if base.auth == "on":
            from leasesched.infra.tokens import local_tokens

            tokens = local_tokens(base)
            service_env = {"LEASESCHED_TOKEN": tokens["admin"]}
            worker_env = {"LEASESCHED_TOKEN": tokens["admin"]}
            self.cfg = base.with_overrides(token=tokens["admin"])
        _say(f"cluster: task-service, task-updater, {self.o.triggers} triggers, {self.o.workers} workers × {self.o.slots} slots")
        # Processes, logs and PID files in the results folder; the bench
        # workers append to the execution ledger there.
        ledger = self.folder / "ledger.jsonl"
        self.cluster = Cluster(self.cfg, ProcessGroup(self.folder), worker_module=BENCH_MODULE, slots=self.o.slots,
                               drain_timeout_s=10, worker_env={LEDGER_ENV: str(ledger), **worker_env},
                               service_env=service_env)  # fmt: skip
        self.cluster.start(self.o.triggers, self.o.workers, serving_timeout=90, ready_timeout=90)  # stops what it started if it fails
        assert self.cluster.task_service is not None and self.cluster.task_service.target is not None
        self.target = self.cluster.task_service.target
        self.ledger_path: Path | None = ledger

    def _teardown_local(self) -> None:
        from leasesched.infra.local import LocalInfra
        from leasesched.store import schema

        if self.cluster is not None:
            _say("cluster: stopping processes")
            for problem in self.cluster.stop(20):
                _say(f"cluster: could not stop {problem}")
        if not self.o.keep_data:
            try:
                schema.drop_keyspace(self.cfg)
            except Exception as exc:  # noqa: BLE001
                _say(f"could not drop keyspace {self.cfg.keyspace}: {exc}")
        if self.o.stop_infra:
            _say("infra: stopping Cassandra and ZooKeeper")
            LocalInfra.from_config(self.cfg).down()

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """The whole test; the cluster it started is stopped however it ends (SIGTERM and SIGHUP included)."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

        def interrupted(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in previous:
            signal.signal(sig, interrupted)
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.infra_pids = {}
        load_before = os.getloadavg()
        started = time.time()
        try:
            if self.o.local:
                self._setup_local()
            else:
                self.target = self.o.target or self.cfg.task_service_target
                self.ledger_path = Path(self.o.ledger) if self.o.ledger else None
            probe = None
            if self.o.probe_s > 0:
                from leasesched.loadtest.store_probe import probe as store_probe

                _say(f"store probe: {self.o.probe_s:.0f} s plain writes, {self.o.probe_s:.0f} s LWT, {self.o.probe_concurrency} in flight")
                probe = store_probe(self.cfg, self.o.probe_s, self.o.probe_concurrency, self.o.payload_bytes)
                _say(f"store probe: plain {probe['plain_writes']['per_s']:.0f}/s, LWT {probe['lwt_writes']['per_s']:.0f}/s")
            self._set_up_flow()
            try:
                load = asyncio.run(self._load())
            finally:
                self._remove_flow()
            ledger_summary = self._read_ledger()
            from leasesched.loadtest.report import build

            self.report = build(self, load, ledger_summary, probe, load_before, started)
            self._write()
            self._write_tasks(ledger_summary)
            return self.report
        finally:
            if self.o.local:
                self._teardown_local()

    def _write(self) -> None:
        from leasesched.loadtest.chart import draw

        path = self.folder / "report.json"
        path.write_text(json.dumps(self.report, indent=2, default=str))
        try:
            draw(self.report, self.folder / "chart.png")
            self.report["files"]["chart"] = str(self.folder / "chart.png")
        except Exception as exc:  # noqa: BLE001 - the JSON is the record; a chart failure must not lose it
            _say(f"chart failed: {exc}")
        self.report["files"]["report"] = str(path)
        path.write_text(json.dumps(self.report, indent=2, default=str))

    def _write_tasks(self, ledger_summary: ledger_mod.LedgerSummary | None) -> None:
        """One line per accepted task, for analyses the report does not make (tasks.csv)."""
        import csv

        path = self.folder / "tasks.csv"
        first = ledger_summary.first_start if ledger_summary else {}
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            grouped = self.group_plan is not None  # the group column only then: a run without groups writes what it always did
            w.writerow(["task_id", "immediate", "sent_ms", "run_at_ms", "first_start_ms", "finished_ms", "status"]
                       + (["group"] if grouped else []))  # fmt: skip
            for task_id in self.accepted:
                sent, run_at, immediate = self.tasks[task_id]
                view = self.final.get(task_id)
                start = first.get(task_id)
                finished: int | str = ""
                status = str(view)  # not a TaskView: what the final read answered instead
                if isinstance(view, pb.TaskView):
                    finished = view.finished_at.ToMilliseconds() if view.HasField("finished_at") else ""
                    status = pb.TaskStatus.Name(view.status)
                group = self.grouped.get(task_id)
                w.writerow([
                    task_id, int(immediate), int(sent * 1000), run_at, int(start * 1000) if start else "", finished, status,
                ] + ([self.group_plan.key(group.group) if group and self.group_plan else ""] if grouped else []))  # fmt: skip
        self.report["files"]["tasks"] = str(path)

    # ------------------------------------------------------------------ flow control

    def _set_up_flow(self) -> None:
        """The run's key limit and gate, before any task of the load is sent.

        A failure ends the run: a load that says it ran under a limit or a
        gate it never had would measure nothing it claims to. A limit ``*``
        that was already there (a cluster not started by this run) is
        remembered, to be put back. Then the wait until every process has
        read the limit: each keeps the limits it read for
        ``admission.LIMITS_REFRESH_S``, so a task claimed sooner might not be
        held by it."""
        plan = self.flow_plan
        if plan is None:
            return
        from leasesched.admission import LIMITS_REFRESH_S
        from leasesched.client import Client, LimitScope, NotFoundError

        _say(f"flow: {plan.describe()} in namespace {NAMESPACE}")
        with Client(self.target, config=self.cfg, namespace=NAMESPACE) as client:
            if plan.limit_per_key is not None:
                try:
                    before = client.get_limit(LimitScope.KEY, plan.limit_name)
                    self.flow_setup["limit_before"] = before.max_running
                except NotFoundError:
                    self.flow_setup["limit_before"] = None
                info = client.set_limit(LimitScope.KEY, plan.limit_name, plan.limit_per_key, create_or_update=True)
                self.flow_setup["limit"] = {"label": info.label(), "max_running": info.max_running, "version": info.version}
            if plan.gate_rate is not None:
                view = client.set_gate(plan.gate_name, plan.gate_rate, plan.gate_burst, create_or_update=True)
                self.flow_setup["gate"] = {"name": view.name, "rate": view.rate, "burst": view.burst, "version": view.version}
        if plan.limit_per_key is not None:
            time.sleep(LIMITS_REFRESH_S + 0.5)

    def _remove_flow(self) -> None:
        """Delete the run's gate and limit (or put back the limit that was
        there before). Failures are recorded and said, not raised: the
        measurement is done, and the report must still be written."""
        plan = self.flow_plan
        if plan is None or "removed" in self.flow_setup:
            return
        from leasesched.client import Client, ClientError, LimitScope

        errors: list[str] = []
        with Client(self.target, config=self.cfg, namespace=NAMESPACE) as client:
            if "gate" in self.flow_setup:
                try:
                    client.delete_gate(plan.gate_name)
                except ClientError as err:
                    errors.append(f"gate {plan.gate_name}: {err}")
            if "limit" in self.flow_setup:
                before = self.flow_setup.get("limit_before")
                try:
                    if before is None:
                        client.delete_limit(LimitScope.KEY, plan.limit_name)
                    else:
                        client.set_limit(LimitScope.KEY, plan.limit_name, int(before), create_or_update=True)
                except ClientError as err:
                    errors.append(f"limit {plan.limit_name}: {err}")
        self.flow_setup["removed"] = not errors
        if errors:
            self.flow_setup["errors"] = errors
            _say(f"flow: could not remove {errors}")

    # ------------------------------------------------------------------ load

    async def _load(self) -> dict[str, Any]:
        o = self.o
        metadata = (("authorization", f"Bearer {self.cfg.token}"),) if self.cfg.token else None
        channels = [grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) for _ in range(max(1, o.channels))]
        stubs = [pb_grpc.TaskServiceStub(c) for c in channels]
        schedule_stubs = [pb_grpc.ScheduleServiceStub(c) for c in channels]
        try:
            for c in channels:
                await asyncio.wait_for(c.channel_ready(), 15)
            return await self._drive(stubs, schedule_stubs, metadata)
        finally:
            for c in channels:
                await c.close()

    async def _drive(
        self, stubs: list[pb_grpc.TaskServiceStub], schedule_stubs: list[pb_grpc.ScheduleServiceStub], metadata: Any
    ) -> dict[str, Any]:
        o = self.o
        loop = asyncio.get_running_loop()
        payload = make_payload(o.handler_ms, o.payload_bytes)
        rng = random.Random(self.run_id)
        key_prefix = f"bench-{self.run_id}"
        if o.schedules > 0:
            self.plan = self._schedule_plan()
            await self._create_schedules(schedule_stubs, metadata, self.plan)

        groups = self.group_plan
        gate = self.flow_plan.gate_name if self.flow_plan is not None else ""

        def spec_for(i: int) -> tuple[pb.ScheduleTaskRequest, bool]:
            spec = pb.TaskSpec(namespace=NAMESPACE, type=TASK_TYPE, payload=payload)
            if groups is not None and i >= 0:  # the pre-flight tasks (i < 0) stay without a key
                spec.concurrency_key = groups.key(groups.group_of(i))
            if gate and i >= 0:  # and without the gate: they warm connections up, and are not the gate's load
                spec.gate = gate
            if o.priority_max != 5 or o.priority_min != 5:
                spec.priority, spec.has_priority = rng.randint(o.priority_min, o.priority_max), True
            delayed = rng.random() < o.delayed_fraction
            if delayed:
                spec.delay.FromMilliseconds(int(1000 * rng.uniform(o.delay_min_s, o.delay_max_s)))
            key = f"{key_prefix}-{i}" if o.idempotency_keys else ""
            return pb.ScheduleTaskRequest(task=spec, idempotency_key=key), not delayed

        # A few requests before the clock starts: connections, first-call paths.
        self.preflight = 10
        for i in range(self.preflight):
            request, immediate = spec_for(-1 - i)
            sent_wall = time.time()
            reply = await stubs[0].ScheduleTask(request, timeout=o.timeout_s, metadata=metadata)
            self.answered[reply.task_id] = time.time()
            self.tasks[reply.task_id] = (sent_wall, reply.run_at.ToMilliseconds(), immediate)
            self.accepted.append(reply.task_id)
            await stubs[0].PollTask(pb.PollTaskRequest(task_id=reply.task_id), timeout=o.timeout_s, metadata=metadata)

        if groups is not None and groups.flood > 0:
            await self._flood(stubs, metadata, groups, payload, gate)
        if self.plan is not None:  # the window starts at the schedules' first slot
            await asyncio.sleep(max(0.0, self.plan.start_ms / 1000.0 - 0.2 - time.time()))
        t0 = loop.time() + 0.2
        t0_wall = time.time() + 0.2
        end = t0 + o.duration_s
        to_wall = lambda t: t0_wall + (t - t0)  # noqa: E731
        sched = MethodStats("ScheduleTask", t0)
        poll = MethodStats("PollTask", t0)
        pending: set[asyncio.Task[None]] = set()

        def accepted(i: int, intended: float, reply: pb.ScheduleTaskResponse, immediate: bool, answered: float) -> None:
            self.answered[reply.task_id] = to_wall(answered)  # on the clock of the send time, as the latency
            self.tasks[reply.task_id] = (to_wall(intended), reply.run_at.ToMilliseconds(), immediate)
            self.accepted.append(reply.task_id)
            if groups is not None:
                self.grouped[reply.task_id] = GroupedTask(reply.task_id, groups.group_of(i), reply.run_at.ToMilliseconds())
            if gate:
                self.gated.append(reply.task_id)

        async def schedule_one(i: int, intended: float) -> None:
            request, immediate = spec_for(i)
            sched.on_sent(intended, loop.time())
            try:
                reply = await stubs[i % len(stubs)].ScheduleTask(request, timeout=o.timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                sched.on_done(intended, loop.time(), err.code().name, err.details() or "")
                return
            answered = loop.time()
            sched.on_done(intended, answered, None)
            accepted(i, intended, reply, immediate, answered)

        async def schedule_batch(items: list[tuple[int, float]]) -> None:
            """One ScheduleTasks call for ``items``: each task's latency is the call's
            (from its send: the wait for the batch to fill is the task's send lag)."""
            specs = [spec_for(i) for i, _ in items]
            sent = loop.time()
            for _, intended in items:
                sched.on_sent(intended, sent)
            request = pb.ScheduleTasksRequest(tasks=[r for r, _ in specs])
            try:
                reply = await stubs[items[0][0] % len(stubs)].ScheduleTasks(request, timeout=o.timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                for _, intended in items:
                    sched.on_done(intended, loop.time(), err.code().name, err.details() or "", sent=sent)
                return
            done = loop.time()
            for (i, intended), (_, immediate), result in zip(items, specs, reply.results):
                if result.WhichOneof("result") == "scheduled":
                    sched.on_done(intended, done, None, sent=sent)
                    accepted(i, intended, result.scheduled, immediate, done)
                else:
                    sched.on_done(intended, done, _code_name(result.error.code), result.error.message, sent=sent)

        async def poll_one(i: int, intended: float) -> None:
            task_id = self.accepted[rng.randrange(len(self.accepted))]
            poll.on_sent(intended, loop.time())
            try:
                await stubs[i % len(stubs)].PollTask(pb.PollTaskRequest(task_id=task_id), timeout=o.timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                poll.on_done(intended, loop.time(), err.code().name, err.details() or "")
                return
            poll.on_done(intended, loop.time(), None)

        cluster_pids = self.cluster.pids() if self.cluster is not None else {}
        meter = CpuMeter({**cluster_pids, **self.infra_pids})
        # The same processes from the load's start to the drain's end: tasks held back by a limit or a gate run
        # after the load window, and their CPU must count for CPU per execution.
        through_drain = CpuMeter({**cluster_pids, **self.infra_pids})
        through_drain_began = time.time()
        profiler = self._start_profiles(cluster_pids)
        tail = ledger_mod.LedgerTail(self.ledger_path) if self.ledger_path else None
        meter.start(time.monotonic())
        through_drain.start(time.monotonic())
        if o.schedule_batch > 1:
            schedules: Awaitable[int] = open_loop_batches(
                o.schedule_rate, t0, end, o.schedule_batch, schedule_batch, lambda: sched.inflight, o.max_inflight,
                sched.on_not_sent, pending,
            )  # fmt: skip
        else:
            schedules = open_loop(o.schedule_rate, t0, end, schedule_one, lambda: sched.inflight, o.max_inflight, sched.on_not_sent, pending)
        load = asyncio.gather(
            schedules,
            open_loop(o.poll_rate, t0, end, poll_one, lambda: poll.inflight, o.max_inflight, poll.on_not_sent, pending),
        )
        progress = asyncio.ensure_future(self._progress(sched, poll, tail, t0, end))
        due_counts = await load
        while pending:  # answers still on their way (each has a deadline)
            await asyncio.wait(set(pending))
        load_end = loop.time()
        cpu = meter.stop(time.monotonic())
        progress.cancel()
        profiles = profiler.finish() if profiler else {}
        seconds = o.duration_s
        drain_info = await self._drain(stubs, metadata, tail)
        if self.plan is not None:
            drain_info["schedules"] = await self._finish_schedules(stubs, schedule_stubs, metadata, drain_info["deadline"])
        cpu_through_drain = {**through_drain.stop(time.monotonic()), "began_wall": through_drain_began, "ended_wall": time.time()}
        return {
            "t0_wall": t0_wall,
            "seconds": seconds,
            "tail_s": round(load_end - end, 3),
            "schedule": sched,
            "poll": poll,
            "due": {"ScheduleTask": due_counts[0], "PollTask": due_counts[1]},
            "cpu": cpu,
            "cpu_through_drain": cpu_through_drain,
            "profiles": profiles,
            "drain": drain_info,
        }

    def _start_profiles(self, pids: dict[str, int]) -> Any:
        if not self.o.profile:
            return None
        from leasesched.loadtest.profiling import Profiler

        profiler = Profiler(self.folder)
        wanted = set(self.o.profile)
        if "client" in wanted:
            wanted.add("loadtest-client")
        if "loadtest-client" in wanted or "all" in wanted:
            pids = {**pids, "loadtest-client": os.getpid()}
        for name, pid in pids.items():
            role = name.rsplit("-", 1)[0] if name.split("-")[-1].isdigit() else name
            if name in wanted or role in wanted or "all" in wanted:
                if not profiler.start(name, pid, self.o.duration_s):
                    _say("py-spy not found: pip install py-spy")
                    return None
        return profiler

    async def _progress(self, sched: MethodStats, poll: MethodStats, tail: Any, t0: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        bar = tqdm(total=int(self.o.duration_s), unit="s", desc="load", disable=not self.o.progress, file=sys.stderr,
                   bar_format="{desc} {bar} {n_fmt}/{total_fmt}s {postfix}", dynamic_ncols=True)  # fmt: skip
        last_ends, last_t = 0, loop.time()
        psutil.cpu_percent()  # starts the measurement interval
        try:
            while True:
                await asyncio.sleep(1.0)
                now = loop.time()
                self.machine_series.append(
                    {"t": round(now - t0, 1), "busy_pct": psutil.cpu_percent(), "loadavg_1m": round(os.getloadavg()[0], 2)}
                )
                done_rate = 0.0
                if tail is not None:
                    tail.poll()
                    done_rate = (tail.ends - last_ends) / max(1e-6, now - last_t)
                    last_ends, last_t = tail.ends, now
                bar.n = min(int(self.o.duration_s), int(now - t0))
                errors = sum(sched.errors.values()) + sum(poll.errors.values())
                bar.set_postfix_str(
                    f"schedule {sched.rate_last(now):.0f}/s  poll {poll.rate_last(now):.0f}/s  done {done_rate:.0f}/s  "
                    f"in flight {sched.inflight + poll.inflight}  errors {errors}"
                )
        finally:
            bar.n = int(self.o.duration_s)
            bar.refresh()
            bar.close()

    # ------------------------------------------------------------------ drain and verify

    async def _drain(self, stubs: list[pb_grpc.TaskServiceStub], metadata: Any, tail: Any) -> dict[str, Any]:
        """Wait until every task that is due by the drain's end has finished (ledger), then
        read every accepted task's final state with PollTask.

        The drain lasts ``drain_s`` after the load, extended to cover delayed
        tasks due within ``MAX_DRAIN_EXTENSION_S``; tasks due later than the
        drain's end are legitimately still SCHEDULED: counted as
        ``not_due_yet``, never as lost.
        """
        o = self.o
        now = time.time()
        run_ats = [run_at for _, run_at, _ in self.tasks.values()]
        slot_tasks = sum(len(slots) for slots in self.plan.expected().values()) if self.plan is not None else 0
        if self.plan is not None:
            run_ats.append(self.plan.last_due_ms())
        latest_due = max(run_ats, default=0) / 1000.0
        deadline = now + o.drain_s + max(0.0, min(latest_due, now + MAX_DRAIN_EXTENSION_S) - now)
        self.due_by_ms = int((deadline - DUE_MARGIN_S) * 1000)
        due_times = [run_at for _, run_at, _ in self.tasks.values() if run_at <= self.due_by_ms]
        due, last_due = len(due_times) + slot_tasks, max(due_times + run_ats[len(self.tasks):], default=0) / 1000.0
        bar = tqdm(total=due, unit="task", desc="drain", disable=not o.progress, file=sys.stderr)
        try:
            if tail is not None:
                while time.time() < deadline:
                    tail.poll()
                    bar.n = min(due, tail.ends)
                    bar.refresh()
                    if tail.ends >= due and time.time() >= last_due:
                        break
                    await asyncio.sleep(0.5)
        finally:
            bar.close()
        # Every accepted task, read back; those not terminal yet are read again until the deadline.
        remaining = list(self.accepted)
        passes = 0
        while remaining:
            passes += 1
            views = await self._read_all(stubs, metadata, remaining)
            self.final.update(views)
            remaining = [
                t for t in remaining
                if not (isinstance(views.get(t), pb.TaskView) and (views[t].status in TERMINAL or self.tasks[t][1] > self.due_by_ms))
            ]  # fmt: skip
            if not remaining or time.time() >= deadline:
                break
            await asyncio.sleep(1.0)
        return {
            "seconds": round(time.time() - now, 1),
            "due_tasks": due,
            "verify_passes": passes,
            "deadline_reached": bool(remaining),
            "deadline": deadline,
        }

    # ------------------------------------------------------------------ flood

    async def _flood(
        self, stubs: list[pb_grpc.TaskServiceStub], metadata: Any, groups: GroupPlan, payload: bytes, gate: str
    ) -> None:
        """``groups.flood`` immediate tasks for g0, ``FLOOD_CONCURRENCY`` in flight,
        each sent again while the service refuses it (RESOURCE_EXHAUSTED): a
        backlog of one group that exists before the other groups' tasks
        arrive. They are accepted tasks like any other (read back and checked
        after the drain); the ones that failed are counted in ``burst``.
        With a ``gate`` (its name, or ""), every one names it."""
        o = self.o
        n = groups.flood
        self.burst = BurstStats(requested=n)
        errors: Counter[str] = Counter()
        key = groups.key(0)
        bar = tqdm(total=n, unit="task", desc="flood", disable=not o.progress, file=sys.stderr)
        began = time.time()

        async def one(i: int) -> None:
            spec = pb.TaskSpec(namespace=NAMESPACE, type=TASK_TYPE, payload=payload, concurrency_key=key, gate=gate)
            sent_wall = time.time()
            reply = await stubs[i % len(stubs)].ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=o.timeout_s,
                                                            metadata=metadata)  # fmt: skip
            self.answered[reply.task_id] = time.time()
            run_at = reply.run_at.ToMilliseconds()
            self.tasks[reply.task_id] = (sent_wall, run_at, True)
            self.accepted.append(reply.task_id)
            self.grouped[reply.task_id] = GroupedTask(reply.task_id, 0, run_at, flood=True)
            if gate:
                self.gated.append(reply.task_id)
            self.burst.accepted += 1
            bar.update(1)

        async def call(i: int) -> None:
            # Only a refusal is tried again: after a deadline the task may exist, and a second send would be
            # another task (the flood sends no idempotency key, which would cost two more LWTs per task).
            for attempt in range(FLOOD_TRIES):
                try:
                    await one(i)
                    return
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == FLOOD_TRIES - 1:
                        errors[err.code().name] += 1
                        return
                    await asyncio.sleep(min(2.0, 0.05 * 2**attempt))

        sem = asyncio.Semaphore(FLOOD_CONCURRENCY)

        async def bounded(i: int) -> None:
            async with sem:
                await call(i)

        try:
            await asyncio.gather(*(bounded(i) for i in range(n)))
        finally:
            bar.close()
        self.burst.seconds = time.time() - began
        self.burst.failed = sum(errors.values())
        self.burst.errors = dict(errors)
        _say(f"flood: {self.burst.accepted} of {n} tasks for {key} accepted in {self.burst.seconds:.1f} s"
             + (f", {self.burst.failed} failed {dict(errors)}" if errors else ""))  # fmt: skip

    # ------------------------------------------------------------------ schedules

    def _schedule_plan(self) -> SchedulePlan:
        """Slots from a whole second far enough ahead for the creation to end
        first (a schedule created after its first slot would fire it late, as
        a catch-up), to the end of the load window."""
        o = self.o
        allowance_s = 3.0 + o.schedules / 200.0
        start_ms = int(math.ceil(time.time() + allowance_s)) * 1000
        return SchedulePlan(
            count=o.schedules, every_ms=int(round(o.schedule_every_s * 1000)), start_ms=start_ms,
            end_ms=start_ms + int(round(o.duration_s * 1000)) - 1, jitter_ms=int(round(o.schedule_jitter_s * 1000)),
            overlap=Overlap(o.schedule_overlap),
        )  # fmt: skip

    async def _create_schedules(self, stubs: list[pb_grpc.ScheduleServiceStub], metadata: Any, plan: SchedulePlan) -> None:
        payload = make_payload(self.o.schedule_handler_ms, self.o.payload_bytes)
        began = time.time()
        _say(f"schedules: creating {plan.count} (every {plan.every_ms / 1000:g} s, overlap {plan.overlap.value})")

        async def create(i: int) -> None:
            request = pb.CreateScheduleRequest(schedule=plan.to_pb(i, NAMESPACE, TASK_TYPE, payload))
            await stubs[i % len(stubs)].CreateSchedule(request, timeout=self.o.timeout_s, metadata=metadata)

        self.schedule_create_failed = await _bounded(SCHEDULE_CONCURRENCY, plan.count, create)
        self.schedule_created_at = time.time()
        self.schedule_create_s = self.schedule_created_at - began
        late = time.time() - plan.start_ms / 1000.0
        _say(f"schedules: created in {self.schedule_create_s:.1f} s" + (f", {late:.1f} s after their first slot" if late > 0 else ""))

    async def _finish_schedules(
        self, stubs: list[pb_grpc.TaskServiceStub], schedule_stubs: list[pb_grpc.ScheduleServiceStub], metadata: Any,
        deadline: float,
    ) -> dict[str, Any]:
        """Read the schedules' tasks back (ListTasks of the namespace, again
        until every expected slot has a finished task or the drain's deadline),
        then their counters (DescribeSchedule), then delete them."""
        assert self.plan is not None
        expected = sum(len(s) for s in self.plan.expected().values())
        began, passes = time.time(), 0
        terminal_ok = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
        while True:
            passes += 1
            self.schedule_tasks = await self._list_slot_tasks(stubs[0], metadata)
            done = sum(1 for t in self.schedule_tasks if t.status in terminal_ok)
            if (len(self.schedule_tasks) >= expected and done == len(self.schedule_tasks)) or time.time() >= deadline:
                break
            await asyncio.sleep(2.0)
        ids = [self.plan.schedule_id(i) for i in range(self.plan.count)]
        described: list[pb.ScheduleDescription | None] = [None] * len(ids)

        async def describe(i: int) -> None:
            ref = pb.ScheduleRef(namespace=NAMESPACE, schedule_id=ids[i])
            reply = await schedule_stubs[i % len(schedule_stubs)].DescribeSchedule(
                pb.DescribeScheduleRequest(ref=ref), timeout=self.o.timeout_s, metadata=metadata)  # fmt: skip
            described[i] = reply.schedule

        async def delete(i: int) -> None:
            ref = pb.ScheduleRef(namespace=NAMESPACE, schedule_id=ids[i])
            await schedule_stubs[i % len(schedule_stubs)].DeleteSchedule(
                pb.DeleteScheduleRequest(ref=ref), timeout=self.o.timeout_s, metadata=metadata)  # fmt: skip

        failures = await _bounded(SCHEDULE_CONCURRENCY, len(ids), describe)
        found = [d for d in described if d is not None]
        self.schedule_counters = Counters(
            described=len(found), fired_total=sum(d.fired_total for d in found),
            skipped_total=sum(d.skipped_total for d in found), errors=failures,
        )  # fmt: skip
        not_deleted = await _bounded(SCHEDULE_CONCURRENCY, len(ids), delete)
        return {"seconds": round(time.time() - began, 1), "list_passes": passes, "not_deleted": not_deleted}

    async def _list_slot_tasks(self, stub: pb_grpc.TaskServiceStub, metadata: Any) -> list[SlotTask]:
        """Every task of the namespace that a schedule created, all pages."""
        found: list[SlotTask] = []
        token = ""
        while True:
            request = pb.ListTasksRequest(namespace=NAMESPACE, page_size=LIST_PAGE_SIZE, page_token=token)
            reply = await _retried(lambda: stub.ListTasks(request, timeout=self.o.timeout_s, metadata=metadata))
            for view in reply.tasks:
                task = SlotTask.from_view(view)
                if task is not None:
                    found.append(task)
            token = reply.next_page_token
            if not token:
                return found

    async def _read_all(self, stubs: list[pb_grpc.TaskServiceStub], metadata: Any, ids: list[str]) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.o.verify_concurrency)
        out: dict[str, Any] = {}

        @backoff.on_exception(backoff.expo, grpc.aio.AioRpcError, max_tries=5, factor=0.2, logger=None,
                              giveup=_not_found)  # fmt: skip
        async def poll(i: int, task_id: str) -> Any:
            return (await stubs[i % len(stubs)].PollTask(
                pb.PollTaskRequest(task_id=task_id), timeout=self.o.timeout_s, metadata=metadata)).task  # fmt: skip

        async def one(i: int, task_id: str) -> None:
            async with sem:
                try:
                    out[task_id] = await poll(i, task_id)
                except grpc.aio.AioRpcError as err:
                    out[task_id] = err.code().name  # NOT_FOUND is a lost task; others were retried

        await asyncio.gather(*(one(i, t) for i, t in enumerate(ids)))
        return out

    def _read_ledger(self) -> ledger_mod.LedgerSummary | None:
        if self.ledger_path is None:
            return None
        return ledger_mod.summarize(ledger_mod.read(self.ledger_path))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _code_name(number: int) -> str:
    """A status code's name from its number (a ScheduleTasks task's error)."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == number), f"CODE_{number}")


def options_dict(opts: LoadOptions) -> dict[str, Any]:
    return asdict(opts)


__all__ = ["LoadOptions", "LoadTest", "TERMINAL", "Counter"]


async def _bounded(limit: int, n: int, call: Callable[[int], Awaitable[None]]) -> int:
    """``call(i)`` for i in 0..n-1, at most ``limit`` at a time, each retried
    on transient errors; the number that failed (the first few are said)."""
    sem = asyncio.Semaphore(limit)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            try:
                await _retried(lambda: call(i))
            except grpc.aio.AioRpcError as err:
                failed += 1
                if failed <= 5:
                    _say(f"schedules: {err.code().name}: {err.details()}")

    await asyncio.gather(*(one(i) for i in range(n)))
    return failed


T = TypeVar("T")


async def _retried(call: Callable[[], Awaitable[T]]) -> T:
    """A schedule or list RPC, retried on transient errors (the harness's own
    reads must not turn an overloaded moment into "missed" slots)."""

    @backoff.on_exception(backoff.expo, grpc.aio.AioRpcError, max_tries=5, factor=0.2, logger=None,
                          giveup=lambda e: not _transient(e))  # fmt: skip
    async def attempt() -> T:
        return await call()

    return await attempt()


def _transient(err: Exception) -> bool:
    return isinstance(err, grpc.RpcError) and err.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    )  # fmt: skip


def _not_found(err: Exception) -> bool:
    """A PollTask that says NOT_FOUND is final (a lost task), not retried."""
    return isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.NOT_FOUND
