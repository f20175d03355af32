"""A small managed background process: start detached, find again, stop, pause.

Local servers (Cassandra, ZooKeeper) must outlive the command that started them
(`leasesched infra up` returns while they keep running) and must be found again
by a later command (`infra status`, `infra down`) or by a chaos test that wants
to kill or freeze them. So everything needed to find a process again lives on
disk: a PID file next to the server's data. Nothing is kept in memory between
calls, which makes every method safe to call from a fresh object.

Why the process group: the command we start may be a shell script that execs or
forks Java (zkServer.sh). Starting it in its own session makes its PID the
process-group id, so one signal to the group reaches every process it spawned
and none of ours (Ctrl-C in the terminal does not reach the servers either).

Why the start time in the PID file: PIDs are reused. A PID file left behind by a
server that died with the machine, or was killed with SIGKILL, may name an
unrelated live process later; comparing the kernel's start time of the process
(psutil's create_time) with the one recorded at start rules that out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import psutil


class InfraError(RuntimeError):
    """Local infrastructure cannot be installed, started or reached; the message says why."""



log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ServerStatus:
    """What `infra status` shows for one local server."""

    name: str
    running: bool  # the process recorded in the PID file is alive
    pid: int | None
    port: int
    listening: bool  # something accepts TCP connections on the port
    paused: bool
    log_file: Path
    data_dir: Path
    host: str = "127.0.0.1"
    role: str = ""  # ZooKeeper: leader, follower or standalone (as its `srvr` says)


class ServerControl:
    """Stop, kill, pause, resume and status: the same for every local server.

    Mixed into CassandraServer and ZooKeeperServer, which provide ``name``,
    ``label``, ``host``, ``port``, ``data_dir``, ``log_file`` and ``process``.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    stop_timeout_s: ClassVar[float] = 30.0
    host: str
    data_dir: Path
    node_name: str  # e.g. "cassandra" (a lone node) or "cassandra-2" (node 2 of a local cluster)

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    @property
    def process(self) -> "ManagedProcess":
        raise NotImplementedError

    def is_running(self) -> bool:
        return self.process.is_running()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop cleanly (SIGTERM lets the server drain and sync its log)."""
        stopped = self.process.stop(self.stop_timeout_s if timeout is None else timeout)
        if stopped:
            log.info("%s stopped (data kept in %s)", self.label, self.data_dir)
        return stopped

    def kill9(self) -> bool:
        return self.process.kill9()

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def status(self) -> ServerStatus:
        process = self.process
        pid = process.pid()
        return ServerStatus(
            name=self.node_name,
            running=pid is not None,
            pid=pid,
            port=self.port,
            listening=accepts_connections(self.host, self.port),
            paused=pid is not None and process.is_paused(),
            log_file=self.log_file,
            data_dir=self.data_dir,
            host=self.host,
        )


def port_in_use(host: str, port: int) -> bool:
    """True if binding ``host:port`` fails, i.e. some process listens there.

    Binding (with SO_REUSEADDR, as the Java servers do) rather than connecting
    also catches listeners on 0.0.0.0 and ignores connections in TIME_WAIT
    left over from a server we just stopped.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def accepts_connections(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connection to ``host:port`` succeeds: a cheap first readiness check."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise InfraError(
            "Java is not installed (needed by Cassandra and ZooKeeper): "
            "install a JRE 17, e.g. `apt-get install openjdk-17-jre-headless`."
        )
    return java


@dataclass(frozen=True)
class _Facts:
    """What the kernel says of a live PID (psutil): its state and when it started."""

    status: str  # psutil.STATUS_*: "running", "sleeping", "stopped", "zombie", ...
    started: float  # psutil's create_time (epoch seconds, from the kernel's start ticks)

    @property
    def gone(self) -> bool:
        return self.status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)

    @property
    def paused(self) -> bool:
        return self.status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def _facts(pid: int) -> _Facts | None:
    """The process's facts, None if there is no such PID."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return _Facts(proc.status(), proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same_start(recorded: str, facts: _Facts) -> bool:
    """Whether a PID file's start time names this process (not a later one with its PID).

    Written as psutil's create_time; PID files of earlier versions hold the
    kernel's start ticks (an integer), compared in ticks since boot."""
    if "." not in recorded:
        ticks = round((facts.started - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))
        return abs(ticks - int(recorded)) <= 1
    return abs(float(recorded) - facts.started) < 0.01


def _fully_exited(pid: int, reap: Callable[[int], None] | None = None) -> bool:
    """True once the process and all its threads are gone, so its ports are free.

    A multi-threaded process (any JVM) shows its main thread as a zombie
    while the other threads are still tearing down and still hold its
    sockets; only when the zombie is the last thread left is everything
    closed. Our own children are reaped here, so they vanish.
    """
    (reap or _reap)(pid)
    facts = _facts(pid)
    if facts is None:
        return True
    if not facts.gone:
        return False
    try:
        return psutil.Process(pid).num_threads() <= 1
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return True


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child.

    A child started by this Python process stays a zombie (still in /proc)
    until someone waits for it; without this, a server we stopped would look
    alive forever to the test session that started it.
    """
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it


@dataclass(frozen=True)
class ManagedProcess:
    """A detached background process identified by its PID file.

    ``argv``, ``env`` and ``cwd`` are only needed by ``start()``; a ``ManagedProcess``
    built with just ``name``, ``pid_file`` and ``log_file`` can still report,
    stop, kill, pause and resume a process started earlier by someone else.
    """

    name: str
    pid_file: Path
    log_file: Path
    argv: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to the inherited environment
    cwd: Path | None = None
    # The Popen of a process this object started, kept so that its exit status
    # is collected through it (``exit_code``) instead of being thrown away.
    _child: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False, repr=False, compare=False)

    # -- identity ---------------------------------------------------------

    def pid(self) -> int | None:
        """The PID of the live process, or None (no PID file, stale, or exited).

        A stale PID file is removed as a side effect so that the next reader
        does not have to decide again.
        """
        try:
            lines = self.pid_file.read_text().split()
        except FileNotFoundError:
            return None
        try:
            pid, started = int(lines[0]), lines[1]
            float(started)
        except (IndexError, ValueError):
            self._forget()
            return None
        self._collect(pid)
        facts = _facts(pid)
        if facts is None or facts.gone or not _same_start(started, facts):
            self._forget()
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_paused(self) -> bool:
        """True while the process is stopped by SIGSTOP (see ``pause``)."""
        pid = self.pid()
        facts = _facts(pid) if pid is not None else None
        return facts is not None and facts.paused

    # -- life cycle -------------------------------------------------------

    def start(self) -> int:
        """Start the command detached and record it; return its PID.

        Refuses to start a second copy: two servers writing the same data
        folder corrupt it, so the caller must check ``is_running()`` first.
        """
        if not self.argv:
            raise ValueError(f"{self.name}: no command to start")
        running = self.pid()
        if running is not None:
            raise RuntimeError(f"{self.name} is already running (pid {running}, {self.pid_file})")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_file, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self._child[:] = [proc]
        facts = _facts(proc.pid)
        started = facts.started if facts is not None else 0.0
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{proc.pid}\n{started:.3f}\n")
        tmp.replace(self.pid_file)  # readers never see a half-written file
        return proc.pid

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the process group to exit (SIGTERM); SIGKILL it after ``timeout`` s.

        Servers get the chance to shut down cleanly (Cassandra syncs its commit
        log on SIGTERM). SIGCONT follows SIGTERM because a paused process would
        otherwise never see the signal. Returns False if nothing was running.
        """
        pid = self.pid()
        if pid is None:
            return False
        self._signal_group(pid, signal.SIGTERM)
        self._signal_group(pid, signal.SIGCONT)
        if not self._wait_exit(pid, timeout):
            self._signal_group(pid, signal.SIGKILL)
            self._wait_exit(pid, 10.0)
        self._forget()
        return True

    def kill9(self) -> bool:
        """SIGKILL the whole group at once: a crash, as chaos tests want it."""
        pid = self.pid()
        if pid is None:
            return False
        self._signal_group(pid, signal.SIGKILL)
        self._wait_exit(pid, 10.0)
        self._forget()
        return True

    def pause(self) -> None:
        """Freeze the process group (SIGSTOP): it keeps its sockets but answers nothing.

        This is how a long GC pause or a hung machine looks from outside;
        chaos tests use it to let sessions and leases expire.
        """
        pid = self._require_pid()
        self._signal_group(pid, signal.SIGSTOP)
        self._wait_state(pid, paused=True)

    def resume(self) -> None:
        """Let a paused process group continue (SIGCONT)."""
        pid = self._require_pid()
        self._signal_group(pid, signal.SIGCONT)
        self._wait_state(pid, paused=False)

    def exit_code(self) -> int | None:
        """How the process this object started ended: its exit status, or
        ``-N`` when signal N killed it (``subprocess`` convention); None while
        it runs, or when it was started by another object or process."""
        if not self._child:
            return None
        child = self._child[0]
        code = child.poll()
        if code is None:
            # ``is_running`` is already False once the main thread is a zombie, but
            # the kernel lets the parent reap it only after its other threads are
            # torn down too (a few ms; seen in CI: is_running False, exit code None).
            # Wait for that short step instead of answering "still runs".
            facts = _facts(child.pid)
            if facts is None or facts.gone:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = child.wait(timeout=10)
        return code

    # -- logs ------------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_file, lines)

    # -- internals -------------------------------------------------------

    def _require_pid(self) -> int:
        pid = self.pid()
        if pid is None:
            raise RuntimeError(f"{self.name} is not running")
        return pid

    def _signal_group(self, pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone
        except PermissionError:
            # Not a group leader we may signal (should not happen with
            # start_new_session); fall back to the process itself.
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _wait_state(self, pid: int, paused: bool, timeout: float = 5.0) -> None:
        """Return once the kernel shows the new state: signals are delivered
        asynchronously, and a chaos test that pauses a server and immediately
        measures something must not race the signal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            facts = _facts(pid)
            if facts is None or facts.paused == paused:
                return
            time.sleep(0.01)
        raise InfraError(f"{self.name} (pid {pid}) did not {'stop' if paused else 'continue'} within {timeout} s")

    def _collect(self, pid: int) -> None:
        """Reap ``pid`` if it exited: through its Popen when we started it
        (keeping the exit status), otherwise with a bare waitpid."""
        for child in self._child:
            if child.pid == pid:
                child.poll()
                return
        _reap(pid)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if _fully_exited(pid, self._collect):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _forget(self) -> None:
        self.pid_file.unlink(missing_ok=True)


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a (possibly large, possibly missing) log file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return f"(no log file {path})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def wait_until_ready(
    process: ManagedProcess,
    probe: Callable[[], bool],
    timeout: float,
    what: str,
    logs: Sequence[Path],
) -> float:
    """Poll ``probe`` until it passes; return the seconds waited.

    Fails fast if the process dies (a bad config or a taken port shows up in
    its log within seconds; waiting the full timeout would only hide it) and
    puts the end of each log into the error, because that is the first thing
    anyone debugging a failed start-up needs.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if not process.is_running():
            raise InfraError(f"{what} exited during start-up.\n{_log_report(logs)}")
        if probe():
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise InfraError(f"{what} did not become ready within {timeout:.0f} s.\n{_log_report(logs)}")
        time.sleep(0.5)


def _log_report(logs: Sequence[Path], lines: int = 25, width: int = 300) -> str:
    def short(text: str) -> str:  # Java logs whole class paths on one line
        return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in text.splitlines())

    return "\n".join(f"--- last lines of {log}:\n{short(tail(log, lines))}" for log in logs)
