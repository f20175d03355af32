"""Handlers for tests/integration/test_dead_letters.py (namespace ``chaos``,
the test cluster's): two types that always fail permanently, so their tasks
become dead letters, and one that succeeds, for the queue-age gauge (no
worker serves these types until the test starts this module's worker)."""

from __future__ import annotations

from worker.handlers import Handlers, PermanentError, TaskContext

handlers = Handlers(namespace="chaos")


@handlers.task("dead.a")
async def fail_a(ctx: TaskContext) -> bytes:
    raise PermanentError("dead.a always fails")


@handlers.task("dead.b")
async def fail_b(ctx: TaskContext) -> bytes:
    raise PermanentError("dead.b always fails")


@handlers.task("dead.late")
async def late(ctx: TaskContext) -> bytes:
    return b"ok"
