"""The supervisor of ``leasesched local up`` with real subprocesses (no servers needed).

A fail-stopped worker (exit 75) must come back after a bounded backoff
instead of taking the local system down; Ctrl-C / SIGTERM must stop the
supervisor and every process it started, grandchildren included.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leasesched.infra.supervisor import EXIT_CREDENTIALS_REFUSED, EXIT_FAIL_STOP, Program, RestartPolicy, Supervisor
from leasesched.testing import pid_alive
from tests.cluster import wait_for

REPO = Path(__file__).resolve().parents[2]
FAST = RestartPolicy(first_delay_s=0.2, max_delay_s=0.8, healthy_after_s=100)


class Running:
    """A Supervisor running in a thread, its output captured."""

    def __init__(self, programs: list[Program], policy: RestartPolicy = FAST, stop_timeout_s: float = 5) -> None:
        self.output = io.StringIO()
        self.supervisor = Supervisor(programs, policy, stop_timeout_s=stop_timeout_s, output=self.output)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.supervisor.run(handle_signals=False)

    def text(self) -> str:
        return self.output.getvalue()

    def stop(self) -> int | None:
        self.supervisor.request_stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the supervisor did not stop"
        return self.code


@pytest.fixture
def started() -> Iterator[list[Running]]:
    runs: list[Running] = []
    yield runs
    for run in runs:
        if run.thread.is_alive():
            run.stop()


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_fail_stopped_child_is_restarted_with_doubling_capped_backoff(tmp_path: Path, started: list[Running]) -> None:
    pids = tmp_path / "pids"
    run = Running([Program("worker-1", ["sh", "-c", f"echo $$ >> {pids}; sleep 0.2; exit {EXIT_FAIL_STOP}"])])
    started.append(run)
    wait_for(lambda: len(_lines(pids)) >= 5, 20, "the fail-stopped worker to be started 5 times")
    assert run.supervisor.restarts()["worker-1"] >= 4
    assert len(set(_lines(pids))) == len(_lines(pids))  # a new process every time
    text = run.text()
    assert "worker-1 exited with code 75 (fail-stop" in text
    delays = [float(d) for d in re.findall(r"restarting in ([0-9.]+) s", text)]
    assert delays[:4] == [0.2, 0.4, 0.8, 0.8], text  # doubles from first_delay_s, capped at max_delay_s
    assert run.stop() == 0


def test_backoff_resets_after_a_healthy_run(tmp_path: Path, started: list[Running]) -> None:
    pids = tmp_path / "pids"
    policy = RestartPolicy(first_delay_s=0.2, max_delay_s=5, healthy_after_s=0.3)
    run = Running([Program("worker-1", ["sh", "-c", f"echo $$ >> {pids}; sleep 0.5; exit 1"])], policy)
    started.append(run)
    wait_for(lambda: len(_lines(pids)) >= 3, 20, "three runs")
    delays = [float(d) for d in re.findall(r"restarting in ([0-9.]+) s", run.text())]
    assert delays[:2] == [0.2, 0.2]  # each run lasted past healthy_after_s: no doubling
    run.stop()


def test_clean_exit_is_not_restarted_and_others_keep_running(tmp_path: Path, started: list[Running]) -> None:
    pids = tmp_path / "pids"
    run = Running([
        Program("oneshot", ["sh", "-c", f"echo $$ >> {pids}; exit 0"]),
        Program("service", ["sleep", "60"]),
    ])
    started.append(run)
    wait_for(lambda: "oneshot exited with code 0; not restarted" in run.text(), 10, "the clean exit to be reported")
    time.sleep(0.6)  # longer than any restart delay of FAST
    assert len(_lines(pids)) == 1
    service_pid = run.supervisor.pids()["service"]
    assert service_pid is not None and pid_alive(service_pid)
    assert run.stop() == 0
    assert not pid_alive(service_pid)


def test_leftovers_of_an_exited_child_are_killed_before_the_restart(tmp_path: Path, started: list[Running]) -> None:
    # A worker that ends itself must not leave a process-mode handler running.
    grandchildren = tmp_path / "grandchildren"
    script = f"sleep 60 & echo $! >> {grandchildren}; sleep 0.2; exit {EXIT_FAIL_STOP}"
    run = Running([Program("worker-1", ["sh", "-c", script])])
    started.append(run)
    wait_for(lambda: len(_lines(grandchildren)) >= 2, 20, "a restart")
    first = int(_lines(grandchildren)[0])
    wait_for(lambda: not pid_alive(first), 10, "the first run's handler child to be killed")
    run.stop()
    for pid in map(int, _lines(grandchildren)):
        wait_for(lambda pid=pid: not pid_alive(pid), 10, f"grandchild {pid} to be gone")


SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import sys
    from leasesched.infra.supervisor import Program, RestartPolicy, Supervisor
    folder = sys.argv[1]
    stop_timeout = float(sys.argv[2])
    programs = [
        Program("plain", ["sh", "-c", f"echo $$ >> {folder}/pids; exec sleep 60"]),
        # ignores SIGTERM and has a child of its own: only the SIGKILL of its group ends both
        Program("stubborn", ["sh", "-c", f"trap '' TERM; echo $$ >> {folder}/pids; sleep 60 & echo $! >> {folder}/pids; wait"]),
        Program("crashing", ["sh", "-c", f"echo $$ >> {folder}/crashes; exit 75"]),
    ]
    policy = RestartPolicy(first_delay_s=0.2, max_delay_s=1, healthy_after_s=100)
    sys.exit(Supervisor(programs, policy, stop_timeout_s=stop_timeout).run())
    """
)


def _start_supervisor(tmp_path: Path, stop_timeout_s: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, str(tmp_path), str(stop_timeout_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the test sends the signal itself, as a terminal would
    )


def _kill_all(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """On a failure: the supervisor, and its children, which run in sessions of their own."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in map(int, _lines(folder / "pids")):
        try:
            os.killpg(pid, signal.SIGKILL)  # a child's pid is its process group's id
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_supervisor_and_every_child(tmp_path: Path, signum: int) -> None:
    proc = _start_supervisor(tmp_path, stop_timeout_s=1)
    try:
        wait_for(lambda: len(_lines(tmp_path / "pids")) == 3 and len(_lines(tmp_path / "crashes")) >= 2, 20,
                 "every program to start and the crashing one to be restarted")
        pids = [int(p) for p in _lines(tmp_path / "pids")]
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=15)  # SIGTERM, 1 s for the stubborn one, SIGKILL
        assert proc.returncode == 0, out.decode()
        text = out.decode()
        assert "stubborn did not stop in 1 s: killing it" in text
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to be gone (no orphans)")
        crashes = len(_lines(tmp_path / "crashes"))
        time.sleep(1.5)
        assert len(_lines(tmp_path / "crashes")) == crashes  # nothing restarted after the stop
    finally:
        _kill_all(proc, tmp_path)


def test_second_ctrl_c_kills_at_once(tmp_path: Path) -> None:
    proc = _start_supervisor(tmp_path, stop_timeout_s=60)
    try:
        wait_for(lambda: len(_lines(tmp_path / "pids")) == 3, 20, "every program to start")
        pids = [int(p) for p in _lines(tmp_path / "pids")]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
        assert time.monotonic() - started < 5  # not the 60 s stop timeout
        assert proc.returncode == 0
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to be gone")
    finally:
        _kill_all(proc, tmp_path)


def test_exit_code_matches_the_worker_watchdog() -> None:
    watchdog = pytest.importorskip("worker.watchdog")
    assert watchdog.EXIT_FAIL_STOP == EXIT_FAIL_STOP
    runner = pytest.importorskip("worker.runner")
    assert runner.EXIT_CREDENTIALS_REFUSED == EXIT_CREDENTIALS_REFUSED


def test_refused_credentials_are_not_restarted(tmp_path: Path, started: list[Running]) -> None:
    pids = tmp_path / "pids"
    run = Running([Program("worker", ["sh", "-c", f"echo $$ >> {pids}; exit {EXIT_CREDENTIALS_REFUSED}"])])
    started.append(run)
    wait_for(lambda: "its credentials were refused" in run.text() and "not restarted" in run.text(), 10, "the refusal")
    time.sleep(0.6)  # longer than any restart delay of FAST
    assert len(_lines(pids)) == 1


def test_ctrl_c_stops_everything_when_the_output_pipe_is_gone(tmp_path: Path) -> None:
    """``make run 2>&1 | tee run.log`` then Ctrl-C: the terminal's SIGINT ends ``tee`` too,
    so the supervisor's next line meets a closed pipe. Stopping must not depend on it."""
    proc = _start_supervisor(tmp_path, stop_timeout_s=1)
    try:
        wait_for(lambda: len(_lines(tmp_path / "pids")) == 3, 20, "every program to start")
        pids = [int(p) for p in _lines(tmp_path / "pids")]
        assert proc.stdout is not None
        proc.stdout.close()  # tee is gone: nobody reads the supervisor's output any more
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to be gone (no orphans)")
    finally:
        _kill_all(proc, tmp_path)
