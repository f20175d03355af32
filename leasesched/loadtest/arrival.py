"""Open-loop arrival: request i is due at ``t0 + i / rate`` and leaves then,
whether or not the earlier ones have been answered.

A closed loop (N clients, each waiting for its answer) lowers the offered load
exactly when the server slows down, and so hides the slowness; here a slow
server shows up as latency, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED. The only
brake is ``max_inflight``: past it a request is counted as not sent
(``CLIENT_BACKLOG``) instead of growing the client's memory without bound.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

# fire(index, intended_loop_time) -> coroutine that performs and records one request
Fire = Callable[[int, float], Awaitable[None]]


async def open_loop(
    rate: float,
    t0: float,
    end: float,
    fire: Fire,
    inflight: Callable[[], int],
    max_inflight: int,
    on_not_sent: Callable[[str], None],
    tasks: set[asyncio.Task[None]],
    max_burst: int = 1000,
) -> int:
    """Send at ``rate`` per second from loop time ``t0`` until ``end``; returns the number due.

    Requests whose time has come are started as asyncio tasks at once (a
    burst after a late wake-up catches up); the tasks are kept in ``tasks``
    so the caller can wait for the answers still on their way.
    """
    loop = asyncio.get_running_loop()
    if rate <= 0:  # nothing to send; still lasts the whole load, so an idle run measures the idle cluster
        await asyncio.sleep(max(0.0, end - loop.time()))
        return 0
    interval = 1.0 / rate
    i = 0
    while True:
        intended = t0 + i * interval
        if intended >= end:
            return i
        now = loop.time()
        if intended > now:
            await asyncio.sleep(intended - now)
            continue
        burst = 0
        while intended <= now and intended < end and burst < max_burst:
            if inflight() >= max_inflight:
                on_not_sent("CLIENT_BACKLOG")
            else:
                task = asyncio.ensure_future(fire(i, intended))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
            burst += 1
            intended = t0 + i * interval
        if burst >= max_burst:
            await asyncio.sleep(0)  # let answers in before the next burst


# A batch leaves when it is full or when its oldest request has waited this long.
MAX_BATCH_WAIT_S = 0.25

# fire_batch([(index, intended_loop_time), ...]) -> coroutine that performs and records one call for them all
FireBatch = Callable[[list[tuple[int, float]]], Awaitable[None]]


async def open_loop_batches(
    rate: float,
    t0: float,
    end: float,
    batch: int,
    fire: FireBatch,
    inflight: Callable[[], int],
    max_inflight: int,
    on_not_sent: Callable[[str], None],
    tasks: set[asyncio.Task[None]],
    max_wait_s: float = MAX_BATCH_WAIT_S,
) -> int:
    """``open_loop`` for calls that carry up to ``batch`` requests (ScheduleTasks):
    request i is still due at ``t0 + i / rate``, whatever the answers; at each
    tick (every ``batch / rate`` s, at most ``max_wait_s``, so a batch fills at
    the offered rate) the requests due by then leave, in calls of at most
    ``batch``. Returns the number due. ``inflight`` counts requests, as in
    ``open_loop``; a request past ``max_inflight`` is counted as not sent."""
    loop = asyncio.get_running_loop()
    if rate <= 0:
        await asyncio.sleep(max(0.0, end - loop.time()))
        return 0
    interval = 1.0 / rate
    tick = min(batch * interval, max_wait_s)
    i = 0
    next_tick = t0
    while True:
        if t0 + i * interval >= end:
            return i
        now = loop.time()
        wake = min(next_tick, t0 + (i + batch - 1) * interval)  # the tick, or a full batch due sooner
        if wake > now:
            await asyncio.sleep(wake - now)
            continue
        due: list[tuple[int, float]] = []
        started = 0
        while (intended := t0 + i * interval) <= now and intended < end:
            if inflight() + started + len(due) >= max_inflight:
                on_not_sent("CLIENT_BACKLOG")
            else:
                due.append((i, intended))
            i += 1
            if len(due) == batch or not ((t0 + i * interval) <= now and t0 + i * interval < end):
                if due:
                    task = asyncio.ensure_future(fire(due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    started += len(due)
                    due = []
        next_tick = now + tick
        await asyncio.sleep(0)  # let answers in before the next tick
