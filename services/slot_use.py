"""How many slots of a concurrency-limit group are taken now, as the TaskService sees it.

Two answers need the number: PollTask's ``waiting_reason`` ("concurrency
limit ns/key=partner-7 is full (5 of 5 running)", ``services/waiting_reasons.py``)
and LimitView's ``running`` (``services/limit_service.py``). Both are shown
to people, so a second old is good enough, and both can be asked very often
(a client polling a thousand waiting tasks of one key): ``SlotUse`` reads a
group's slots at most once per ``cache_s`` however many callers ask, also
when they ask at the same moment (one read in flight per group).

A slot is *taken* when its row holds a lease token (``lease_token > 0``): the
same rows ``leasesched/admission.py`` counts before it takes one. A taken
slot whose release was lost (its TaskUpdater crashed) still counts here
until the next claim of the group finds it free; the count is what the
slots say, not a read of every holder's task (that would be a read per
running task).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from leasesched.concurrency import LimitScope, SlotGroup
from leasesched.errors import Unavailable
from leasesched.store.base import StoreUnavailable, TaskStore

# How old a group's count may be: the same second as a gate's waiting reason
# (services/gate_service.REASON_CACHE_S).
SLOT_USE_CACHE_S = 1.0
MAX_GROUPS = 10_000  # counts remembered; past this the memory is cleared (bounded)
MAX_PARALLEL_READS = 16  # a ListLimits page of many limits reads their slots this many at a time

GroupKey = tuple[str, LimitScope, str]  # the slots' partition: max_running is not part of it


class SlotUse:
    def __init__(
        self, store: TaskStore, cache_s: float = SLOT_USE_CACHE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._cache_s = cache_s
        self._clock = clock
        self._known: dict[GroupKey, tuple[float, int]] = {}
        self._reading: dict[GroupKey, asyncio.Task[int]] = {}
        self._parallel = asyncio.Semaphore(MAX_PARALLEL_READS)

    async def taken(self, group: SlotGroup) -> int:
        """The group's taken slots, read at most ``cache_s`` ago. Unavailable
        when the store cannot be read (nothing is remembered then)."""
        key = (group.namespace, group.scope, group.name)
        hit = self._known.get(key)
        if hit is not None and self._clock() - hit[0] < self._cache_s:
            return hit[1]
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.ensure_future(self._read(key, group))
            self._reading[key] = reading
            reading.add_done_callback(lambda done: self._forget_reading(key, done))
        # Shielded: a caller that gives up (its RPC was cancelled) does not
        # cancel the read the other callers of the group wait for.
        return await asyncio.shield(reading)

    def _forget_reading(self, key: GroupKey, done: asyncio.Task[int]) -> None:
        if self._reading.get(key) is done:
            del self._reading[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure every waiter already got is not logged as "never retrieved"

    async def _read(self, key: GroupKey, group: SlotGroup) -> int:
        async with self._parallel:
            try:
                rows = await self._store.read_slots(group)
            except StoreUnavailable as exc:
                raise Unavailable(f"the slots of concurrency limit {group.label()} cannot be read: {exc}") from exc
        count = sum(1 for holder in rows if holder.lease_token > 0)
        if len(self._known) >= MAX_GROUPS:
            self._known.clear()
        self._known[key] = (self._clock(), count)
        return count
