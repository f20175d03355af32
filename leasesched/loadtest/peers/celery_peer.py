"""The Celery + Redis peer: its own redis-server and Celery worker, four measurements, ``peer.json``.

What it runs (every process its own, on ports of its own, stopped however the
run ends):

* Debian's ``redis-server`` on a free port, no persistence (``--save ''
  --appendonly no``), its files in the run's folder;
* ``celery -A leasesched.loadtest.peers.worker_app worker --pool prefork
  --concurrency N`` (acks_late, prefetch multiplier 4: Celery's default);
* this process as the one client (``send_task`` through one producer).

What it measures, one phase after another (``PeerOptions`` bounds each):

(a) drain: ``tasks`` no-op tasks enqueued as fast as the client can to a
    queue the worker does not consume yet, then the worker told to consume it
    (``add_consumer``): enqueue/s, and executed/s from the first START to the
    last END of a full queue, not bounded by the client; CPU per task of both
    (enqueue + execute + Redis);
(c) open loop, one phase per rate: immediate no-op tasks due at ``rate`` per
    second for ``rate_seconds``, each sent at its due time whatever happened to
    the earlier ones; apply→start latency = first START − due time (the
    measure of leasesched's "immediate schedule → start"), CPU per task;
(d) the overlap check: a second worker on another Redis database whose
    transport has a short visibility timeout, and tasks whose handler runs
    longer than it: Celery redelivers each still-running task to a free pool
    process, and the ledger checker counts the executions that ran at once.

CPU per task: CPU seconds of the worker (main process and pool children),
of redis-server and of this client over the phase (``cpu.CpuMeter``) ÷ the
executions that ended in it.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from leasesched.infra.process import ManagedProcess, accepts_connections
from leasesched.loadtest import ledger as ledger_mod
from leasesched.loadtest.bench_tasks import LEDGER_ENV
from leasesched.loadtest.cpu import CpuMeter
from leasesched.loadtest.peers.results import (
    CpuUse,
    DrainResult,
    Latency,
    OverlapCheck,
    PeerResult,
    RateResult,
    count_overlaps,
    overlap_check,
)
from leasesched.testing import free_port

WORKER_APP = "leasesched.loadtest.peers.worker_app"
DRAIN_QUEUE = "peer-drain"  # (a)'s queue: filled first, consumed only once full
REDIS_SERVER = "/usr/bin/redis-server"
POLL_S = 0.2  # how often the harness looks at the ledger while it waits


class PeerError(RuntimeError):
    """A process of the peer did not start or died; the message has its log."""


@dataclass
class PeerOptions:
    tasks: int = 20_000  # (a): the queue drained
    drain_timeout_s: float = 90.0  # (a) and each (c): the longest wait for the last END
    rates: list[float] = field(default_factory=lambda: [100.0, 500.0])  # (c): one phase each
    rate_seconds: float = 30.0
    concurrency: int = 2  # prefork pool processes
    overlap_tasks: int = 2  # (d); 0: no overlap check
    overlap_handler_s: float = 5.0  # longer than the visibility timeout plus the restore interval
    visibility_s: float = 2.0
    results_dir: str = "results"
    label: str = "peer-celery"
    redis_server: str = REDIS_SERVER


# The overlap check's worker looks for messages past their visibility timeout every second (kombu's default:
# about every 100 s, see ``celery_app.make_app``).
RESTORE_INTERVAL_S = 1


class CeleryPeer:
    """One run of the peer (``run``); its processes live only inside it."""

    def __init__(self, opts: PeerOptions) -> None:
        self.o = opts
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{opts.label}-{uuid.uuid4().hex[:8]}"
        self.folder = Path(opts.results_dir).resolve() / name
        self.ledger = self.folder / "ledger.jsonl"
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ processes

    def _managed(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        return ManagedProcess(name=name, pid_file=self.folder / "pids" / f"{name}.pid",
                              log_file=self.folder / "logs" / f"{name}.log", argv=argv, env=env or {},
                              cwd=self.folder)  # fmt: skip

    @contextmanager
    def _redis(self) -> Iterator[tuple[ManagedProcess, int]]:
        """redis-server on a free port, without persistence, until the block is left."""
        if not Path(self.o.redis_server).exists():
            raise PeerError(f"{self.o.redis_server} not found: apt-get install redis-server (make bench-peers does)")
        data = self.folder / "redis"
        data.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = self._managed("redis", [self.o.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(data), "--daemonize", "no",
                                       "--logfile", ""])  # fmt: skip
        proc.start()
        try:
            deadline = time.monotonic() + 15
            while not accepts_connections("127.0.0.1", port):
                if not proc.is_running() or time.monotonic() > deadline:
                    raise PeerError(f"redis-server did not listen on {port}:\n{proc.log_tail()}")
                time.sleep(0.05)
            yield proc, port
        finally:
            proc.stop(10)

    @contextmanager
    def _worker(self, name: str, broker: str, visibility_s: float, concurrency: int,
                restore_s: int | None = None) -> Iterator[ManagedProcess]:  # fmt: skip
        """A Celery worker until the block is left (SIGTERM: a warm shutdown, SIGKILL after 15 s)."""
        from leasesched.loadtest.peers.celery_app import BROKER_ENV, RESTORE_ENV, VISIBILITY_ENV

        celery = str(Path(sys.executable).with_name("celery"))
        argv = [celery, "-A", WORKER_APP, "worker", "--pool", "prefork", "--concurrency", str(concurrency),
                "--loglevel", "WARNING", "--hostname", f"{name}@%h"]  # fmt: skip
        env = {BROKER_ENV: broker, VISIBILITY_ENV: f"{visibility_s:g}", LEDGER_ENV: str(self.ledger), "PYTHONUNBUFFERED": "1"}
        if restore_s is not None:
            env[RESTORE_ENV] = str(restore_s)
        proc = self._managed(name, argv, env)
        proc.start()
        try:
            yield proc
        finally:
            self._stop_worker(proc)

    def _stop_worker(self, proc: ManagedProcess) -> None:
        """Stop it; an execution it leaves without END ends when it was seen gone (the ledger's exit line)."""
        pids = _tree(proc.pid())
        proc.stop(15)
        now = time.time()
        for pid in pids:
            ledger_mod.append_record(self.ledger, ledger_mod.exit_record(pid, now))

    def _cpu_pids(self, redis: ManagedProcess, worker: ManagedProcess) -> dict[str, int]:
        """The processes whose CPU counts (the client is added by ``CpuMeter``): Redis, the worker and its pool."""
        pids = {"redis": redis.pid() or 0}
        for i, pid in enumerate(_tree(worker.pid())):
            pids["celery-worker" if i == 0 else f"celery-pool-{i}"] = pid
        return pids

    # ------------------------------------------------------------------ waiting

    def _wait_ends(self, tail: ledger_mod.LedgerTail, count: int, timeout_s: float, worker: ManagedProcess) -> bool:
        """Until ``count`` ENDs are in the ledger (True) or the timeout passed (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            tail.poll()
            if tail.ends >= count:
                return True
            if not worker.is_running():
                raise PeerError(f"the Celery worker exited:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)

    def _warm_up(self, app: Any, tail: ledger_mod.LedgerTail, worker: ManagedProcess, n: int = 20) -> None:
        """A few tasks before any clock starts: the worker is up, its pool forked, connections open."""
        from leasesched.loadtest.peers.celery_app import TASK_NAME

        tail.poll()
        want = tail.ends + n
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                app.send_task(TASK_NAME, kwargs={"ms": 0.0}, producer=producer)
        if not self._wait_ends(tail, want, 90, worker):
            raise PeerError(f"the Celery worker ran no task within 90 s:\n{worker.log_tail()}")
        time.sleep(1.0)  # the pool's processes settle

    # ------------------------------------------------------------------ run

    def run(self) -> PeerResult:
        from celery import __version__ as celery_version
        from kombu import __version__ as kombu_version

        from leasesched.loadtest.peers.celery_app import make_app

        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        o = self.o
        versions = {"celery": str(celery_version), "kombu": str(kombu_version), "redis": _redis_version(o.redis_server)}
        _say(f"peer: Celery {celery_version} + Redis {versions['redis']}, results in {self.folder}")
        drain: DrainResult | None = None
        rates: list[RateResult] = []
        check: OverlapCheck | None = None
        with self._redis() as (redis, port):
            broker = f"redis://127.0.0.1:{port}/0"
            app = make_app(broker)
            tail = ledger_mod.LedgerTail(self.ledger)
            with self._worker("celery-worker", broker, 3600.0, o.concurrency) as worker:
                self._warm_up(app, tail, worker)
                if o.tasks > 0:
                    drain = self._drain(app, tail, redis, worker)
                for rate in o.rates:
                    rates.append(self._open_loop(app, tail, redis, worker, rate))
            app.close()
            if o.overlap_tasks > 0:
                check = self._overlap_check(f"redis://127.0.0.1:{port}/1")
        return PeerResult(system="Celery + Redis", versions=versions, started_at=started, folder=str(self.folder),
                          concurrency=o.concurrency, drain=drain, rates=rates, overlap_check=check,
                          warnings=self.warnings)  # fmt: skip

    def _phase_ledger(self, ids: set[str]) -> tuple[ledger_mod.LedgerSummary, list[dict[str, Any]]]:
        records = [r for r in ledger_mod.read(self.ledger) if r.get("event") == "exit" or r.get("task_id") in ids]
        return count_overlaps(records), records

    def _cpu_use(self, cpu: dict[str, Any], executed: int) -> CpuUse:
        per = cpu["per_process"]

        def of(prefix: str) -> float:
            return round(sum(v["cpu_s"] for k, v in per.items() if v and k.startswith(prefix)), 3)

        return CpuUse(window_s=cpu["window_s"], executed=executed, worker_cpu_s=of("celery"), redis_cpu_s=of("redis"),
                      client_cpu_s=of("loadtest-client"), machine_busy_fraction=cpu["machine_busy_fraction"],
                      others_cpu_s=cpu["others_cpu_s"])  # fmt: skip

    def _drain(self, app: Any, tail: ledger_mod.LedgerTail, redis: ManagedProcess, worker: ManagedProcess) -> DrainResult:
        """(a) ``tasks`` tasks as fast as one producer sends them, then the worker drains the full queue."""
        from leasesched.loadtest.peers.celery_app import TASK_NAME

        o = self.o
        ids = [uuid.uuid4().hex for _ in range(o.tasks)]
        tail.poll()
        want = tail.ends + len(ids)
        _say(f"peer (a): enqueueing {len(ids)} no-op tasks as fast as one client can, then the worker drains them")
        meter = CpuMeter(self._cpu_pids(redis, worker))
        meter.start(time.monotonic())
        began = time.time()
        with app.producer_or_acquire() as producer:
            for task_id in ids:
                app.send_task(TASK_NAME, kwargs={"ms": 0.0}, task_id=task_id, producer=producer, queue=DRAIN_QUEUE)
        enqueue_s = time.time() - began
        replies = app.control.add_consumer(DRAIN_QUEUE, reply=True, timeout=10)
        if not replies:
            raise PeerError(f"the Celery worker did not answer add_consumer({DRAIN_QUEUE}):\n{worker.log_tail()}")
        if not self._wait_ends(tail, want, o.drain_timeout_s + enqueue_s, worker):
            self.warnings.append(f"(a) not every task had finished {o.drain_timeout_s:g} s after the enqueue")
        cpu = meter.stop(time.monotonic())
        summary, _ = self._phase_ledger(set(ids))
        starts = [s for s in summary.first_start.values()]
        ends = summary.ends
        execute_s = (max(ends) - min(starts)) if starts and ends else 0.0
        executed = len(ends)
        result = DrainResult(
            tasks=len(ids), enqueue_s=round(enqueue_s, 3), enqueue_per_s=round(len(ids) / max(enqueue_s, 1e-9), 1),
            executed=executed, execute_s=round(execute_s, 3),
            executed_per_s=round(executed / execute_s, 1) if execute_s > 0 else 0.0,
            lost=len(ids) - len({t for t, runs in summary.by_task.items() if any(r.ended == "end" for r in runs)}),
            overlaps=len(summary.overlaps), cpu=self._cpu_use(cpu, executed),
        )  # fmt: skip
        _say(f"peer (a): enqueue {result.enqueue_per_s:.0f}/s, executed {result.executed_per_s:.0f}/s, "
             f"CPU {result.cpu.server_ms_per_task} ms/task server side")  # fmt: skip
        return result

    def _open_loop(self, app: Any, tail: ledger_mod.LedgerTail, redis: ManagedProcess, worker: ManagedProcess,
                   rate: float) -> RateResult:  # fmt: skip
        """(c) Immediate tasks due at ``rate`` per second for ``rate_seconds``; each leaves at its due time.

        One thread sends: a send that returns late delays the next ones, and
        that shows as send lag (the offered load's honesty), not hidden."""
        from leasesched.loadtest.peers.celery_app import TASK_NAME

        o = self.o
        n = int(rate * o.rate_seconds)
        tail.poll()
        want = tail.ends + n
        _say(f"peer (c): {rate:g} tasks/s for {o.rate_seconds:g} s, open loop")
        due: dict[str, float] = {}
        lag_ms: list[float] = []
        meter = CpuMeter(self._cpu_pids(redis, worker))
        meter.start(time.monotonic())
        t0 = time.time() + 0.2
        with app.producer_or_acquire() as producer:
            for i in range(n):
                intended = t0 + i / rate
                now = time.time()
                if intended > now:
                    time.sleep(intended - now)
                task_id = uuid.uuid4().hex
                due[task_id] = intended
                lag_ms.append((time.time() - intended) * 1000.0)
                app.send_task(TASK_NAME, kwargs={"ms": 0.0}, task_id=task_id, producer=producer)
        if not self._wait_ends(tail, want, o.drain_timeout_s, worker):
            self.warnings.append(f"({rate:g}/s) not every task had finished {o.drain_timeout_s:g} s after the last send")
        cpu = meter.stop(time.monotonic())
        summary, _ = self._phase_ledger(set(due))
        window_end = t0 + o.rate_seconds
        in_window = sum(1 for t in summary.ends if t0 <= t < window_end)
        finished = {t for t, runs in summary.by_task.items() if any(r.ended == "end" for r in runs)}
        result = RateResult(
            rate=rate, seconds=o.rate_seconds, sent=n, executed=len(summary.ends),
            executed_per_s=round(in_window / o.rate_seconds, 1), send_lag=Latency.of(lag_ms),
            start_latency=Latency.of((summary.first_start[t] - due[t]) * 1000.0 for t in summary.first_start),
            lost=n - len(finished), overlaps=len(summary.overlaps), cpu=self._cpu_use(cpu, len(summary.ends)),
        )  # fmt: skip
        _say(f"peer (c): {rate:g}/s: executed {result.executed_per_s}/s, start p50 {result.start_latency.p50_ms} ms "
             f"p99 {result.start_latency.p99_ms} ms, CPU {result.cpu.server_ms_per_task} ms/task server side")  # fmt: skip
        return result

    def _overlap_check(self, broker: str) -> OverlapCheck:
        """(d) Tasks longer than the visibility timeout, on a worker with a free pool process for each copy.

        Another Redis database, so the short timeout cannot touch the other
        phases' messages. The worker is stopped (a warm shutdown: what runs
        may finish) once handler + visibility timeout + 3 restore intervals
        have passed since the tasks were sent: each task's first execution has
        ended by then, and a copy handed on while it ran has started."""
        from leasesched.loadtest.peers.celery_app import TASK_NAME, make_app

        o = self.o
        concurrency = max(2, 2 * o.overlap_tasks)  # a free process for each task's second copy
        app = make_app(broker, o.visibility_s, RESTORE_INTERVAL_S)
        ids = [uuid.uuid4().hex for _ in range(o.overlap_tasks)]
        tail = ledger_mod.LedgerTail(self.ledger)
        _say(f"peer (d): {len(ids)} tasks of {o.overlap_handler_s:g} s, visibility timeout {o.visibility_s:g} s, "
             f"acks_late, prefork {concurrency}")  # fmt: skip
        with self._worker("celery-overlap", broker, o.visibility_s, concurrency, RESTORE_INTERVAL_S) as worker:
            self._warm_up(app, tail, worker, n=concurrency)
            sent = time.time()
            with app.producer_or_acquire() as producer:
                for task_id in ids:
                    app.send_task(TASK_NAME, kwargs={"ms": o.overlap_handler_s * 1000.0}, task_id=task_id, producer=producer)
            until = sent + o.overlap_handler_s + o.visibility_s + 3 * RESTORE_INTERVAL_S
            while time.time() < until:
                time.sleep(0.5)
                if not worker.is_running():
                    raise PeerError(f"the Celery worker exited:\n{worker.log_tail()}")
        app.close()
        check = overlap_check(ledger_mod.read(self.ledger), ids, o.overlap_handler_s, o.visibility_s, concurrency)
        _say(f"peer (d): {check.executions} executions of {check.tasks} tasks, {check.overlaps} overlapping")
        return check


def _tree(pid: int | None) -> list[int]:
    """``pid`` and its descendants (a prefork worker and its pool)."""
    if pid is None:
        return []
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _redis_version(server: str) -> str:
    try:
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    word = next((w for w in out.split() if w.startswith("v=")), "v=?")
    return word[2:]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
