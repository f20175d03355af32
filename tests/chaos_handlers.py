"""Handlers for the life-cycle and chaos tests, with an execution ledger.

Every execution appends a START line when it begins and an END line when it
stops, to the JSON-lines file named by LEASESCHED_TEST_LEDGER. END carries the
last moment the handler did work *while it could prove its lease*: the time is
taken first and kept only if the lease still held after it, so a pause between
the two (SIGSTOP) can never stretch an execution. A process killed with -9
writes no END; the test knows when it killed it.

Payload (JSON): {"seconds": run time, "fail": n first attempts fail,
"permanent": bool, "progress": bool}.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from worker.handlers import Handlers, PermanentError, TaskContext

handlers = Handlers(namespace="chaos")


def _append(record: dict[str, object]) -> None:
    path = os.environ["LEASESCHED_TEST_LEDGER"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _base(ctx: TaskContext) -> dict[str, object]:
    return {"task_id": ctx.task_id, "token": ctx.lease_token, "attempt": ctx.attempt, "worker": ctx.worker_id, "pid": os.getpid()}


@handlers.task("chaos.work")
async def work(ctx: TaskContext) -> bytes:
    spec = json.loads(ctx.payload or b"{}")
    start = time.time()
    _append({"event": "start", "t": start, **_base(ctx)})
    last_ok = start
    stopped = True  # unless the loop runs to its end with the lease held
    finish = time.monotonic() + float(spec.get("seconds", 0.2))
    steps = 0
    try:
        while time.monotonic() < finish:
            now = time.time()
            if not ctx.holds_lease() or ctx.cancelled:
                break
            last_ok = now
            steps += 1
            if spec.get("progress"):
                ctx.report_progress(min(99.0, steps), f"step {steps}")
            await asyncio.sleep(0.02)
        else:
            # The timer can also run out while the process was frozen past its lease.
            stopped = not ctx.holds_lease()
    finally:
        # Also when the worker stops the handler by force (CancelledError).
        _append({"event": "end", "t": last_ok, "stopped": stopped, **_base(ctx)})
    if stopped:
        return b"stopped"
    if ctx.attempt <= int(spec.get("fail", 0)):
        if spec.get("permanent"):
            raise PermanentError(f"permanent failure on attempt {ctx.attempt}")
        raise RuntimeError(f"planned failure on attempt {ctx.attempt}")
    return f"done by {ctx.worker_id}".encode()
