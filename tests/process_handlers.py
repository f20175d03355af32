"""A handler that runs in a child process (``mode="process"``), for the SIGTERM tests.

Payload (JSON): {"seconds": run time}. It stops early when ``ctx.cancelled``.
"""

from __future__ import annotations

import json
import time

from worker.handlers import Handlers, TaskContext

handlers = Handlers(namespace="chaos")


@handlers.task("chaos.process", mode="process")
def work(ctx: TaskContext) -> str:
    finish = time.monotonic() + float(json.loads(ctx.payload or b"{}").get("seconds", 0.2))
    while time.monotonic() < finish:
        if ctx.cancelled:
            return "stopped"
        time.sleep(0.02)
    return "done"
