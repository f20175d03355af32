"""A small foreground supervisor: restart a process that fails, stop all on Ctrl-C.

Why not honcho (which ``leasesched local up`` used): honcho stops every
process as soon as one exits. Workers are fail-stop: a worker that can no
longer prove its lease while a handler has not stopped ends its own process
(exit code 75, ``EXIT_FAIL_STOP`` in worker/watchdog.py) to keep the
at-most-one guarantee. With honcho that took the whole local system down;
here the worker is started again after a short backoff, as systemd's
``Restart=on-failure`` or Kubernetes' ``restartPolicy: Always`` would.

What it does, and why:

* every program runs in its own session (process group), so Ctrl-C at the
  terminal reaches only the supervisor, which then stops the programs the
  way a deployment would: SIGTERM (each drains gracefully), then SIGKILL of
  the whole group after ``stop_timeout_s``. A second Ctrl-C kills at once;
* a program that exits with a non-zero code (or is killed by a signal) is
  restarted after a delay that starts at ``first_delay_s`` and doubles up to
  ``max_delay_s`` (a crash loop costs little), and is reset once a run has
  lasted ``healthy_after_s``. Exit code 0 means it was asked to stop (or
  finished): it is not restarted, like ``Restart=on-failure``;
* when a program exits, whatever is left in its process group (a worker's
  ``mode="process"`` handler children) is killed before it is started
  again: a fail-stopped worker must not leave a handler running;
* output is read line by line and printed with the program's name, in
  honcho's format (its ``Printer``), so the local console looks as before.
  Output is best effort: ``make run | tee run.log`` then Ctrl-C ends ``tee``
  too, and the next line meets a closed pipe. That used to raise in the
  middle of the stop and leave every program running; now the supervisor
  stops printing and goes on stopping (and it stops its programs on any
  error of its own);
  Children are started with ``subprocess`` (fork + exec), never
  multiprocessing, so a parent that already runs grpc and driver threads is
  safe.

Not a production supervisor: it keeps no state across its own restarts and
a SIGKILL of the supervisor leaves its children running (they are in their
own sessions). Production: docs/operations.md, "Worker exit codes and
supervision".
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

import backoff
from honcho.printer import Message, Printer

# The worker's "I stopped myself to keep the at-most-one guarantee" exit code.
# Defined in worker/watchdog.py (EXIT_FAIL_STOP); repeated here because the
# shared core does not import the worker package. A unit test keeps them equal.
EXIT_FAIL_STOP = 75
# A worker whose credentials are refused for good (worker/runner.py,
# EXIT_CREDENTIALS_REFUSED; EX_NOPERM): a restart cannot help until its token
# is fixed, so it is not restarted (systemd: RestartPreventExitStatus=77).
EXIT_CREDENTIALS_REFUSED = 77

_COLOURS = (36, 33, 32, 35, 34, 31, 96, 93, 92, 95)  # honcho's: cyan, yellow, green, ...


@dataclass(frozen=True)
class Program:
    """One supervised command. ``restart=False``: run once, never restarted."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    restart: bool = True


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    healthy_after_s: float = 60.0  # a run at least this long resets the delay

    def delays(self) -> Iterator[float]:
        """first, 2×first, 4×first, … capped at max_delay_s."""
        delays = backoff.expo(base=2, factor=self.first_delay_s, max_value=self.max_delay_s)
        next(delays)  # backoff's generators start with a bare yield (primed by .send)
        return delays


@dataclass
class _Child:
    program: Program
    colour: int
    delays: Iterator[float]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # monotonic time of the pending restart
    restarts: int = 0
    last_code: int | None = None
    reader: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Runs programs until asked to stop; restarts those that fail.

    ``run()`` blocks (install it in the main thread to get Ctrl-C / SIGTERM
    handling), ``request_stop()`` may be called from any thread.
    """

    def __init__(
        self,
        programs: Sequence[Program],
        policy: RestartPolicy = RestartPolicy(),
        stop_timeout_s: float = 10.0,
        output: TextIO | None = None,
    ) -> None:
        names = [p.name for p in programs]
        if len(set(names)) != len(names):
            raise ValueError(f"program names must be unique: {names}")
        self._policy = policy
        self._stop_timeout_s = stop_timeout_s
        self._printer: Any = Printer(output or sys.stdout, width=max((len(n) for n in names), default=6))
        self._print_lock = threading.Lock()
        self._output_gone = False  # our reader went away: supervise silently
        self._children = [_Child(p, _COLOURS[i % len(_COLOURS)], policy.delays()) for i, p in enumerate(programs)]
        self._stop = threading.Event()
        self._kill = threading.Event()

    # ------------------------------------------------------------------ public

    def run(self, handle_signals: bool = True) -> int:
        """Start every program; return when all have stopped for good.

        0 after a requested stop (Ctrl-C, SIGTERM, ``request_stop``) or when
        every program exited 0; otherwise the last failing exit code of a
        program that is not restarted."""
        previous = self._install_signals() if handle_signals else {}
        try:
            for child in self._children:
                self._start(child)
            while not self._stop.is_set():
                if not self._tick():
                    break
                self._stop.wait(0.1)
            if self._stop.is_set():
                self._say("stopping every process (SIGTERM, then SIGKILL after "
                          f"{self._stop_timeout_s:.0f} s; Ctrl-C again kills at once)")
                self._stop_all()
                return 0
            codes = [c.last_code for c in self._children if c.last_code]
            return codes[-1] if codes else 0
        except BaseException:
            self._kill.set()  # whatever went wrong here, never leave a program behind
            self._stop_all()
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def request_stop(self) -> None:
        """Stop gracefully; a second call kills at once."""
        if self._stop.is_set():
            self._kill.set()
        self._stop.set()

    def pids(self) -> dict[str, int | None]:
        """name → pid of the running process (None while waiting to restart)."""
        return {c.program.name: (c.proc.pid if c.proc is not None and c.proc.poll() is None else None) for c in self._children}

    def restarts(self) -> dict[str, int]:
        return {c.program.name: c.restarts for c in self._children}

    # ------------------------------------------------------------------ internals

    def _install_signals(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            # No printing here: the handler may interrupt the main thread
            # while it holds the print lock. run() says what happens.
            self.request_stop()

        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _start(self, child: _Child) -> None:
        env = dict(child.program.env) if child.program.env is not None else None
        try:
            proc = subprocess.Popen(
                list(child.program.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._say(f"{child.program.name} could not start: {exc}")
            child.last_code = 127
            self._schedule_restart(child, 127, 0.0)
            return
        child.proc = proc
        child.started_at = time.monotonic()
        child.restart_at = None
        self._say(f"{child.program.name} started (pid {proc.pid})")
        child.reader = threading.Thread(target=self._pump, args=(child, proc), name=f"out-{child.program.name}", daemon=True)
        child.reader.start()

    def _pump(self, child: _Child, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            self._write(child.program.name, line.rstrip(b"\n"), child.colour)
        proc.stdout.close()

    def _tick(self) -> bool:
        """Reap exits, start due restarts. False when nothing runs or will run."""
        now = time.monotonic()
        alive = False
        for child in self._children:
            proc = child.proc
            if proc is not None:
                code = proc.poll()
                if code is None:
                    alive = True
                    continue
                child.proc = None
                _kill_group(proc.pid)  # leftovers of the exited program (handler children)
                if child.reader is not None:
                    child.reader.join(timeout=1)  # print its last lines before saying it exited
                child.last_code = code
                self._schedule_restart(child, code, now - child.started_at)
            if child.restart_at is not None:
                alive = True
                if now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
        return alive

    def _schedule_restart(self, child: _Child, code: int, ran_s: float) -> None:
        name = child.program.name
        what = _describe(code)
        if code in (0, EXIT_CREDENTIALS_REFUSED) or not child.program.restart:
            self._say(f"{name} {what}; not restarted")
            return
        if ran_s >= self._policy.healthy_after_s:
            child.delays = self._policy.delays()
        delay = next(child.delays)
        child.restart_at = time.monotonic() + delay
        self._say(f"{name} {what} after {ran_s:.1f} s; restarting in {delay:g} s")

    def _stop_all(self) -> None:
        running = [c.proc for c in self._children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            _signal(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        while any(p.poll() is None for p in running) and time.monotonic() < deadline and not self._kill.is_set():
            time.sleep(0.05)
        for child in self._children:
            if child.proc is None:
                continue
            proc = child.proc
            if proc.poll() is None:
                self._say(f"{child.program.name} did not stop in {self._stop_timeout_s:.0f} s: killing it")
            _kill_group(proc.pid)  # the program and anything it left in its group
            code = proc.wait()
            if child.reader is not None:
                child.reader.join(timeout=1)
            self._say(f"{child.program.name} {_describe(code)}")
            child.proc = None

    def _say(self, text: str) -> None:
        self._write("system", text.encode(), None)

    def _write(self, name: str, data: bytes, colour: int | None) -> None:
        with self._print_lock:
            if self._output_gone:
                return
            try:
                self._printer.write(Message(type="line", data=data, time=datetime.datetime.now(), name=name, colour=colour))
            except (OSError, ValueError):  # a closed pipe (BrokenPipeError), or a closed file
                self._output_gone = True
                _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so nothing (not even the interpreter's last
    flush at exit) writes to a pipe nobody reads."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no real file (tests): nothing to silence
        pass


def _describe(code: int) -> str:
    if code == EXIT_CREDENTIALS_REFUSED:
        return f"exited with code {code} (its credentials were refused: fix its token, see its log)"
    if code == EXIT_FAIL_STOP:
        return f"exited with code {code} (fail-stop: it could not prove its lease and ended itself)"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group (its leader started its session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
