"""Handlers used by `make run` to show the system working.

    leasesched task schedule demo.sleep --payload 3      # sleeps 3 s, reporting progress
    leasesched task schedule demo.fail                    # fails, retried with backoff
    leasesched task schedule demo.echo --payload hello    # returns its payload
"""

from __future__ import annotations

import time

from worker.handlers import Handlers, PermanentError, TaskContext

handlers = Handlers(namespace="default")


@handlers.task("demo.echo")
async def echo(ctx: TaskContext) -> bytes:
    return ctx.payload


@handlers.task("demo.sleep")
def sleep(ctx: TaskContext) -> str:
    seconds = float(ctx.payload or b"3")
    steps = max(1, int(seconds * 10))
    for step in range(steps):
        if ctx.cancelled:
            return "stopped"
        ctx.report_progress(100 * step / steps, f"step {step + 1} of {steps}")
        time.sleep(seconds / steps)
    return f"slept {seconds:g} s"


@handlers.task("demo.fail")
def fail(ctx: TaskContext) -> None:
    if ctx.payload == b"permanent":
        raise PermanentError("this input can never work")
    raise RuntimeError(f"attempt {ctx.attempt} failed on purpose")
