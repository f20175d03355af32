"""What the benchmark schedules: its namespace, task type and payload format.

The handlers that run these tasks live with the worker (``worker/bench_handlers.py``):
the load test starts ``leasesched worker --module worker.bench_handlers``, and
the core never imports the worker package.

The payload starts with a JSON object ``{"ms": <handler milliseconds>}``,
padded with spaces to the requested payload size (JSON allows trailing
whitespace), so one worker serves every handler duration.
"""

from __future__ import annotations

import json

NAMESPACE = "bench"
TASK_TYPE = "bench.noop"
LEDGER_ENV = "LEASESCHED_BENCH_LEDGER"  # the execution ledger the bench workers append to
BENCH_MODULE = "worker.bench_handlers"


def make_payload(handler_ms: float, size: int) -> bytes:
    """The payload for a task whose handler runs ``handler_ms``, padded to ``size`` bytes."""
    head = json.dumps({"ms": handler_ms}, separators=(",", ":")).encode()
    return head + b" " * max(0, size - len(head))
