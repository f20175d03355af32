"""Handlers the benchmark's workers run: a no-op or a short sleep, with an execution ledger.

``leasesched worker --module leasesched.loadtest.bench_handlers`` with
``LEASESCHED_BENCH_LEDGER=<file>`` in its environment. Every execution
appends two JSON lines to that file (one ``write`` each on an ``O_APPEND``
descriptor kept open, so lines of concurrent workers never interleave)::

    {"e": "s", "id": <task id>, "k": <lease token>, "a": <attempt>, "t": <wall time>, "p": <pid>}
    {"e": "e", "id": ..., "k": ..., "t": <last moment it worked while it could prove its lease>, "x": <1 if stopped>}

The payload starts with a JSON object ``{"ms": <handler milliseconds>}``,
padded with spaces to the requested payload size (JSON allows trailing
whitespace), so one worker serves every handler duration.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from worker.handlers import Handlers, TaskContext

NAMESPACE = "bench"
TASK_TYPE = "bench.noop"
LEDGER_ENV = "LEASESCHED_BENCH_LEDGER"

handlers = Handlers(namespace=NAMESPACE)

_fd: int | None = None


def make_payload(handler_ms: float, size: int) -> bytes:
    """The payload for a task whose handler runs ``handler_ms``, padded to ``size`` bytes."""
    head = json.dumps({"ms": handler_ms}, separators=(",", ":")).encode()
    return head + b" " * max(0, size - len(head))


def _append(record: dict[str, Any]) -> None:
    global _fd
    if _fd is None:
        path = os.environ.get(LEDGER_ENV)
        if not path:
            return
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


@handlers.task(TASK_TYPE)
async def noop(ctx: TaskContext) -> bytes:
    start = time.time()
    _append({"e": "s", "id": ctx.task_id, "k": ctx.lease_token, "a": ctx.attempt, "t": start, "p": os.getpid()})
    try:
        ms = float(json.loads(ctx.payload or b"{}").get("ms", 0))
    except ValueError:
        ms = 0.0
    stopped = False
    last_ok = start
    if ms > 0:
        stopped = await ctx.sleep(ms / 1000.0)
    now = time.time()
    if ctx.holds_lease():
        last_ok = now  # the time is taken first and kept only if the lease still held after it
    else:
        stopped = True
    _append({"e": "e", "id": ctx.task_id, "k": ctx.lease_token, "t": last_ok, "x": int(stopped)})
    return b"stopped" if stopped else b"ok"
