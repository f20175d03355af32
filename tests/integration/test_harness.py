"""The cluster harness (``leasesched.testing``) releases what it started when a start fails.

A cluster whose start fails half-way must not leave the processes it already
started running: on a developer's machine they would hold ports and
ZooKeeper registrations (and a load test's CPU figures) until someone finds
them. Two ways a start fails for real: a worker that cannot import its
handler module (it exits; the readiness wait sees it and says so) and a
trigger given a flag it does not know (it never serves). Also: ``stop_stale``
stops what a killed session left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from leasesched.config import Config
from leasesched.infra.process import ManagedProcess
from leasesched.testing import Cluster, ProcessError, RunningProcess, pid_alive, stop_stale
from tests.cluster import cluster_config, wait_for
from tests.processes import SessionGroup


class RecordingGroup(SessionGroup):
    """Remembers every process it ever started (``stop`` forgets them); a
    context manager that stops them in the end even if the harness did not
    (PID files in the session folder, so a killed session's are found too)."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.started: list[RunningProcess] = []

    def __enter__(self) -> "RecordingGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.started:
            proc.terminate(5)

    def start(self, role: str, cfg: Config, *extra_args: str, **kwargs: object) -> RunningProcess:
        proc = super().start(role, cfg, *extra_args, **kwargs)  # type: ignore[arg-type]
        self.started.append(proc)
        return proc


class BadFlagTrigger(Cluster):
    """Its second trigger is started with a flag ``leasesched trigger`` does not know."""

    def start_trigger(self, timeout: float = 60.0) -> RunningProcess:
        if self.triggers:
            return self.group.start_serving("trigger", self.cfg, "--no-such-flag", timeout=timeout)
        return super().start_trigger(timeout)


def assert_nothing_left(group: RecordingGroup) -> None:
    assert group.started, "the test started nothing"
    for proc in group.started:
        assert not proc.is_running(), f"{proc} is still running"
        wait_for(lambda proc=proc: not pid_alive(proc.pid), 10, f"{proc} to be gone")
    assert not list((group.folder / "pids").glob("*.pid")), "a PID file was left"
    assert group.processes == []


def test_a_worker_that_cannot_start_fails_the_start_and_nothing_is_left(
    module_config: Config, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cfg = cluster_config(module_config, request.node.name)
    with RecordingGroup(tmp_path) as group:
        cluster = Cluster(cfg, group, worker_module="tests.no_such_handlers_module", slots=2)
        with pytest.raises(ProcessError) as failed:
            cluster.start(triggers=1, workers=1, ready_timeout=60)
        assert "worker-1" in str(failed.value) and "no_such_handlers_module" in str(failed.value)
        assert {p.role for p in group.started} == {"task-service", "task-updater", "trigger", "worker"}
        assert_nothing_left(group)


def test_a_trigger_with_a_bad_flag_fails_the_start_and_nothing_is_left(
    module_config: Config, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cfg = cluster_config(module_config, request.node.name)
    with RecordingGroup(tmp_path) as group:
        cluster = BadFlagTrigger(cfg, group, worker_module="tests.chaos_handlers", slots=2)
        with pytest.raises(ProcessError) as failed:
            cluster.start(triggers=2, workers=1)
        assert "no-such-flag" in str(failed.value)
        assert [p.name for p in group.started] == ["task-service", "task-updater", "trigger-1", "trigger-2"]
        assert_nothing_left(group)


def test_stop_stale_stops_what_a_dead_session_left_and_spares_a_live_one(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a session that is gone
    assert not pid_alive(dead_pid)
    left, live = [
        ManagedProcess(name="worker-1", pid_file=folder / "groups" / "1" / "pids" / "worker-1.pid",
                       log_file=folder / "logs" / "worker-1.log", argv=["sleep", "60"])  # fmt: skip
        for folder in (tmp_path / f"procs-{dead_pid}", tmp_path / f"procs-{os.getpid()}")
    ]
    try:
        left_pid, live_pid = left.start(), live.start()
        assert stop_stale(tmp_path, "procs-") == ["worker-1"]
        wait_for(lambda: not pid_alive(left_pid), 10, "the left-behind process to be gone")
        assert not (tmp_path / f"procs-{dead_pid}").exists()
        assert live.is_running() and pid_alive(live_pid)  # this session's own: untouched
    finally:
        left.stop(5)
        live.stop(5)
