"""Start a command with a larger timer slack: ``python -m leasesched.infra.timer_slack NS cmd args...``.

Why: Cassandra's request threads (its shared executor pool, ``SEPWorker``)
do not block when they run out of work. Each spins for about 10 ms in
``parkNanos`` sleeps of 10 µs, in case more work comes. Under a steady,
moderate load (a request every few ms, which is what a scheduler's scans
and tasks give a node) they never stop spinning. Measured on the 2-core dev
machine: 100 single-partition reads per second cost the node 0.44 cores,
about 4.5 ms of CPU per read.

A larger timer slack lets the kernel merge those wake-ups: a 10 µs sleep
ends within the slack instead of at once. The same 100 reads/s then cost
0.15 cores with a 500 µs slack, and 0.13 with 2 ms (BENCHMARKS.md, issue
17). The price is at most one slack of added delay where a spinning thread
would have picked up new work. Waits that are woken by a signal (a
response, a lock, a commit-log sync) are not affected; only timed sleeps
are.

The slack is a property of a thread that its new threads inherit. It is set
here on this process with ``prctl(PR_SET_TIMERSLACK)``, and then the
command is exec'ed in its place (same PID), so every thread the JVM starts
has it. No privilege is needed. A production node gets the same from its
service manager (systemd: ``TimerSlackNSec=500us``; docs/operations.md).
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_TIMERSLACK = 29  # <linux/prctl.h>


def prefix(slack_ns: int) -> list[str]:
    """The argv prefix that runs a command under ``slack_ns`` of timer
    slack; [] for 0 (the kernel's default of 50 µs stays)."""
    if slack_ns <= 0:
        return []
    return [sys.executable, "-m", __name__, str(slack_ns)]


def set_slack(slack_ns: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(slack_ns), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_TIMERSLACK, {slack_ns}): {os.strerror(err)}")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m leasesched.infra.timer_slack NANOSECONDS COMMAND [ARG...]")
    set_slack(int(argv[0]))
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
