"""Handlers the benchmark's workers run: a no-op or a short sleep, with an execution ledger.

``leasesched worker --module leasesched.loadtest.bench_handlers`` with
``LEASESCHED_BENCH_LEDGER=<file>`` in its environment. Every execution
appends a START and an END line to that file (``leasesched.loadtest.ledger``:
the same format and writer as the chaos tests' handlers).

The payload starts with a JSON object ``{"ms": <handler milliseconds>}``,
padded with spaces to the requested payload size (JSON allows trailing
whitespace), so one worker serves every handler duration.
"""

from __future__ import annotations

import json

from leasesched.loadtest.ledger import LedgerWriter
from worker.handlers import Handlers, TaskContext

NAMESPACE = "bench"
TASK_TYPE = "bench.noop"
LEDGER_ENV = "LEASESCHED_BENCH_LEDGER"

handlers = Handlers(namespace=NAMESPACE)
ledger = LedgerWriter(LEDGER_ENV)


def make_payload(handler_ms: float, size: int) -> bytes:
    """The payload for a task whose handler runs ``handler_ms``, padded to ``size`` bytes."""
    head = json.dumps({"ms": handler_ms}, separators=(",", ":")).encode()
    return head + b" " * max(0, size - len(head))


@handlers.task(TASK_TYPE)
async def noop(ctx: TaskContext) -> bytes:
    with ledger.execution(ctx) as running:
        try:
            ms = float(json.loads(ctx.payload or b"{}").get("ms", 0))
        except ValueError:
            ms = 0.0
        if ms > 0:
            running.stopped = await ctx.sleep(ms / 1000.0)
        # A result reported after the lease ran out would be dropped: that is no completion.
        running.stopped = running.stopped or not ctx.holds_lease()
    return b"stopped" if running.stopped else b"ok"
