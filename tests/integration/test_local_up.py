"""``leasesched local up`` end to end: a worker that dies comes back, Ctrl-C stops everything.

Runs the real command against the test session's Cassandra and ZooKeeper
(``infra up`` finds them running and leaves them alone), on free ports,
without the demo. Under honcho, the first process to exit stopped the whole
system; the supervisor restarts it instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from leasesched.config import Config
from leasesched.testing import free_ports, pid_alive
from tests.cluster import wait_for
from tests.conftest import DIST_DIR

STARTED = re.compile(r"(\S+) started \(pid (\d+)\)")


class Output:
    """Collects a process's output in a thread, so waits can look at it."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            with self._lock:
                self._chunks.append(line.decode(errors="replace"))

    def text(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def pids(self, name: str) -> list[int]:
        return [int(pid) for n, pid in STARTED.findall(self.text()) if n == name]


def test_local_up_restarts_a_dead_worker_and_ctrl_c_stops_everything(module_config: Config) -> None:
    service_port, updater_port, trigger_port, dashboard_port = free_ports(4)
    cfg = module_config.with_overrides(
        task_service_port=service_port, task_updater_port=updater_port, trigger_port=trigger_port, dashboard_port=dashboard_port
    )
    # `local up` looks for the Cassandra download under <home>/dist; the session's is shared.
    dist = Path(cfg.home) / "dist"
    if not dist.exists():
        dist.symlink_to(DIST_DIR, target_is_directory=True)
    exe = Path(sys.executable).parent / "leasesched"
    proc = subprocess.Popen(
        [str(exe), "local", "up", "--no-demo", "--workers", "1", "--triggers", "1"],
        env={**os.environ, **cfg.to_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out = Output(proc)
    try:
        wait_for(lambda: len(out.pids("worker-1")) == 1 and out.pids("task-service") and out.pids("dashboard"), 120, "every program to start")
        assert f"dashboard: http://127.0.0.1:{cfg.dashboard_port}/" in out.text()
        worker, service = out.pids("worker-1")[0], out.pids("task-service")[0]
        os.kill(worker, signal.SIGKILL)  # a worker that dies (a fail-stop exits 75: the same path)
        wait_for(lambda: len(out.pids("worker-1")) == 2, 30, "the worker to be restarted")
        assert "worker-1 was killed by SIGKILL" in out.text()
        assert "restarting in 1 s" in out.text()
        assert proc.poll() is None and pid_alive(service)  # nothing else was stopped
        assert out.pids("task-service") == [service]

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
        assert proc.returncode == 0, out.text()[-3000:]
        every = [int(pid) for _, pid in STARTED.findall(out.text())]
        for pid in every:
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to be gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # On a failure, what it started runs on in sessions of its own: end it here.
        for _, pid in STARTED.findall(out.text()):
            _kill_group(int(pid))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
