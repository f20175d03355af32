"""Handlers for the life-cycle and chaos tests, with an execution ledger.

Every execution writes START where its code starts and END where it really
stops, to the JSON-lines file named by LEASESCHED_TEST_LEDGER, through the
one ledger writer (``leasesched.loadtest.ledger``; the format and the checks
are described there). A process killed with -9 or ending itself writes no
END; the test observes its end and appends that.

``chaos.work`` cooperates: before each step of work it checks ``ctx`` and
marks the step, so its execution counts until its last step. The others do
not cooperate, on purpose (issue 10): they count until their code returns.

``chaos.fenced_thread`` does not cooperate either, but every step of its work
is a fenced write (``worker.fencing``) to the sink table ``SINK_TABLE``,
recorded in the ledger with its answer: the chaos test checks that no stale
execution's write took effect (``ledger.check_fenced``).

Payload (JSON): {"seconds": run time, "fail": n first attempts fail,
"permanent": bool, "progress": bool, "rate_limited": s — the first claim
(lease token 1) raises ``RateLimited(s)`` before any work}.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

from leasesched.config import Config
from leasesched.loadtest.ledger import LedgerWriter
from leasesched.store.cassandra import new_cluster
from worker.fencing import FencedTable
from worker.handlers import Handlers, PermanentError, RateLimited, TaskContext

LEDGER_ENV = "LEASESCHED_TEST_LEDGER"

handlers = Handlers(namespace="chaos")
ledger = LedgerWriter(LEDGER_ENV)


def _seconds(ctx: TaskContext) -> float:
    return float(json.loads(ctx.payload or b"{}").get("seconds", 0.2))


@handlers.task("chaos.work")
async def work(ctx: TaskContext) -> bytes:
    spec = json.loads(ctx.payload or b"{}")
    if spec.get("rate_limited") and ctx.lease_token == 1:
        raise RateLimited(float(spec["rate_limited"]), "the remote side said: too many requests")
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
    # fail_first_lease: only the task's first lease fails (an operator's retry raises the token).
    if ctx.attempt <= int(spec.get("fail", 0)) or (spec.get("fail_first_lease") and ctx.lease_token == 1):
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


SINK_TABLE = "chaos_sink"
SINK_CQL = f"CREATE TABLE IF NOT EXISTS {SINK_TABLE} (task_id text PRIMARY KEY, step int, pid int, fence_token bigint)"
_sink: FencedTable | None = None
_sink_lock = threading.Lock()


def _fenced_sink() -> FencedTable:
    """One session per worker process, opened on first use, on the worker's own store settings."""
    global _sink
    with _sink_lock:
        if _sink is None:
            cfg = Config.from_env()
            _sink = FencedTable(new_cluster(cfg).connect(cfg.keyspace), SINK_TABLE)
        return _sink


@handlers.task("chaos.fenced_thread")
def fenced_thread(ctx: TaskContext) -> str:
    """Like ``stubborn_thread``, but each step is a fenced write, and after its steps
    it writes once more, as a handler commits its result. A worker frozen anywhere
    in the steps and resumed past its lease therefore sends at least that last
    write late, and the sink must refuse it. (Only a freeze inside the last write
    itself sends nothing late.) Before, the loop ended right after a step, so a
    freeze during a write — a third of the loop with 5.0's slower LWTs — sent
    nothing late, and the run did not exercise the fence."""
    sink = _fenced_sink()
    key = {"task_id": ctx.task_id}
    with ledger.execution(ctx):
        finish = time.monotonic() + _seconds(ctx)
        step = 0
        while time.monotonic() < finish:
            step += 1
            sent = time.time()
            ledger.fenced(ctx, sent, sink.write(key, {"step": step, "pid": os.getpid()}, ctx.lease_token))
            time.sleep(0.05)
        sent = time.time()
        ledger.fenced(ctx, sent, sink.write(key, {"step": step + 1, "pid": os.getpid()}, ctx.lease_token))
    return "done"
