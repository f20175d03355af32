"""Run real leasesched processes as subprocesses, for integration and chaos tests.

A test starts the very command an operator runs (``<venv>/bin/leasesched
task-service --port P``), configured the way an operator configures it: the
test's ``Config`` exported as ``LEASESCHED_<FIELD>`` environment variables,
which ``Config.from_env`` reads back field for field. Every field is exported,
so a ``LEASESCHED_*`` variable in the developer's shell can never leak into a
test process.

The processes are ``leasesched.infra.process.ManagedProcess`` es: their own
session and process group (a signal reaches every thread and child), a PID
file with the kernel start time (a reused PID is never signalled), SIGTERM
with escalation to SIGKILL, SIGSTOP/SIGCONT for pauses. The PID files live in
one folder per test session (see ``stop_stale``), so processes left behind by
a session that was killed with SIGKILL are found and stopped by the next one.

Typical use (tests/integration/conftest.py wraps this in fixtures)::

    proc = start("task-service", cfg, log_dir=tmp)
    try:
        proc.wait_serving(30)
        ... grpc.insecure_channel(proc.target) ...
    finally:
        proc.terminate()
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leasesched.config import Config
from leasesched.transport import sync_channel
from leasesched.infra.process import ManagedProcess, tail

REPO = Path(__file__).resolve().parent.parent
# The console script of the interpreter running the tests (the project venv).
LEASESCHED_BIN = Path(sys.executable).with_name("leasesched")
# Roles started as ``leasesched <role> --port P``; anything else needs full argv.
GRPC_ROLES = ("task-service", "task-updater", "trigger")

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class ProcessError(RuntimeError):
    """A test process did not start, did not become ready, or died; the message has its log."""


def config_env(cfg: Config) -> dict[str, str]:
    """Every field of ``cfg`` as ``LEASESCHED_*`` variables (see ``Config.to_env``)."""
    return cfg.to_env()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the process binds it a little later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def session_dir() -> Path:
    """PID files and logs of the processes this test session starts.

    Not under the infra fixture's ``test-<pid>`` folder: that one is deleted
    when found stale, and the PID files must outlive it so the processes can
    be stopped (``stop_stale``).
    """
    return REPO / ".leasesched" / f"test-procs-{os.getpid()}"


@dataclass
class RunningProcess:
    """One leasesched process started by a test."""

    name: str
    argv: list[str]
    managed: ManagedProcess
    pid: int
    target: str | None = None  # host:port of its gRPC server, for the gRPC roles
    cfg: Config | None = None  # its configuration (TLS settings for health checks)

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
        return wait_serving(self.target, timeout, service=service, process=self, cfg=self.cfg)

    def terminate(self, timeout: float = 15.0) -> bool:
        """SIGTERM (a graceful stop), SIGKILL after ``timeout`` s; wait until it is gone.

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
    env_extra: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    port: int | None = None,
    argv: Sequence[str] | None = None,
    name: str | None = None,
) -> RunningProcess:
    """Start ``leasesched <role> --port <free port> *extra_args`` with ``cfg`` in its environment.

    ``role`` is one of ``GRPC_ROLES``; the process's gRPC address is then in
    ``.target``. For anything else (``worker``, a tool) pass the full
    ``argv`` after ``leasesched``: ``start("worker", cfg, argv=["worker",
    "--handlers", "..."])``; ``.target`` stays None unless ``port`` is given.
    Output goes to ``<log_dir>/<name>.log`` (default: this session's folder).
    The caller owns the process: stop it in a ``finally`` or a fixture finalizer.
    """
    if argv is None:
        if role not in GRPC_ROLES:
            raise ValueError(f"role {role!r} is not one of {GRPC_ROLES}: pass the full argv")
        port = free_port(cfg.bind_host) if port is None else port
        args = [role, "--port", str(port), *extra_args]
    else:
        args = [*argv, *extra_args]
    with _counter_lock:
        n = next(_counter)
    name = name or f"{role}-{n}"
    folder = session_dir()
    log_dir = Path(log_dir) if log_dir is not None else folder / "logs"
    env = {**config_env(cfg), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    full_argv = [str(LEASESCHED_BIN), *args]
    managed = ManagedProcess(
        name=name,
        pid_file=folder / "pids" / f"{name}.pid",
        log_file=log_dir / f"{name}.log",
        argv=full_argv,
        env=env,
        cwd=REPO,
    )
    pid = managed.start()
    target = f"{cfg.bind_host}:{port}" if port else None
    return RunningProcess(name=name, argv=full_argv, managed=managed, pid=pid, target=target, cfg=cfg)


def wait_serving(
    target: str,
    timeout: float = 30.0,
    service: str = "",
    process: RunningProcess | None = None,
    cfg: Config | None = None,
) -> float:
    """Poll the standard gRPC health check (grpc.health.v1) until ``service`` is SERVING.

    Returns the seconds waited. Raises ``ProcessError`` with the end of the
    process's log on timeout, and at once if ``process`` exits meanwhile
    (a bad flag or a taken port shows in its log within a second).
    """
    started = time.monotonic()
    deadline = started + timeout
    last = "no answer yet"
    # Health checks need no token; with TLS configured they go over TLS.
    with (sync_channel(target, cfg, token="") if cfg is not None else grpc.insecure_channel(target)) as channel:
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


def start_serving(role: str, cfg: Config, *extra_args: str, timeout: float = 60.0, **kwargs: object) -> RunningProcess:
    """``start`` a gRPC role and ``wait_serving``; stop it again if it never serves.

    The free port is chosen before the process binds it, so another program
    may take it in between; a start that failed only for that ("cannot bind")
    is retried on a new port.
    """
    for attempt in range(3):
        proc = start(role, cfg, *extra_args, **kwargs)  # type: ignore[arg-type]
        try:
            proc.wait_serving(timeout)
            return proc
        except BaseException as exc:
            proc.terminate(5)
            if attempt < 2 and isinstance(exc, ProcessError) and "cannot bind" in proc.log_tail(200):
                continue
            raise
    raise AssertionError("unreachable")


class ProcessGroup:
    """The processes one test (or fixture) started; ``stop_all`` ends every one.

    Used as a fixture so that a failing test cannot leave a process behind.
    """

    def __init__(self, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir
        self.processes: list[RunningProcess] = []

    def start(self, role: str, cfg: Config, *extra_args: str, **kwargs: object) -> RunningProcess:
        kwargs.setdefault("log_dir", self.log_dir)
        proc = start(role, cfg, *extra_args, **kwargs)  # type: ignore[arg-type]
        self.processes.append(proc)
        return proc

    def start_serving(self, role: str, cfg: Config, *extra_args: str, **kwargs: object) -> RunningProcess:
        kwargs.setdefault("log_dir", self.log_dir)
        proc = start_serving(role, cfg, *extra_args, **kwargs)
        self.processes.append(proc)
        return proc

    def stop_all(self, timeout: float = 15.0) -> None:
        errors = []
        for proc in reversed(self.processes):
            try:
                proc.terminate(timeout)
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                errors.append(f"{proc}: {exc}")
        self.processes.clear()
        if errors:
            raise ProcessError("could not stop: " + "; ".join(errors))


_SESSION_DIR_RE = re.compile(r"^test-procs-(\d+)$")


def stop_stale(keep_logs: bool = False) -> list[str]:
    """Stop processes left by test sessions that died without cleanup; delete their folders.

    Only processes whose PID file matches a live process with the recorded
    start time are signalled, so an unrelated process with a reused PID is safe.
    """
    stopped = []
    for folder in (REPO / ".leasesched").glob("test-procs-*"):
        match = _SESSION_DIR_RE.match(folder.name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        for pid_file in (folder / "pids").glob("*.pid"):
            managed = ManagedProcess(name=pid_file.stem, pid_file=pid_file, log_file=folder / "logs" / "stale.log")
            if managed.stop(timeout=10):
                stopped.append(pid_file.stem)
        if not keep_logs:
            shutil.rmtree(folder, ignore_errors=True)
    return stopped


def remove_session_dir() -> None:
    shutil.rmtree(session_dir(), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """The pid names a process that has not exited (a zombie has)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


__all__ = [
    "GRPC_ROLES",
    "ProcessError",
    "ProcessGroup",
    "RunningProcess",
    "config_env",
    "free_port",
    "start",
    "start_serving",
    "stop_stale",
    "wait_serving",
]
