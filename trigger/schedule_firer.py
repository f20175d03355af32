"""Firing the periodic schedules of the shards this trigger owns.

A schedule lives in one shard (a hash of its uid) and has a due-index entry
(kind ``schedule``) at the time it must next be looked at: its next slot,
or sooner while a kept slot waits for a run to end. The shard's scanner
reads these entries with all the others; when one comes due it calls
``ScheduleFirer.handle``, which evaluates the schedule (``leasesched.firing``)
and hands what came of it back to the scanner: the task a slot created (in
the same shard, so it is dispatched here without a hint or a read) and the
entry for the next look (timed in memory, like any entry within the
lookahead).

The entry stays pending in the scanner until ``handle`` returns, so a
trigger that dies in the middle of a firing leaves it to the shard's next
owner, which reads it again from the checkpoint; the firing's conditional
write and the slot's derived task id make doing it twice harmless.

Pacing. After an outage, slots missed but still within their catch-up
window, and backfills, are run at most ``catchup_rate`` per second per
trigger (on-time slots are never held back), so a trigger that comes back
to a thousand late schedules does not flood the workers and the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable, Protocol

from leasesched.firing import LATE_MS, Firing, Plan, decide, schedule_entry
from leasesched.lifecycle import Lifecycle, run_entry
from leasesched.model import DueEntry, Task, now_ms
from leasesched.observability import metrics
from leasesched.schedules import Schedule, ScheduleState, parse_ref
from leasesched.store.schedule_codec import BadScheduleDocument
from leasesched.token_bucket import TokenBucket

log = logging.getLogger(__name__)

MAX_STEPS = 50  # evaluations in a row for one entry before yielding (a long catch-up continues via a new entry)


class Scanner(Protocol):
    """What the firer needs from the shard's scanner."""

    def offer_created(self, entry: DueEntry, namespace: str, run_at: int, group: str = "", gate: str = "") -> None: ...

    def notify_entry(self, entry: DueEntry) -> None: ...


class Pace:
    """At most ``rate`` late firings per second, in a burst of at most ``burst``."""

    def __init__(self, rate: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``burst``: default one second's worth (at least 10)."""
        size = float(burst if burst is not None else max(10, int(rate)))
        self._clock = clock
        self._bucket = TokenBucket(rate, size, size, clock())

    def take(self) -> bool:
        return self._bucket.take(self._clock()) == 0.0


class ScheduleFirer:
    def __init__(self, lifecycle: Lifecycle, catchup_rate: float) -> None:
        self._firing = Firing(lifecycle.store, lifecycle)
        self._pace = Pace(catchup_rate)
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}  # schedule uid → held while one entry of it is evaluated
        self._queued: set[uuid.UUID] = set()  # schedules with an entry waiting for that lock

    def _decide(self, schedule: Schedule, state: ScheduleState, now: int) -> Plan:
        late_work = (state.next_slot_ms is not None and state.next_slot_ms < now - LATE_MS) or bool(state.backfills)
        return decide(schedule, state, now, may_catch_up=self._pace.take() if late_work else True)

    async def handle(self, entry: DueEntry, scanner: Scanner) -> None:
        """Evaluate the entry's schedule until nothing more is due now.

        One evaluation of a schedule at a time in this process. A schedule can
        have many entries due at once (after a failover the new owner reads
        every entry since the checkpoint, and each step of a catch-up writes
        one); evaluated side by side they only lose the conditional write to
        each other (``Aborted`` after ``MAX_RACE_RETRIES``, retried a second
        later, writing more entries), so a schedule behind on a busy store fell
        further behind. An entry that comes while another waits for the lock
        is done at once: the waiting one reads the schedule after it came."""
        uid = entry.task_id
        if uid in self._queued:
            return
        lock = self._locks.setdefault(uid, asyncio.Lock())
        waiting = lock.locked()
        if waiting:
            self._queued.add(uid)
        acquired = False
        try:
            async with lock:
                acquired = True
                if waiting:
                    self._queued.discard(uid)
                await self._handle(entry, scanner)
        finally:
            if waiting and not acquired:  # cancelled while waiting (the shard was released)
                self._queued.discard(uid)
            if not lock.locked() and uid not in self._queued:
                self._locks.pop(uid, None)

    async def _handle(self, entry: DueEntry, scanner: Scanner) -> None:
        namespace, schedule_id = parse_ref(entry.ref)
        if not namespace or not schedule_id:
            log.warning("schedule entry %s names no schedule (ref %r): dropped", entry.task_id, entry.ref)
            return
        last: DueEntry | None = None
        for _ in range(MAX_STEPS):
            try:
                result = await self._firing.evaluate(namespace, schedule_id, uid=entry.task_id, decider=self._decide)
            except BadScheduleDocument as exc:  # retrying cannot help; the row needs an operator
                metrics.schedule_evaluations.labels("error").inc()
                log.error("schedule %s/%s cannot be evaluated: %s", namespace, schedule_id, exc)
                return
            if result.schedule is None or result.plan is None:
                return  # deleted (or replaced by another of the same name, with its own entries)
            for task in result.created:
                self._dispatch(task, scanner)
            nxt = result.plan.next_eval_ms
            if nxt is None:
                return
            last = schedule_entry(result.schedule, nxt)
            if nxt > now_ms():
                # Its entry is written; timing it here makes it exact instead of scan-granular.
                scanner.notify_entry(last)
                return
        if last is not None:  # still more due now (a long catch-up): continue from the entry just written
            scanner.notify_entry(last)

    @staticmethod
    def _dispatch(task: Task, scanner: Scanner) -> None:
        now = now_ms()
        if task.run_at <= now:
            # The key and gate go with it (the schedule's action sets them): the
            # dispatcher queues it in its fair-share group and waits for its gate,
            # as for a task the scan read.
            scanner.offer_created(run_entry(task, now), task.namespace, task.run_at, group=task.concurrency_key, gate=task.gate)
        else:
            scanner.notify_entry(run_entry(task, task.run_at))  # its jitter: timed, then read and dispatched

