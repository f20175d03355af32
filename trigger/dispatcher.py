"""Handing due tasks to subscribed workers, highest priority first.

Workers keep one long-lived Subscribe stream per trigger and tell it how many
free slots they have (``Credit``, an absolute number). The trigger sends at
most that many dispatches; a task with no free worker waits in a priority heap
per (namespace, type) and goes out the moment a slot frees. Only due tasks
ever enter the dispatcher: a delayed task never sits in a worker's memory.

A dispatch is a hint, not a transition: the worker must still win ClaimTask.
So a dispatch that is lost (worker died, stream broke, worker had no slot
after all) costs only time: after ``claim_timeout`` the trigger re-reads the
task and, if nobody claimed it, offers it again. A worker that over-received
(it subscribes to several triggers) returns the task at once instead.

Acks save those reads in the common case. A worker says on its stream when
it claimed a dispatch (no claim check is needed then) and when its report
under that lease was accepted (the lease can never be live again, so the
scanner's lease-expiry check needs no read). Acks are accepted only for
tasks dispatched on the same stream, so a worker can speak only for work it
was given; a lost ack costs one read, as before.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AbstractSet, Awaitable, Callable

from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.v1 import scheduler_pb2 as pb

log = logging.getLogger(__name__)

# How long, and for how many leases, a "finished" ack is remembered: past
# that, the lease check reads the task as it would without the ack.
FINISHED_MEMORY_S = 900.0
MAX_FINISHED = 500_000
MAX_CLAIMED_PER_LINK = 100_000

Key = tuple[uuid.UUID, int, int]


@dataclass(order=True)
class Ready:
    """A due task waiting for a worker. Ordered by priority (high first), then due time."""

    sort_key: tuple[int, int, int]
    task_id: uuid.UUID = field(compare=False)
    namespace: str = field(compare=False)
    type: str = field(compare=False)
    attempt: int = field(compare=False)
    lease_token: int = field(compare=False)
    priority: int = field(compare=False)
    run_at: int = field(compare=False)
    shard: int = field(compare=False)
    # Called once the task no longer needs this trigger (claimed, gone, shard lost).
    on_done: Callable[[], None] = field(compare=False)
    # The fair-share group: the task's concurrency key ("" = none) within its namespace.
    group: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[uuid.UUID, int, int]:
        """One "became runnable" event: a retry or re-queue changes attempt or token."""
        return (self.task_id, self.attempt, self.lease_token)


@dataclass(eq=False)
class WorkerLink:
    """One worker's Subscribe stream."""

    worker_id: str
    namespace: str
    types: frozenset[str]
    credits: int
    outbox: asyncio.Queue[pb.Dispatch] = field(default_factory=asyncio.Queue)
    # Tasks this worker acked as claimed: task id → the lease token it claimed.
    claimed: dict[uuid.UUID, int] = field(default_factory=dict)


def _fields(ready: Ready, worker: str | None = None) -> dict[str, object]:
    return fields(task_id=str(ready.task_id), lease_token=ready.lease_token, shard=ready.shard, worker=worker)


# Decides, after the claim timeout, whether a dispatched task is still unclaimed.
ClaimCheck = Callable[[Ready], Awaitable[bool]]
# Told the ids of the subscribed workers whenever a stream comes or goes.
WorkersChanged = Callable[[set[str]], None]


@dataclass
class InFlight:
    """A dispatch sent to a worker and not yet known to be claimed."""

    ready: Ready
    claim_check: asyncio.TimerHandle  # fires after the claim timeout: still unclaimed? dispatch again
    link: WorkerLink  # the stream it went out on


class Dispatcher:
    def __init__(self, claim_timeout_s: float, still_unclaimed: ClaimCheck, on_workers: WorkersChanged | None = None) -> None:
        self._claim_timeout_s = claim_timeout_s
        self._still_unclaimed = still_unclaimed
        self._on_workers = on_workers
        self._heaps: dict[tuple[str, str], list[Ready]] = {}
        self._links: set[WorkerLink] = set()
        self._inflight: dict[Key, InFlight] = {}
        self._queued: set[Key] = set()
        self._finished: collections.OrderedDict[tuple[uuid.UUID, int], float] = collections.OrderedDict()
        self._seq = itertools.count()
        self._checks: set[asyncio.Task[None]] = set()
        self.dispatched_total = 0

    # ------------------------------------------------------------ workers

    def connect(self, worker_id: str, namespace: str, types: frozenset[str], credits: int) -> WorkerLink:
        link = WorkerLink(worker_id, namespace, types, max(0, credits))
        self._links.add(link)
        log.info("worker %s subscribed for %s/%s with %d slots", worker_id, namespace, sorted(types), credits)
        self._workers_changed()
        self._drain(link)
        return link

    def disconnect(self, link: WorkerLink) -> None:
        self._links.discard(link)
        # Dispatches that never left the process go straight back to the heap.
        while not link.outbox.empty():
            dispatch = link.outbox.get_nowait()
            self.returned(uuid.UUID(dispatch.task_id))
        log.info("worker %s unsubscribed", link.worker_id)
        self._workers_changed()

    def set_credits(self, link: WorkerLink, slots: int) -> None:
        link.credits = max(0, slots) - link.outbox.qsize()
        self._drain(link)

    def returned(self, task_id: uuid.UUID) -> None:
        """The worker had no free slot after all: offer the task again now."""
        self.returned_all({task_id})

    def returned_all(self, task_ids: AbstractSet[uuid.UUID]) -> None:
        """``returned`` for a whole Returned message: one pass over the
        in-flight dispatches, not one per id (a message may carry
        ``limits.TASK_IDS_PER_MESSAGE`` ids; a pass per id stalled the loop)."""
        if not task_ids:
            return
        for key in [k for k in self._inflight if k[0] in task_ids]:
            entry = self._inflight.pop(key)
            entry.claim_check.cancel()
            self.offer(entry.ready)

    def claimed(self, link: WorkerLink, task_id: uuid.UUID, attempt: int, lease_token: int) -> None:
        """The worker claimed the dispatch (task, attempt, token as dispatched):
        its lease entry covers the task from here, no claim check is needed."""
        key = (task_id, attempt, lease_token)
        entry = self._inflight.get(key)
        if entry is None or entry.link is not link:
            return  # not dispatched on this stream, or settled already
        del self._inflight[key]
        entry.claim_check.cancel()
        if len(link.claimed) < MAX_CLAIMED_PER_LINK:
            link.claimed[task_id] = lease_token + 1  # a claim raises the token by one
        entry.ready.on_done()

    def finished(self, link: WorkerLink, task_id: uuid.UUID, lease_token: int) -> None:
        """The worker's report under ``lease_token`` was accepted."""
        if link.claimed.get(task_id) != lease_token:
            return  # not a lease this stream acked as claimed
        del link.claimed[task_id]
        now = time.monotonic()
        self._finished[(task_id, lease_token)] = now
        horizon = now - FINISHED_MEMORY_S
        while self._finished and (len(self._finished) > MAX_FINISHED or next(iter(self._finished.values())) < horizon):
            self._finished.popitem(last=False)

    def lease_finished(self, task_id: uuid.UUID, lease_token: int) -> bool:
        """True when the lease is known to have ended by an accepted report."""
        return (task_id, lease_token) in self._finished

    # ------------------------------------------------------------ tasks

    def offer(self, ready: Ready) -> None:
        if ready.key in self._queued or ready.key in self._inflight:
            # The same entry offered twice (a hint and the scan, or a retry):
            # the copy already here resolves it when the task is claimed.
            return
        link = self._pick(ready)
        if link is not None:
            self._send(link, ready)
        else:
            self._queued.add(ready.key)
            heapq.heappush(self._heaps.setdefault((ready.namespace, ready.type), []), ready)

    def drop_shards(self, keep: frozenset[int]) -> None:
        """Forget tasks of shards this trigger no longer owns; their new owner
        re-reads them from its checkpoint."""
        for group, heap in list(self._heaps.items()):
            kept = [r for r in heap if r.shard in keep]
            for r in heap:
                if r.shard not in keep:
                    self._queued.discard(r.key)
                    r.on_done()
            heapq.heapify(kept)
            self._heaps[group] = kept
        for key, entry in list(self._inflight.items()):
            if entry.ready.shard not in keep:
                entry.claim_check.cancel()
                del self._inflight[key]
                entry.ready.on_done()

    def stats(self) -> dict[str, int]:
        return {
            "queued": sum(len(h) for h in self._heaps.values()),
            "inflight": len(self._inflight),
            "workers": len(self._links),
            "dispatched_total": self.dispatched_total,
        }

    # ------------------------------------------------------------ internals

    def _workers_changed(self) -> None:
        if self._on_workers is not None:
            self._on_workers({link.worker_id for link in self._links})

    def _pick(self, ready: Ready) -> WorkerLink | None:
        best: WorkerLink | None = None
        for link in self._links:
            if link.credits > 0 and link.namespace == ready.namespace and ready.type in link.types:
                if best is None or link.credits > best.credits:
                    best = link
        return best

    def _send(self, link: WorkerLink, ready: Ready) -> None:
        link.credits -= 1
        dispatch = pb.Dispatch(
            task_id=str(ready.task_id),
            type=ready.type,
            attempt=ready.attempt,
            priority=ready.priority,
            lease_token=ready.lease_token,
        )
        dispatch.run_at.FromMilliseconds(ready.run_at)
        link.outbox.put_nowait(dispatch)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._claim_timeout_s, self._start_claim_check, ready.key)
        self._inflight[ready.key] = InFlight(ready, timer, link)
        self.dispatched_total += 1
        metrics.tasks_dispatched.labels(metrics.type_label(ready.type)).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s dispatched to %s", ready.task_id, link.worker_id, extra=_fields(ready, link.worker_id))

    def _drain(self, link: WorkerLink) -> None:
        while link.credits > 0:
            best_heap: list[Ready] | None = None
            for t in link.types:
                heap = self._heaps.get((link.namespace, t))
                if heap and (best_heap is None or heap[0] < best_heap[0]):
                    best_heap = heap
            if best_heap is None:
                return
            ready = heapq.heappop(best_heap)
            self._queued.discard(ready.key)
            self._send(link, ready)

    def _start_claim_check(self, key: Key) -> None:
        entry = self._inflight.get(key)
        if entry is None:
            return
        task = asyncio.ensure_future(self._claim_check(entry.ready))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _claim_check(self, ready: Ready) -> None:
        try:
            unclaimed = await self._still_unclaimed(ready)
        except Exception as exc:  # noqa: BLE001 - store trouble: look again later
            log.warning("claim check of task %s failed: %s", ready.task_id, exc)
            loop = asyncio.get_running_loop()
            entry = self._inflight.get(ready.key)
            if entry is not None:
                timer = loop.call_later(self._claim_timeout_s, self._start_claim_check, ready.key)
                self._inflight[ready.key] = InFlight(ready, timer, entry.link)
            return
        if self._inflight.pop(ready.key, None) is None:
            return  # dropped meanwhile (shard lost)
        if unclaimed:
            log.info(
                "task %s not claimed within %.1f s; dispatching again", ready.task_id, self._claim_timeout_s,
                extra=_fields(ready),
            )  # fmt: skip
            self.offer(ready)
        else:
            ready.on_done()

    def make_ready(
        self,
        task_id: uuid.UUID,
        namespace: str,
        type_: str,
        attempt: int,
        lease_token: int,
        priority: int,
        run_at: int,
        shard: int,
        on_done: Callable[[], None],
        group: str = "",
    ) -> Ready:
        return Ready(
            sort_key=(-priority, run_at, next(self._seq)),
            task_id=task_id,
            namespace=namespace,
            type=type_,
            attempt=attempt,
            lease_token=lease_token,
            priority=priority,
            run_at=run_at,
            shard=shard,
            on_done=on_done,
            group=group,
        )
