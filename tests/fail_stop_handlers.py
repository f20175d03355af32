"""Handlers that do not cooperate, for tests/integration/test_fail_stop.py.

Each execution appends to the JSON-lines file named by LEASESCHED_TEST_LEDGER:
``start``, ``alive`` every 0.1 s while it works (a worker that ends itself
with os._exit writes no ``end``: its last ``alive`` bounds when it worked) and
``end`` in ``finally``.

Payload (JSON): {"seconds": run time on attempt 1, "later_seconds": run time
on later attempts (default 0.2)}.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from worker.handlers import Handlers, TaskContext

handlers = Handlers(namespace="chaos")


def _append(event: str, ctx: TaskContext) -> None:
    record = {"event": event, "t": time.time(), "task_id": ctx.task_id, "token": ctx.lease_token,
              "attempt": ctx.attempt, "worker": ctx.worker_id, "pid": os.getpid()}  # fmt: skip
    fd = os.open(os.environ["LEASESCHED_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _seconds(ctx: TaskContext) -> float:
    spec = json.loads(ctx.payload or b"{}")
    return float(spec.get("seconds", 0.2) if ctx.attempt == 1 else spec.get("later_seconds", 0.2))


@handlers.task("fs.block_loop")
async def block_loop(ctx: TaskContext) -> str:
    """Blocks the worker's event loop (time.sleep in an async def)."""
    _append("start", ctx)
    try:
        end = time.monotonic() + _seconds(ctx)
        while time.monotonic() < end:
            time.sleep(0.1)  # never awaits: the loop is blocked throughout
            _append("alive", ctx)
        return "blocked"
    finally:
        _append("end", ctx)


@handlers.task("fs.polite")
async def polite(ctx: TaskContext) -> str:
    """Cooperative async work that shares the loop with a careless neighbour."""
    _append("start", ctx)
    try:
        end = time.monotonic() + _seconds(ctx)
        while time.monotonic() < end:
            if ctx.cancelled:
                return "stopped"
            await asyncio.sleep(0.05)
        return "done"
    finally:
        _append("end", ctx)


@handlers.task("fs.stubborn")
def stubborn(ctx: TaskContext) -> str:
    """A thread handler that never looks at ctx."""
    _append("start", ctx)
    try:
        end = time.monotonic() + _seconds(ctx)
        while time.monotonic() < end:
            time.sleep(0.1)
            _append("alive", ctx)
        return "done"
    finally:
        _append("end", ctx)
