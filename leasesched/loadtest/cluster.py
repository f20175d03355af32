"""A complete local leasesched cluster of real processes for one load test.

TaskService, TaskUpdater, N triggers and M workers running
``worker.bench_handlers``, each the very command an operator
runs (``<venv>/bin/leasesched <role> --port P``), configured the way an
operator configures it: the run's ``Config`` exported field by field as
``LEASESCHED_<FIELD>``. Every process is a ``ManagedProcess`` (own process
group, PID file with start time, SIGTERM then SIGKILL), with its log in the
results folder. The run gets its own keyspace and ZooKeeper root, so runs never
see each other's tasks, shards or registrations.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leasesched.config import Config
from leasesched.infra.process import ManagedProcess, tail
from leasesched.loadtest.bench_tasks import BENCH_MODULE, LEDGER_ENV

LEASESCHED_BIN = Path(sys.executable).with_name("leasesched")


class ClusterError(RuntimeError):
    """A process did not start or did not become ready; the message has its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Member:
    role: str  # task-service | task-updater | trigger | worker
    name: str
    managed: ManagedProcess
    pid: int
    target: str | None = None

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.managed.log_file, lines)


@dataclass
class LocalCluster:
    cfg: Config
    folder: Path  # logs, PID files, the execution ledger
    triggers: int = 2
    workers: int = 2
    slots: int = 64
    worker_env: dict[str, str] = field(default_factory=dict)  # e.g. a worker token
    service_env: dict[str, str] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)

    @property
    def ledger(self) -> Path:
        return self.folder / "ledger.jsonl"

    @property
    def task_service(self) -> Member:
        return next(m for m in self.members if m.role == "task-service")

    def _start(self, role: str, args: list[str], env: dict[str, str], port: int | None = None) -> Member:
        n = sum(1 for m in self.members if m.role == role) + 1
        name = f"{role}-{n}" if role in ("trigger", "worker") else role
        managed = ManagedProcess(
            name=name,
            pid_file=self.folder / "pids" / f"{name}.pid",
            log_file=self.folder / "logs" / f"{name}.log",
            argv=[str(LEASESCHED_BIN), *args],
            env={**self.cfg.to_env(), "PYTHONUNBUFFERED": "1", **env},
        )
        pid = managed.start()
        member = Member(role, name, managed, pid, f"{self.cfg.bind_host}:{port}" if port else None)
        self.members.append(member)
        return member

    def start(self, timeout: float = 90.0) -> "LocalCluster":
        """Start every process and wait until they serve, own every shard, and workers registered."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ts_port, tu_port = free_port(), free_port()
        self.cfg = self.cfg.with_overrides(task_service_port=ts_port, task_updater_port=tu_port)
        grpc_members = [
            self._start("task-service", ["task-service", "--port", str(ts_port)], self.service_env, ts_port),
            self._start("task-updater", ["task-updater", "--port", str(tu_port)], self.service_env, tu_port),
        ]
        for _ in range(self.triggers):
            port = free_port()
            grpc_members.append(self._start("trigger", ["trigger", "--port", str(port)], self.service_env, port))
        for _ in range(self.workers):
            args = ["worker", "--module", BENCH_MODULE, "--slots", str(self.slots), "--drain-timeout", "10"]
            self._start("worker", args, {LEDGER_ENV: str(self.ledger), **self.worker_env})
        deadline = time.monotonic() + timeout
        for member in grpc_members:
            self._wait_serving(member, deadline)
        self._wait_shards_and_workers(deadline)
        return self

    def _wait_serving(self, member: Member, deadline: float) -> None:
        assert member.target
        last = "no answer"
        with grpc.insecure_channel(member.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not member.managed.is_running():
                    raise ClusterError(f"{member.name} exited before serving:\n{member.log_tail()}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"{member.name} not SERVING in time (last: {last}):\n{member.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    last = f"{err.code().name}: {err.details()}"
                time.sleep(0.2)

    def _wait_shards_and_workers(self, deadline: float) -> None:
        from leasesched.coordination import registry, zk

        client = zk.connect(self.cfg)
        try:
            while True:
                owners: dict[int, list[str]] = {}
                for address, data in registry.members(client, self.cfg.zk_root, "trigger").items():
                    for shard in data.get("shards", []):
                        owners.setdefault(int(shard), []).append(address)
                shards_ok = len(owners) == self.cfg.logical_shards and all(len(o) == 1 for o in owners.values())
                workers = registry.members(client, self.cfg.zk_root, "worker")
                if shards_ok and len(workers) >= self.workers:
                    break
                for m in self.members:
                    if not m.managed.is_running():
                        raise ClusterError(f"{m.name} exited:\n{m.log_tail()}")
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"cluster not ready in time: {len(owners)}/{self.cfg.logical_shards} shards owned, "
                        f"{len(workers)}/{self.workers} workers registered"
                    )
                time.sleep(0.3)
        finally:
            client.stop()
            client.close()
        time.sleep(1.5)  # the workers' trigger follower subscribes within a second of registering

    def pids(self) -> dict[str, int]:
        return {m.name: m.pid for m in self.members if m.managed.is_running()}

    def stop(self, timeout: float = 20.0) -> list[str]:
        """SIGTERM every process (workers first, so they drain), SIGKILL after ``timeout``."""
        problems = []
        order = sorted(self.members, key=lambda m: ("worker", "trigger", "task-updater", "task-service").index(m.role))
        for m in order:
            try:
                m.managed.stop(timeout)
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                problems.append(f"{m.name}: {exc}")
        return problems
