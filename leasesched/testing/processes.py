"""Start real leasesched processes, wait until they serve, stop them: one way for everyone.

A process is started as the very command an operator runs (``<venv>/bin/leasesched
task-service --port P``), configured the way an operator configures it: the
caller's ``Config`` exported as ``LEASESCHED_<FIELD>`` variables
(``Config.to_env``), which ``Config.from_env`` reads back field for field.
Every field is exported, so a ``LEASESCHED_*`` variable in the caller's shell can
never leak into a process it starts.

The processes are ``leasesched.infra.process.ManagedProcess`` es: their own
session and process group (a signal reaches every thread and child), a PID file
with the kernel start time (a reused PID is never signalled), SIGTERM with
escalation to SIGKILL, SIGSTOP/SIGCONT for pauses. Each ``ProcessGroup`` keeps
its PID files in a folder of its own. When that folder lies in a *session
folder* (``session_dir``: named after the pid of the program that owns it), a
later run finds what a run killed with SIGKILL left behind and stops it
(``stop_stale``) — the test suite does this at every session start.

Typical use::

    group = ProcessGroup(folder)
    try:
        proc = group.start_serving("task-service", cfg)
        ... sync_channel(proc.target, cfg) ...
    finally:
        group.stop_all()
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leasesched.config import Config
from leasesched.infra.process import ManagedProcess, tail
from leasesched.transport import sync_channel

# The console script of the running interpreter's venv: the command an operator runs.
LEASESCHED_BIN = Path(sys.executable).with_name("leasesched")
# Roles started as ``leasesched <role> --port P``; a worker needs its handler module.
GRPC_ROLES = ("task-service", "task-updater", "trigger")
# Stopping order: workers first (they drain their tasks and give back their
# leases while the services still answer), the TaskService last.
STOP_ORDER = ("worker", "trigger", "task-updater", "task-service")


class ProcessError(RuntimeError):
    """A process did not start, did not become ready, or died; the message has its log."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago, outside the kernel's
    ephemeral range.

    Why not the kernel's choice (bind to port 0): that picks from the ephemeral
    range, the same pool every outgoing connection takes its local port from.
    Tests stop and restart servers on their ports (a Cassandra outage, chaos
    kills), and while a server is down any connection — the driver's own
    reconnect attempts to that very port included (a TCP self-connect) — may be
    handed its port, so the restart finds it taken (seen in CI: "CQL port
    already in use"). Ports below the range are never handed out that way.

    All sockets stay bound until every port is chosen, so no port is chosen
    twice; the small race with other programs between closing them and the
    servers binding them is why ``start_serving`` retries.
    """
    low, high = _listen_range()
    with ExitStack() as stack:
        chosen: list[int] = []
        for port in random.sample(range(low, high), min(high - low, 50 * count + 100)):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                s.bind((host, port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
        raise OSError(f"no {count} free ports in {low}..{high - 1} on {host}")


def _listen_range() -> tuple[int, int]:
    """Ports for test servers: from 15000 up to the start of the ephemeral range
    (Linux's default 32768), and never past it."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = 15000 if ephemeral_low > 20000 else 1024
    return low, max(ephemeral_low, low + 1000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the process binds it a little later)."""
    return free_ports(1, host)[0]


def _seconds(value: float) -> str:
    return f"{value:g}"


def server_args(role: str, port: int | None, *extra: str) -> list[str]:
    """The command line (after ``leasesched``) of a gRPC role; no ``--port`` when None (the config's)."""
    if role not in GRPC_ROLES:
        raise ValueError(f"role {role!r} is not one of {GRPC_ROLES}")
    return [role, *(["--port", str(port)] if port is not None else []), *extra]


def worker_args(module: str, slots: int, *extra: str, drain_timeout_s: float | None = None) -> list[str]:
    """The command line (after ``leasesched``) of a worker running the handlers of ``module``."""
    drain = ["--drain-timeout", _seconds(drain_timeout_s)] if drain_timeout_s is not None else []
    return ["worker", "--module", module, "--slots", str(slots), *drain, *extra]


@dataclass
class RunningProcess:
    """One leasesched process started through this harness."""

    name: str
    role: str
    argv: list[str]
    managed: ManagedProcess
    pid: int
    cfg: Config  # its configuration (the health check uses its TLS settings)
    target: str | None = None  # host:port of its gRPC server, for the gRPC roles

    @property
    def log_path(self) -> Path:
        return self.managed.log_file

    def is_running(self) -> bool:
        return self.managed.is_running()

    def is_paused(self) -> bool:
        return self.managed.is_paused()

    @property
    def exit_code(self) -> int | None:
        """Its exit status once it ended (``-N``: killed by signal N); None while it runs."""
        return self.managed.exit_code()

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def wait_serving(self, timeout: float = 30.0, service: str = "") -> float:
        """Block until the gRPC health check answers SERVING; see ``wait_serving``."""
        if self.target is None:
            raise ValueError(f"{self.name} has no gRPC target")
        return wait_serving(self.target, self.cfg, timeout, service=service, process=self)

    def terminate(self, timeout: float = 15.0) -> bool:
        """SIGTERM (a graceful stop), SIGKILL after ``timeout``; wait until it is gone.

        Returns False if it was not running any more. Works on a paused
        process too (SIGCONT follows the SIGTERM).
        """
        return self.managed.stop(timeout)

    def kill9(self) -> bool:
        """SIGKILL: a crash. Returns False if it was not running any more."""
        return self.managed.kill9()

    def pause(self) -> None:
        """SIGSTOP: it keeps its sockets and ZooKeeper session but answers nothing."""
        self.managed.pause()

    def resume(self) -> None:
        self.managed.resume()

    def __str__(self) -> str:
        where = f" on {self.target}" if self.target else ""
        return f"{self.name} (pid {self.pid}{where}, log {self.log_path})"


def start(
    role: str,
    cfg: Config,
    *extra_args: str,
    name: str,
    pid_dir: Path,
    log_dir: Path,
    env_extra: Mapping[str, str] | None = None,
    port: int | None = None,
    argv: Sequence[str] | None = None,
    cwd: Path | None = None,
) -> RunningProcess:
    """Start ``leasesched <role> --port <free port> *extra_args`` with ``cfg`` in its environment.

    ``role`` is one of ``GRPC_ROLES``; the process's gRPC address is then in
    ``.target``. For anything else (``worker``, a tool) pass the full ``argv``
    after ``leasesched`` (``worker_args`` builds a worker's); ``.target`` stays
    None unless ``port`` is given. The PID file is ``<pid_dir>/<name>.pid``,
    the output goes to ``<log_dir>/<name>.log``. The caller owns the process:
    ``ProcessGroup`` is the usual owner.
    """
    if argv is None:
        port = free_port(cfg.bind_host) if port is None else port
        args = [*server_args(role, port), *extra_args]
    else:
        args = [*argv, *extra_args]
    full_argv = [str(LEASESCHED_BIN), *args]
    managed = ManagedProcess(
        name=name,
        pid_file=pid_dir / f"{name}.pid",
        log_file=log_dir / f"{name}.log",
        argv=full_argv,
        env={**cfg.to_env(), "PYTHONUNBUFFERED": "1", **(env_extra or {})},
        cwd=cwd,
    )
    pid = managed.start()
    target = f"{cfg.bind_host}:{port}" if port else None
    return RunningProcess(name=name, role=role, argv=full_argv, managed=managed, pid=pid, cfg=cfg, target=target)


def wait_serving(
    target: str,
    cfg: Config,
    timeout: float = 30.0,
    service: str = "",
    process: RunningProcess | None = None,
) -> float:
    """Poll the standard gRPC health check (grpc.health.v1) until ``service`` is SERVING.

    Returns the seconds waited. Raises ``ProcessError`` on timeout (with the
    end of the process's log when ``process`` is given), and at once if
    ``process`` exits meanwhile: a bad flag or a taken port shows in its log
    within a second, and waiting the full timeout would only hide it.
    """
    started = time.monotonic()
    deadline = started + timeout
    last = "no answer yet"
    # Health checks need no token; with TLS configured they go over TLS.
    with sync_channel(target, cfg, token="") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and not process.is_running():
                raise ProcessError(f"{process} exited before serving.\n--- log tail:\n{process.log_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                where = f"\n--- log tail of {process}:\n{process.log_tail()}" if process is not None else ""
                raise ProcessError(f"{target} not SERVING within {timeout:.0f} s (last: {last}){where}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(2.0, remaining))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.1)


class ProcessGroup:
    """The processes one owner (a test, a cluster, a load test) started; ``stop_all`` ends every one.

    PID files go to ``<folder>/pids``, logs to ``log_dir`` (default
    ``<folder>/logs``). Names are unique within the group: ``trigger-1``,
    ``worker-2``; the first TaskService is ``task-service``, a second
    ``task-service-2``.
    """

    def __init__(self, folder: Path, log_dir: Path | None = None, cwd: Path | None = None) -> None:
        self.folder = Path(folder)
        self.log_dir = Path(log_dir) if log_dir is not None else self.folder / "logs"
        self.cwd = cwd
        self.processes: list[RunningProcess] = []

    def name_for(self, role: str) -> str:
        n = sum(1 for p in self.processes if p.role == role) + 1
        return f"{role}-{n}" if n > 1 or role in ("trigger", "worker") else role

    def start(
        self,
        role: str,
        cfg: Config,
        *extra_args: str,
        env_extra: Mapping[str, str] | None = None,
        port: int | None = None,
        argv: Sequence[str] | None = None,
        name: str | None = None,
    ) -> RunningProcess:
        """``start`` (same arguments) a process that this group owns from now on."""
        proc = start(role, cfg, *extra_args, name=name or self.name_for(role), pid_dir=self.folder / "pids",
                     log_dir=self.log_dir, env_extra=env_extra, port=port, argv=argv, cwd=self.cwd)  # fmt: skip
        self.processes.append(proc)
        return proc

    def start_serving(
        self,
        role: str,
        cfg: Config,
        *extra_args: str,
        timeout: float = 60.0,
        env_extra: Mapping[str, str] | None = None,
        port: int | None = None,
        name: str | None = None,
    ) -> RunningProcess:
        """``start`` a gRPC role and ``wait_serving``; stop it again if it never serves.

        The free port is chosen before the process binds it, so another program
        may take it in between; a start that failed only for that ("cannot
        bind") is retried on a new port.
        """
        for attempt in range(3):
            proc = self.start(role, cfg, *extra_args, env_extra=env_extra, port=port, name=name)
            try:
                proc.wait_serving(timeout)
                return proc
            except BaseException as exc:
                proc.terminate(5)
                self.processes.remove(proc)  # a retry reuses its name
                if attempt < 2 and isinstance(exc, ProcessError) and "cannot bind" in proc.log_tail(200):
                    continue
                raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Stop every process of the group, workers first (``STOP_ORDER``), the
        newest first within a role; return what went wrong (empty: all stopped)."""

        def order(item: tuple[int, RunningProcess]) -> tuple[int, int]:
            index, proc = item
            rank = STOP_ORDER.index(proc.role) if proc.role in STOP_ORDER else -1  # tools before workers
            return rank, -index

        problems = []
        for _, proc in sorted(enumerate(self.processes), key=order):
            try:
                proc.terminate(timeout)
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                problems.append(f"{proc}: {exc}")
        self.processes.clear()
        return problems

    def stop_all(self, timeout: float = 15.0) -> None:
        """``stop``, raising ``ProcessError`` if a process could not be stopped."""
        problems = self.stop(timeout)
        if problems:
            raise ProcessError("could not stop: " + "; ".join(problems))

    def pids(self) -> dict[str, int]:
        """name → pid of every process of the group that still runs."""
        return {p.name: p.pid for p in self.processes if p.is_running()}


# ------------------------------------------------------------ session folders


def session_dir(state_dir: Path, prefix: str) -> Path:
    """``<state_dir>/<prefix><pid of this program>``: the folder for the PID files
    and logs of what this program starts, found again by ``stop_stale`` if it dies."""
    return Path(state_dir) / f"{prefix}{os.getpid()}"


def stop_stale(state_dir: Path, prefix: str, keep_logs: bool = False) -> list[str]:
    """Stop processes left by programs that died without cleanup; delete their folders.

    Looks at every ``<state_dir>/<prefix><pid>`` whose pid is not alive any
    more, and at every PID file below it. Only processes whose PID file
    matches a live process with the recorded start time are signalled, so an
    unrelated process with a reused PID is safe.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    stopped = []
    for folder in Path(state_dir).glob(f"{prefix}*"):
        match = pattern.match(folder.name)
        if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        for pid_file in folder.rglob("*.pid"):
            managed = ManagedProcess(name=pid_file.stem, pid_file=pid_file, log_file=folder / "stale.log")
            if managed.stop(timeout=10):
                stopped.append(pid_file.stem)
        if not keep_logs:
            shutil.rmtree(folder, ignore_errors=True)
    return stopped


def pid_alive(pid: int) -> bool:
    """The pid names a process that has not exited (a zombie has)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
