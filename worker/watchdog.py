"""The fail-stop watchdog: an OS thread that ends what the lease no longer covers.

Cooperative stopping (``ctx.cancelled``, task cancellation) needs the handler's
help and, for async handlers, a free event loop. Neither is guaranteed: a
plain ``def`` handler may never look at ``ctx``, and an ``async def`` handler
that calls ``time.sleep`` or loops on the CPU blocks the loop that runs the
supervisor. This thread depends on neither. It holds every execution's
``LeaseClock`` and whether its handler really stopped, and when a lease can no
longer be proven while its handler still runs, it acts:

* a ``mode="process"`` child is killed (SIGKILL) and reaped;
* a thread or async handler cannot be killed, so the worker process ends
  itself at once: ``os._exit(EXIT_FAIL_STOP)``, after one line on stderr
  (written with ``os.write``: a logging lock might be held by the very thread
  that is stuck) naming the task, the lease token and the reason. The task is
  re-queued when its lease expires, and nothing of ours runs any more by then.

When it acts (the arithmetic). Let ``L`` be the lease, ``m = max(0.5 s, L/4)``
the safety margin (``worker.lease.safety_margin``) and ``s`` the send time of
the last acknowledged claim/heartbeat (our monotonic clock). The server's
lease expires no earlier than ``s + L``; the trigger re-queues no earlier than
``s + L + lease_grace_s``. The ``LeaseClock`` deadline is ``s + L - m``: at
that moment the supervisor asks the handler to stop, and ``ctx.cancelled``
turns true. The watchdog acts at ``deadline + m/4 = s + L - 3m/4`` (plus at
most one tick, ``TICK_S`` = 50 ms), leaving ``3m/4`` before the expiry, and
``3m/4 + grace`` before anybody else may start the task:

    lease 1 s:  m = 0.5 s,  acts 0.125 s after the deadline, 0.375 s before expiry
    lease 3 s:  m = 0.75 s, acts 0.19 s after the deadline,  0.56 s before expiry
    lease 30 s: m = 7.5 s,  acts 1.9 s after the deadline,   5.6 s before expiry

(``os._exit`` takes well under a millisecond; a SIGKILLed child is reaped in
milliseconds.) If the watchdog itself looked late (the whole process was
frozen by SIGSTOP, or starved), the lease was already lost while nothing of
ours could run; the handler then gets ``stop_grace`` (m/2) of running time
from the moment the watchdog sees it, to stop cooperatively, before the
fail-stop. That bounds how long a resumed handler that ignores its context
keeps working, without killing a process whose handlers stop on their own.

The thread also watches the event loop: a callback stamps the time every
``LOOP_STAMP_S``; a stamp older than ``loop_late_s`` means a handler blocks the
loop. That is logged (naming the async task types on the loop and for how
long) and counted (``leasesched_worker_loop_stalls_total``,
``leasesched_worker_loop_blocked_seconds_total``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any, Callable

from leasesched.observability import metrics
from worker.handlers import Mode
from worker.lease import LeaseClock

log = logging.getLogger(__name__)

# The worker's exit status when it ended itself because a handler outlived a
# lease it could no longer prove (EX_TEMPFAIL of sysexits.h: a supervisor
# should simply start it again). Stated in README.md.
EXIT_FAIL_STOP = 75

TICK_S = 0.05  # how often the watchdog looks
LOOP_STAMP_S = 0.1  # how often the event loop stamps the time
LOOP_LATE_S = 1.0  # a stamp older than this: the loop is blocked
PAUSE_S = 0.5  # a watchdog tick this late: the whole process was frozen or starved


def fail_stop_slack(clock: LeaseClock) -> float:
    """How long after the clock deadline the watchdog acts: a quarter of the margin."""
    return clock.margin / 4


def _write_stderr(line: str) -> None:
    os.write(2, (line + "\n").encode())


class Watched:
    """One execution as the watchdog sees it. ``stopped`` is set when the
    handler really stopped (thread returned, coroutine finished, child reaped);
    ``kill_child`` is set for a process-mode handler while its child runs."""

    def __init__(self, task_id: str, lease_token: int, task_type: str, mode: Mode, clock: LeaseClock) -> None:
        self.task_id = task_id
        self.lease_token = lease_token
        self.type = task_type
        self.mode = mode
        self.clock = clock
        self.stopped = threading.Event()
        self.kill_child: Callable[[], None] | None = None
        self.started = time.monotonic()
        self.first_seen_expired: float | None = None
        self.acted = False


class Watchdog:
    """One per worker process. ``exit`` and ``write`` are injectable so that
    tests can watch it fire without dying."""

    def __init__(
        self,
        exit: Callable[[int], Any] = os._exit,
        write: Callable[[str], None] = _write_stderr,
        tick_s: float = TICK_S,
        loop_late_s: float = LOOP_LATE_S,
    ) -> None:
        self._exit = exit
        self._write = write
        self._tick_s = tick_s
        self._loop_late_s = loop_late_s
        self._lock = threading.Lock()
        self._watched: set[Watched] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_tick = time.monotonic()
        self._loop_stamp: float | None = None
        self._stall_since: float | None = None
        self.stalls = 0  # event-loop stalls seen (also a metric)
        self.fail_stops = 0  # times ``exit`` was called (once in a real process)

    # ------------------------------------------------------------ set-up

    def start(self) -> None:
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="lease-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch ``loop`` for stalls: it stamps the time every ``LOOP_STAMP_S``."""

        def stamp() -> None:
            self._loop_stamp = time.monotonic()
            if not self._stop.is_set() and not loop.is_closed():
                loop.call_later(LOOP_STAMP_S, stamp)

        self._loop_stamp = time.monotonic()
        loop.call_soon_threadsafe(stamp)

    def watch(self, watched: Watched) -> None:
        with self._lock:
            self._watched.add(watched)

    def unwatch(self, watched: Watched) -> None:
        with self._lock:
            self._watched.discard(watched)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one bad check
                log.exception("watchdog check failed")

    def check(self, now: float | None = None) -> None:
        """One look at every execution and at the loop (the thread calls this every tick)."""
        now = time.monotonic() if now is None else now
        if now - self._last_tick > PAUSE_S + self._tick_s:
            # The whole process was frozen (SIGSTOP) or starved, the loop with it:
            # not a loop stall. Restart the loop's baseline.
            log.info("worker was frozen or starved for %.1f s", now - self._last_tick)
            if self._loop_stamp is not None:
                self._loop_stamp = max(self._loop_stamp, now)
        self._last_tick = now
        with self._lock:
            watched = list(self._watched)
        for entry in watched:
            self._check_one(entry, now)
        self._check_loop(now, watched)

    def _check_one(self, entry: Watched, now: float) -> None:
        if entry.acted or entry.stopped.is_set():
            return
        deadline = entry.clock.deadline
        if now < deadline:
            entry.first_seen_expired = None  # renewed meanwhile
            return
        if entry.first_seen_expired is None:
            entry.first_seen_expired = now
        slack = fail_stop_slack(entry.clock)
        looked_late = entry.first_seen_expired > deadline + slack + 2 * self._tick_s
        confirm = entry.clock.stop_grace if looked_late else 0.0
        if now < deadline + slack or now < entry.first_seen_expired + confirm:
            return
        entry.acted = True
        reason = f"lease can no longer be proven ({now - deadline:.2f} s past the deadline) and the {entry.mode} handler still runs"
        if entry.kill_child is not None:
            log.warning("task %s: killing the handler's child process (lease token %d): %s", entry.task_id, entry.lease_token, reason)
            metrics.worker_children_killed.inc()
            entry.kill_child()
            return
        self._fail_stop(entry.task_id, entry.lease_token, reason)

    def fail_stop(self, task_id: str, lease_token: int, reason: str) -> None:
        """End the process now (see the module docstring); used by the drain too."""
        self._fail_stop(task_id, lease_token, reason)

    def _fail_stop(self, task_id: str, lease_token: int, reason: str) -> None:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "level": "CRITICAL",
            "logger": __name__,
            "msg": f"fail-stop: task {task_id} under lease token {lease_token}: {reason}; exiting with {EXIT_FAIL_STOP}",
            "pid": os.getpid(),
            "task_id": task_id,
            "lease_token": lease_token,
            "exit_code": EXIT_FAIL_STOP,
        }
        try:
            self._write(json.dumps(line))
        finally:
            self.fail_stops += 1
            self._exit(EXIT_FAIL_STOP)

    def _check_loop(self, now: float, watched: list[Watched]) -> None:
        stamp = self._loop_stamp
        if stamp is None:
            return
        late = now - stamp
        if late > self._loop_late_s and self._stall_since is None:
            self._stall_since = stamp
            self.stalls += 1
            metrics.worker_loop_stalls.inc()
            running = sorted(
                f"{w.type} (task {w.task_id}, running {now - w.started:.1f} s)"
                for w in watched
                if w.mode == Mode.ASYNC and not w.stopped.is_set()
            )
            log.warning(
                "event loop blocked for %.1f s (leases are still renewed by the heartbeat thread); async handlers on it: %s",
                late,
                ", ".join(running) or "none",
            )
        elif self._stall_since is not None and late <= self._loop_late_s:
            blocked = max(0.0, stamp - self._stall_since)
            metrics.worker_loop_blocked_seconds.inc(blocked)
            log.warning("event loop free again after %.1f s", blocked)
            self._stall_since = None
