"""Handlers the benchmark's workers run: a no-op or a short sleep, with an execution ledger.

``leasesched worker --module worker.bench_handlers`` with
``LEASESCHED_BENCH_LEDGER=<file>`` in its environment. Every execution
appends a START and an END line to that file (``leasesched.loadtest.ledger``:
the same format and writer as the chaos tests' handlers). What the tasks
carry is defined in ``leasesched.loadtest.bench_tasks``.
"""

from __future__ import annotations

import json

from leasesched.loadtest.bench_tasks import LEDGER_ENV, NAMESPACE, TASK_TYPE
from leasesched.loadtest.ledger import LedgerWriter
from worker.handlers import Handlers, TaskContext

handlers = Handlers(namespace=NAMESPACE)
ledger = LedgerWriter(LEDGER_ENV)


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
