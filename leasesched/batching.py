"""Coalescing many small calls into few batch calls, without waiting to fill them.

Why: every unary gRPC call costs both ends a fixed amount of CPU (framing,
interceptors, a task on each event loop) however small its message. Under
load a worker claims and completes hundreds of tasks a second and TaskService
hints as many to the triggers; sending what is pending together pays that
cost once per batch instead of once per task.

Why no timer: a batcher that waits a few milliseconds to fill a batch adds
those milliseconds to every task at low load, when nothing is gained. This
one sends at once whenever fewer than ``max_in_flight`` batch calls are out;
items that arrive while they all are out wait for the first of them to end
and then leave together. At low load every item travels alone and as soon as
it is submitted; under load batches form by themselves, as large as the calls
are slow (Nagle's idea without its delay).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Batch(Generic[Item]):
    """What one batch call carries: the items, and the shortest deadline
    (seconds from now, monotonic) any of them was submitted with, so that no
    item waits longer than its caller asked for."""

    items: Sequence[Item]
    timeout_s: float


class Coalescer(Generic[Item, Result]):
    """``await submit(item, timeout_s)`` returns that item's result from a batch call.

    ``send(batch)`` must return one result per item, in order; it may also
    return an exception instance for an item (that item's caller gets it
    raised). An exception raised by ``send`` itself is every item's: the call
    as a whole failed, exactly as each unary call would have.

    A caller that stops waiting (cancelled, or its own deadline) does not
    cancel the batch: the other items still need it, and an item already
    applied by the server must not be mistaken for one never sent.
    """

    def __init__(
        self,
        send: Callable[[Batch[Item]], Awaitable[Sequence[Result | BaseException]]],
        max_batch: int,
        max_in_flight: int = 1,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._send = send
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: deque[tuple[Item, float, asyncio.Future[Result]]] = deque()
        self._senders = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Items submitted and not yet taken into a call."""
        return len(self._queue)

    def submit(self, item: Item, timeout_s: float) -> asyncio.Future[Result]:
        """Queue ``item``; the returned future is resolved by its batch call.

        A plain method returning a future (not a coroutine) so that a caller
        that does not need the answer (a best-effort hint) need not await it.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, loop.time() + timeout_s, future))
        if self._senders < self._max_in_flight:
            self._senders += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    async def _drain(self) -> None:
        """One sender: sends what is queued, batch after batch, until nothing is."""
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                taken = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
                deadline = min(d for _, d, _ in taken)
                batch = Batch(items=[item for item, _, _ in taken], timeout_s=max(0.0, deadline - loop.time()))
                try:
                    results: Sequence[Result | BaseException] = await self._send(batch)
                    if len(results) != len(taken):
                        raise RuntimeError(f"a batch of {len(taken)} got {len(results)} results")
                except asyncio.CancelledError:  # shutdown: nobody may wait for ever
                    for _, _, future in taken:
                        future.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - the call failed: it is every item's failure
                    results = [exc] * len(taken)
                for (_, _, future), result in zip(taken, results):
                    if future.done():
                        continue  # its caller gave up waiting
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._senders -= 1

    async def close(self) -> None:
        """Wait for the calls in flight (at shutdown, before closing the channel)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
