"""Handlers for the life-cycle and chaos tests, with an execution ledger.

Every execution writes START where its code starts and END where it really
stops, to the JSON-lines file named by LEASESCHED_TEST_LEDGER, through the
one ledger writer (``leasesched.loadtest.ledger``; the format and the checks
are described there). A process killed with -9 or ending itself writes no
END; the test observes its end and appends that.

``chaos.work`` cooperates: before each step of work it checks ``ctx`` and
marks the step, so its execution counts until its last step. The others do
not cooperate, on purpose (issue 10): they count until their code returns.

Payload (JSON): {"seconds": run time, "fail": n first attempts fail,
"permanent": bool, "progress": bool}.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

from leasesched.loadtest.ledger import LedgerWriter
from worker.handlers import Handlers, PermanentError, TaskContext

LEDGER_ENV = "LEASESCHED_TEST_LEDGER"

handlers = Handlers(namespace="chaos")
ledger = LedgerWriter(LEDGER_ENV)


def _seconds(ctx: TaskContext) -> float:
    return float(json.loads(ctx.payload or b"{}").get("seconds", 0.2))


@handlers.task("chaos.work")
async def work(ctx: TaskContext) -> bytes:
    spec = json.loads(ctx.payload or b"{}")
    with ledger.execution(ctx) as running:
        finish = time.monotonic() + float(spec.get("seconds", 0.2))
        steps = 0
        running.stopped = True  # unless the loop runs to its end with the lease held
        while time.monotonic() < finish:
            if ctx.cancelled:
                break
            running.step()
            steps += 1
            if spec.get("progress"):
                ctx.report_progress(min(99.0, steps), f"step {steps}")
            await asyncio.sleep(0.02)
        else:
            # The timer can also run out while the process was frozen past its lease.
            running.stopped = ctx.cancelled
    if running.stopped:
        return b"stopped"
    if ctx.attempt <= int(spec.get("fail", 0)):
        if spec.get("permanent"):
            raise PermanentError(f"permanent failure on attempt {ctx.attempt}")
        raise RuntimeError(f"planned failure on attempt {ctx.attempt}")
    return f"done by {ctx.worker_id}".encode()


@handlers.task("chaos.stubborn_thread")
def stubborn_thread(ctx: TaskContext) -> str:
    """A plain function in a thread that never looks at ``ctx``: nothing can stop it but its process ending."""
    with ledger.execution(ctx):
        finish = time.monotonic() + _seconds(ctx)
        while time.monotonic() < finish:
            time.sleep(0.05)
    return "done"


@handlers.task("chaos.blocking_async")
async def blocking_async(ctx: TaskContext) -> str:
    """An async handler that blocks the worker's event loop (time.sleep, never awaits)."""
    with ledger.execution(ctx):
        time.sleep(_seconds(ctx))
    return "done"


@handlers.task("chaos.stubborn_process", mode="process")
def stubborn_process(ctx: TaskContext) -> str:
    """In a child process: ignores SIGTERM and ``ctx``; only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with ledger.execution(ctx):
        finish = time.monotonic() + _seconds(ctx)
        while time.monotonic() < finish:
            time.sleep(0.05)
    return "done"
