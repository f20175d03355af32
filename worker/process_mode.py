"""Running a handler in a child process, so that it can be stopped by force.

A thread cannot be killed; a process can. Handlers registered with
``mode="process"`` run in a fresh ``spawn`` child that imports the handler by
module and name. Progress and the result travel back over a queue; the lease
deadline is shared as a monotonic timestamp (CLOCK_MONOTONIC is system-wide on
Linux), so ``ctx.cancelled`` works in the child as in the parent. When the
execution is stopped by force, the child is killed and reaped; the watchdog
(``worker.watchdog``) can do the same from its own thread when the event loop
is blocked, through ``Watched.kill_child``. The child ignores SIGTERM
and SIGINT: a SIGTERM to the worker's process group must let the worker drain,
not kill running handlers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import multiprocessing
import queue
import signal
from typing import Any

from worker.handlers import Handler, PermanentError, RetryAfter, TaskContext
from worker.watchdog import Watched

class ChildError(Exception):
    """A handler exception raised in the child, carrying its type name."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


_SPAWN = multiprocessing.get_context("spawn")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _child(module: str, name: str, fields: dict[str, Any], deadline: Any, cancel: Any, out: Any) -> None:
    # The worker's SIGTERM (often sent to its whole process group) must not kill
    # the handler: the worker drains, then stops the child itself (SIGKILL).
    # They were blocked since the spawn (see run_in_process): one that arrived
    # meanwhile is pending and is dropped by the unblock below.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    fn = getattr(importlib.import_module(module), name)
    ctx = TaskContext(**fields, _lease_deadline=lambda: deadline.value)
    ctx._cancel = cancel  # a multiprocessing.Event has the same interface as threading.Event
    real_report = ctx.report_progress

    def report(percent: float, message: str = "") -> None:
        real_report(percent, message)
        out.put(("progress", ctx.progress_percent, ctx.progress_message))

    ctx.report_progress = report  # type: ignore[method-assign]
    try:
        out.put(("ok", fn(ctx)))
    except PermanentError as exc:
        out.put(("permanent", type(exc).__name__, str(exc)))
    except RetryAfter as exc:
        out.put(("retry_after", exc.error_type, str(exc), exc.seconds))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a task failure
        out.put(("error", type(exc).__name__, str(exc)))


def _wait(proc: Any, out: Any, ctx: TaskContext, deadline: Any, stop: Any) -> tuple[Any, ...]:
    while True:
        deadline.value = ctx._lease_deadline()
        if ctx._cancel.is_set() and not stop.is_set():
            stop.set()
        try:
            message = out.get(timeout=0.05)
        except queue.Empty:
            if not proc.is_alive():
                return ("error", "ProcessDied", f"handler process exited with code {proc.exitcode}")
            continue
        if message[0] == "progress":
            ctx.report_progress(message[1], message[2])
            continue
        return message


def _kill_and_reap(proc: Any) -> None:
    """SIGKILL (the child ignores SIGTERM, see ``_child``), then reap it."""
    proc.kill()
    proc.join(2.0)


async def run_in_process(
    handler: Handler, ctx: TaskContext, threads: concurrent.futures.ThreadPoolExecutor, watched: Watched | None = None
) -> Any:
    fields = {
        "task_id": ctx.task_id,
        "type": ctx.type,
        "namespace": ctx.namespace,
        "payload": ctx.payload,
        "attempt": ctx.attempt,
        "lease_token": ctx.lease_token,
        "worker_id": ctx.worker_id,
        "start_to_close_s": ctx.start_to_close_s,
        "timings": ctx.timings,
    }
    deadline = _SPAWN.Value("d", ctx._lease_deadline())
    stop = _SPAWN.Event()
    out = _SPAWN.Queue()
    proc = _SPAWN.Process(
        target=_child, args=(handler.fn.__module__, handler.fn.__name__, fields, deadline, stop, out), daemon=True
    )
    # The child inherits this signal mask: a SIGTERM to the process group while
    # the new interpreter starts up stays pending instead of killing it.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if watched is not None:
        watched.kill_child = lambda: _kill_and_reap(proc)
    try:
        message = await asyncio.wrap_future(threads.submit(_wait, proc, out, ctx, deadline, stop))
    except asyncio.CancelledError:
        _kill_and_reap(proc)  # the cooperative stop came first
        raise
    finally:
        if proc.is_alive():
            proc.join(0.2)
        if proc.is_alive():
            _kill_and_reap(proc)  # it answered but lingers: the handler is not "stopped" until it is gone
        if watched is not None:
            watched.kill_child = None
    if message[0] == "ok":
        return message[1]
    if message[0] == "permanent":
        raise PermanentError(message[2] or message[1])
    if message[0] == "retry_after":
        raise RetryAfter(message[3], message[2], error_type=message[1])
    raise ChildError(message[1], message[2])

