"""Handing due tasks to subscribed workers: highest priority first, fair
across groups within a priority.

Workers keep one long-lived Subscribe stream per trigger and tell it how many
free slots they have (``Credit``, an absolute number). The trigger sends at
most that many dispatches; a task with no free worker waits in a queue per
(namespace, type) and goes out the moment a slot frees. Only due tasks ever
enter the dispatcher: a delayed task never sits in a worker's memory.

Fair share. Within a queue, tasks are grouped by their ``concurrency_key``
("" is a group too). The highest priority with queued tasks goes first, as
before; among the groups that have tasks at that priority, dispatches go
round robin, ``weight`` in a row per group (``DispatchPolicy.weights``,
default 1), so 10,000 queued tasks of one group do not delay another group's
ten: those go out within the next few dispatches. A group that runs empty
leaves the rotation, so its share goes to the groups that still have work.
Each group keeps one heap per priority (oldest first); the rotation per
priority level is a deque.

Ageing. A queued task's effective priority rises by one per
``ageing_step_ms`` it has been due, up to ``ageing_cap``, so low priorities
are not starved by a steady stream of high ones; rotations are per effective
priority. A dispatch costs O(log n) (one heap pop) plus O(1) amortised for
the rotation and O(log g) for ageing promotions: no scan over groups or
tasks (measured in ``tests/unit/test_fair_share.py``; docs/design.md has a
worked example).

A dispatch is a hint, not a transition: the worker must still win ClaimTask.
So a dispatch that is lost (worker died, stream broke, worker had no slot
after all) costs only time: after ``claim_timeout`` the trigger re-reads the
task and, if nobody claimed it, offers it again. A worker that over-received
(it subscribes to several triggers) returns the task at once instead.

Gated tasks (``Ready.gate``) do not go to a worker when offered: they wait
in a heap per (namespace, gate) until the trigger's ``GateKeeper``
(``trigger/gates.py``) holds a token of that gate for them, and it asks for
tokens only as many as there are free slots for them, so a token is spent
the moment it is taken. A task without a gate never meets any of this (one
test of an empty string).

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
from typing import AbstractSet, Awaitable, Callable, Iterator, Mapping, Protocol

from leasesched.config import Config
from leasesched.model import now_ms
from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.v1 import scheduler_pb2 as pb

log = logging.getLogger(__name__)

# How long, and for how many leases, a "finished" ack is remembered: past
# that, the lease check reads the task as it would without the ack.
FINISHED_MEMORY_S = 900.0
MAX_FINISHED = 500_000
MAX_CLAIMED_PER_LINK = 100_000
# Tasks whose claim a full concurrency limit refused wait here, per (namespace,
# type, group); one of a group is offered again when a task of that group
# finishes or is claimed, or every PARK_PROBE_S: about one refused claim per
# freed slot, not one per waiting task (docs/concurrency.md).
PARK_PROBE_S = 1.0
MAX_PARK_WATCH = 100_000

Key = tuple[uuid.UUID, int, int]
ParkKey = tuple[str, str, str]  # (namespace, type, group) of tasks held back by a full limit
LEVELS = 10  # priorities 0..9 (limits.PRIORITY)


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
    gate: str = field(default="", compare=False)  # its gate, "" = none
    # Wall time (s) the trigger learned it was due (hint or scan): only a
    # diagnostic carried to the worker (Dispatch.due_seen_at) for the load
    # report's stage breakdown; a re-offer keeps the first time.
    seen_at: float = field(default=0.0, compare=False)
    # The task as TaskService created it (its hint carried it): forwarded on
    # the Dispatch for the worker's claim without a read; None from a scan.
    created: pb.CreatedTask | None = field(default=None, compare=False)

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
    turn: int = 0  # round robin across its task types tied at the top priority


def _park_key(ready: Ready) -> ParkKey:
    return (ready.namespace, ready.type, ready.group)


def _fields(ready: Ready, worker: str | None = None) -> dict[str, object]:
    return fields(task_id=str(ready.task_id), lease_token=ready.lease_token, shard=ready.shard, worker=worker)


# Decides, after the claim timeout, whether a dispatched task is still unclaimed.
ClaimCheck = Callable[[Ready], Awaitable[bool]]
# Told the ids of the subscribed workers whenever a stream comes or goes.
WorkersChanged = Callable[[set[str]], None]
GateKey = tuple[str, str]  # (namespace, gate)


class GateWaker(Protocol):
    """What the dispatcher tells the trigger's gate keeper (``trigger/gates.GateKeeper``)."""

    def wake(self, key: GateKey) -> None:
        """Tasks of this gate wait: take tokens for them."""

    def wake_all(self) -> None:
        """Worker slots freed: gates waiting for slots may take tokens now."""


@dataclass
class InFlight:
    """A dispatch sent to a worker and not yet known to be claimed."""

    ready: Ready
    claim_check: asyncio.TimerHandle  # fires after the claim timeout: still unclaimed? dispatch again
    link: WorkerLink  # the stream it went out on


@dataclass(frozen=True)
class DispatchPolicy:
    """How queued tasks are ordered beyond priority.

    ``weights``: (namespace, concurrency key) → dispatches in a row per
    round-robin turn (default 1). Ageing: a queued task's effective priority
    is ``min(ageing_cap, priority + wait // ageing_step_ms)`` (never below its
    own), ``wait`` counted from its ``run_at`` or its group's last dispatch
    at that priority, whichever is later; ``ageing_step_ms`` 0 turns it
    off. So a low-priority task under a steady stream of high-priority work
    still starts, within ``(cap - priority) × step`` plus one free slot."""

    weights: Mapping[tuple[str, str], int] = field(default_factory=dict)
    ageing_step_ms: int = 60_000
    ageing_cap: int = LEVELS - 1

    def __post_init__(self) -> None:
        if self.ageing_step_ms < 0:
            raise ValueError(f"priority_ageing_step_s must be >= 0, not {self.ageing_step_ms / 1000:g}")
        if not 0 <= self.ageing_cap < LEVELS:
            raise ValueError(f"priority_ageing_cap must be between 0 and {LEVELS - 1}, not {self.ageing_cap}")

    @classmethod
    def from_config(cls, cfg: Config) -> "DispatchPolicy":
        return cls(
            weights=parse_weights(cfg.fair_share_weights),
            ageing_step_ms=int(cfg.priority_ageing_step_s * 1000),
            ageing_cap=cfg.priority_ageing_cap,
        )


def parse_weights(text: str) -> dict[tuple[str, str], int]:
    """``"ns/partner-a=3,ns/=2"`` → {("ns", "partner-a"): 3, ("ns", ""): 2}
    ("ns/" is the namespace's tasks without a key). A mistake raises
    ValueError naming the setting: a trigger must not start with weights it
    silently ignores."""
    weights: dict[tuple[str, str], int] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, eq, value = item.rpartition("=")
        namespace, slash, key = name.partition("/")
        if not eq or not slash or not namespace or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"fair_share_weights: {item!r} is not namespace/key=weight (an integer >= 1)")
        weights[(namespace.strip(), key.strip())] = int(value)
    return weights


# One queued task in a group's heap: oldest first (seq breaks ties: arrival order).
_Entry = tuple[int, int, Ready]


@dataclass(eq=False)
class _Group:
    """One fair-share group's queued tasks in one (namespace, type) queue."""

    name: str
    weight: int
    heaps: dict[int, list[_Entry]] = field(default_factory=dict)  # priority → heap; only non-empty ones
    size: int = 0
    level: int = -1  # the rotation (priority) it is in; -1: in none (empty)
    stamp: int = 0  # raised when it leaves a rotation: that rotation's entry for it is stale
    served: int = 0  # dispatches in its current turn
    promote_at: int | None = None  # when ageing next raises its level (ms); None: it cannot
    # priority → when this group last had a task of that priority dispatched (ms):
    # ageing counts from there, so a group that is being served does not age.
    served_at: dict[int, int] = field(default_factory=dict)

    def waiting_since(self, priority: int, run_at: int) -> int:
        """Where ageing counts from for this group's oldest task of ``priority``."""
        served = self.served_at.get(priority)
        return run_at if served is None or served < run_at else served


class _Queue:
    """The queued tasks of one (namespace, type): per priority level, a
    rotation (deque) of the groups whose best task is at that level. The
    group at the front of the highest non-empty rotation gives the next task;
    after ``weight`` dispatches (or when its level changes) it moves to the
    back. Entries of groups that moved on are left behind stale (a stamp
    tells) and skipped when they reach the front: no O(n) removal.

    Ageing. A group's level is the highest *effective* priority among its
    heaps' heads: within one group and priority the oldest task always has
    the highest effective priority, so at most 10 heads per group are ever
    compared. Levels only rise with time, at moments known in advance, so
    each group has one pending "promotion" time in a heap; due promotions
    move groups up before each dispatch. No scan over groups or tasks."""

    def __init__(self, namespace: str, policy: DispatchPolicy) -> None:
        self._namespace = namespace
        self._policy = policy
        self._step = policy.ageing_step_ms
        self._cap = policy.ageing_cap
        self.groups: dict[str, _Group] = {}
        self._rings: list[collections.deque[tuple[_Group, int]]] = [collections.deque() for _ in range(LEVELS)]
        self._counts = [0] * LEVELS  # groups (live entries) in each rotation
        self._top = -1  # no rotation above this one has a live entry
        self._promotions: list[tuple[int, int, _Group]] = []  # (when, seq, group); stale unless group.promote_at == when
        self._seq = itertools.count()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, ready: Ready, now: int) -> None:
        group = self.groups.get(ready.group)
        if group is None:
            weight = self._policy.weights.get((self._namespace, ready.group), 1)
            group = self.groups[ready.group] = _Group(ready.group, weight)
        heap = group.heaps.get(ready.priority)
        if heap is None:
            heap = group.heaps[ready.priority] = []
        heapq.heappush(heap, (ready.run_at, ready.sort_key[2], ready))
        group.size += 1
        self.size += 1
        if heap[0][2] is ready:  # a new head: the group's level or next promotion may change
            level, _ = self._assess(group, now)
            if level > group.level:
                self._move(group, level)
            self._schedule_promotion(group, now)

    def top_level(self, now: int) -> int:
        """The priority level the next pop serves; -1 when empty."""
        self._promote(now)
        while self._top >= 0 and self._counts[self._top] == 0:
            self._top -= 1
        return self._top

    def pop(self, now: int) -> Ready:
        level = self.top_level(now)
        ring = self._rings[level]
        group, stamp = ring[0]
        while stamp != group.stamp:  # left behind when the group moved on
            ring.popleft()
            group, stamp = ring[0]
        heaps = group.heaps
        priority = next(iter(heaps)) if len(heaps) == 1 else self._assess(group, now)[1]  # one heap: the common case
        heap = heaps[priority]
        ready = heapq.heappop(heap)[2]
        if not heap:
            del heaps[priority]
        group.size -= 1
        self.size -= 1
        group.served += 1
        if not group.size:
            ring.popleft()
            self._counts[level] -= 1
            if self._counts[level] == 0:
                ring.clear()
            group.stamp += 1
            group.promote_at = None
            del self.groups[group.name]
            return ready
        group.served_at[priority] = now
        new_level = (
            self._effective(priority, group.waiting_since(priority, heap[0][0]), now)
            if len(heaps) == 1 and heap else self._assess(group, now)[0]
        )  # fmt: skip
        if new_level != level:
            ring.popleft()
            self._move(group, new_level)
        elif group.served >= group.weight:
            ring.rotate(-1)  # to the back, same entry
            group.served = 0
        self._schedule_promotion(group, now)
        return ready

    def _effective(self, priority: int, run_at: int, now: int) -> int:
        """The effective priority of a task of ``priority`` due at ``run_at``."""
        step, cap = self._step, self._cap
        if step and priority < cap and now - run_at >= step:
            return min(cap, priority + (now - run_at) // step)
        return priority

    def _assess(self, group: _Group, now: int) -> tuple[int, int]:
        """(effective priority of the group's best task, the priority of the heap holding it).
        Best: highest effective priority, then oldest."""
        step, cap = self._step, self._cap
        best: tuple[int, int, int] | None = None
        chosen = -1
        for priority, heap in group.heaps.items():
            run_at, seq, _ = heap[0]
            since = group.waiting_since(priority, run_at)
            effective = priority
            if step and priority < cap and now - since >= step:
                effective = min(cap, priority + (now - since) // step)
            key = (effective, -run_at, -seq)
            if best is None or key > best:
                best, chosen = key, priority
        assert best is not None
        return best[0], chosen

    def _schedule_promotion(self, group: _Group, now: int) -> None:
        """When ``group``'s level next rises by ageing: the first moment one of
        its heads reaches ``level + 1``. None when it cannot rise. Never at or
        before ``now`` (already assessed), so ``_promote`` always ends."""
        level = group.level
        when: int | None = None
        if self._step and level < self._cap:
            for priority, heap in group.heaps.items():
                at = group.waiting_since(priority, heap[0][0]) + (level + 1 - priority) * self._step
                if when is None or at < when:
                    when = at
            when = max(when or 0, now + 1)
        current = group.promote_at
        if when == current or (when is not None and current is not None and now < current <= when):
            return  # the earlier one stands: when it comes, the group is assessed and this is set again
        group.promote_at = when
        if when is not None:
            heapq.heappush(self._promotions, (when, next(self._seq), group))
            if len(self._promotions) > 64 + 4 * len(self.groups):  # mostly stale: rebuild
                self._promotions = [(g.promote_at, next(self._seq), g) for g in self.groups.values() if g.promote_at is not None]
                heapq.heapify(self._promotions)

    def _promote(self, now: int) -> None:
        promotions = self._promotions
        while promotions and promotions[0][0] <= now:
            when, _, group = heapq.heappop(promotions)
            if group.promote_at != when or group.level < 0:
                continue  # superseded
            group.promote_at = None
            level, _ = self._assess(group, now)
            if level > group.level:
                self._move(group, level)
            self._schedule_promotion(group, now)

    def _move(self, group: _Group, level: int) -> None:
        """Put ``group`` at the back of ``level``'s rotation, leaving its old one."""
        if group.level >= 0:
            self._counts[group.level] -= 1
            if self._counts[group.level] == 0:
                self._rings[group.level].clear()  # only stale entries left
            group.stamp += 1
        group.level = level
        group.served = 0
        self._rings[level].append((group, group.stamp))
        self._counts[level] += 1
        if level > self._top:
            self._top = level

    def oldest_run_at(self) -> int | None:
        """The due time of the oldest queued task, None when empty. Each
        (group, priority) heap is oldest-first, so this reads one head per
        heap: O(groups × priorities), never O(tasks)."""
        oldest: int | None = None
        for group in self.groups.values():
            for heap in group.heaps.values():
                if heap and (oldest is None or heap[0][0] < oldest):
                    oldest = heap[0][0]
        return oldest

    def readies(self) -> Iterator[Ready]:
        for group in self.groups.values():
            for heap in group.heaps.values():
                for entry in heap:
                    yield entry[2]


class Dispatcher:
    def __init__(
        self, claim_timeout_s: float, still_unclaimed: ClaimCheck, on_workers: WorkersChanged | None = None,
        policy: DispatchPolicy | None = None, clock: Callable[[], int] = now_ms,
    ) -> None:
        """``clock``: wall time in ms, the scale of ``run_at`` (ageing counts from it)."""
        self._claim_timeout_s = claim_timeout_s
        self._still_unclaimed = still_unclaimed
        self._on_workers = on_workers
        self._policy = policy or DispatchPolicy()
        self._clock = clock
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._gated: dict[GateKey, list[Ready]] = {}  # waiting for a token of their gate
        self.gates: GateWaker | None = None
        self._links: set[WorkerLink] = set()
        self._inflight: dict[Key, InFlight] = {}
        self._queued: set[Key] = set()
        self._finished: collections.OrderedDict[tuple[uuid.UUID, int], float] = collections.OrderedDict()
        self._parked: dict[ParkKey, collections.deque[Ready]] = {}  # refused by a full concurrency limit
        # Claimed tasks' groups: the end of one offers a held-back task of its group.
        self._park_watch: collections.OrderedDict[uuid.UUID, ParkKey] = collections.OrderedDict()
        self._park_timer: asyncio.TimerHandle | None = None
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
        self._wake_gates()
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
        self._wake_gates()

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
        park = _park_key(entry.ready)
        self._park_watch[task_id] = park  # its end may free a slot its group's held-back tasks wait for
        if len(self._park_watch) > MAX_PARK_WATCH:
            self._park_watch.popitem(last=False)  # the oldest: a lease that ended without an ack
        if park in self._parked:
            self._unpark(park)  # a slot was free: maybe another is
        entry.ready.on_done()

    def finished(self, link: WorkerLink, task_id: uuid.UUID, lease_token: int) -> None:
        """The worker's report under ``lease_token`` was accepted."""
        if link.claimed.get(task_id) != lease_token:
            return  # not a lease this stream acked as claimed
        del link.claimed[task_id]
        park = self._park_watch.pop(task_id, None)
        if park is not None:
            self._unpark(park)  # its slot is free now
        now = time.monotonic()
        self._finished[(task_id, lease_token)] = now
        horizon = now - FINISHED_MEMORY_S
        while self._finished and (len(self._finished) > MAX_FINISHED or next(iter(self._finished.values())) < horizon):
            self._finished.popitem(last=False)

    def limited_all(self, task_ids: AbstractSet[uuid.UUID]) -> None:
        """Their claims were refused by a full concurrency limit: hold them
        back until a task of their group ends (or the next probe)."""
        if not task_ids:
            return
        for key in [k for k in self._inflight if k[0] in task_ids]:
            entry = self._inflight.pop(key)
            entry.claim_check.cancel()
            self._queued.add(key)
            self._parked.setdefault(_park_key(entry.ready), collections.deque()).append(entry.ready)
        if self._parked and self._park_timer is None:
            self._park_timer = asyncio.get_running_loop().call_later(PARK_PROBE_S, self._probe_parked)

    def _probe_parked(self) -> None:
        self._park_timer = None
        for park in list(self._parked):
            self._unpark(park)
        if self._parked:
            self._park_timer = asyncio.get_running_loop().call_later(PARK_PROBE_S, self._probe_parked)

    def _unpark(self, park: ParkKey) -> None:
        """Offer the longest-waiting held-back task of ``park`` again."""
        waiting = self._parked.get(park)
        if not waiting:
            return
        ready = waiting.popleft()
        if not waiting:
            del self._parked[park]
        self._queued.discard(ready.key)
        self.offer(ready)

    def lease_finished(self, task_id: uuid.UUID, lease_token: int) -> bool:
        """True when the lease is known to have ended by an accepted report."""
        return (task_id, lease_token) in self._finished

    # ------------------------------------------------------------ tasks

    def offer(self, ready: Ready) -> None:
        if ready.key in self._queued or ready.key in self._inflight:
            # The same entry offered twice (a hint and the scan, or a retry):
            # the copy already here resolves it when the task is claimed.
            return
        if ready.gate and self.gates is not None:
            key = (ready.namespace, ready.gate)
            self._queued.add(ready.key)
            heapq.heappush(self._gated.setdefault(key, []), ready)
            self.gates.wake(key)
            return
        self._dispatch(ready)

    def _dispatch(self, ready: Ready) -> None:
        link = self._pick(ready)
        if link is not None:
            self._send(link, ready)
        else:
            self._queued.add(ready.key)
            self._queue(ready.namespace, ready.type).push(ready, self._clock())

    # ------------------------------------------------------------ gated tasks

    def gated_waiting(self, key: GateKey) -> int:
        """Tasks of gate ``key`` waiting for a token here."""
        return len(self._gated.get(key, ()))

    def gated_free_slots(self, key: GateKey) -> int:
        """Free worker slots that tasks of gate ``key`` could use now: the
        gate keeper takes no more tokens than this (a token is spent when it
        is taken, so one taken without a worker to run it would be lost, and
        tasks held back by no worker must not start as a flood later)."""
        heap = self._gated.get(key)
        if not heap:
            return 0
        types = {r.type for r in heap}
        return sum(
            link.credits for link in self._links if link.credits > 0 and link.namespace == key[0] and not link.types.isdisjoint(types)
        )

    def release_gated(self, key: GateKey, tokens: int) -> int:
        """Send up to ``tokens`` tasks of gate ``key`` (highest priority first,
        among those a free worker serves); returns how many went out."""
        heap = self._gated.get(key)
        sent = 0
        held: list[Ready] = []
        while heap and sent < tokens:
            ready = heapq.heappop(heap)
            link = self._pick(ready)
            if link is None:
                held.append(ready)  # no free worker for its type: it keeps its place
                continue
            self._queued.discard(ready.key)
            self._send(link, ready)
            sent += 1
        for ready in held:
            heapq.heappush(heap if heap is not None else self._gated.setdefault(key, []), ready)
        if heap is not None and not heap:
            self._gated.pop(key, None)
        return sent

    def gated_keys(self) -> list[GateKey]:
        return [k for k, heap in self._gated.items() if heap]

    def _wake_gates(self) -> None:
        if self._gated and self.gates is not None:
            self.gates.wake_all()

    def drop_shards(self, keep: frozenset[int]) -> None:
        """Forget tasks of shards this trigger no longer owns; their new owner
        re-reads them from its checkpoint."""
        now = self._clock()
        for (namespace, type_), queue in list(self._queues.items()):
            readies = list(queue.readies())
            if all(r.shard in keep for r in readies):
                continue
            fresh = self._queues[(namespace, type_)] = _Queue(namespace, self._policy)
            for r in sorted(readies, key=lambda r: r.sort_key):  # the rotation restarts, in arrival order
                if r.shard in keep:
                    fresh.push(r, now)
                else:
                    self._queued.discard(r.key)
                    r.on_done()
        for heap in self._gated.values():
            kept = [r for r in heap if r.shard in keep]
            for r in heap:
                if r.shard not in keep:
                    self._queued.discard(r.key)
                    r.on_done()
            heapq.heapify(kept)
            heap[:] = kept
        for park, waiting in list(self._parked.items()):
            for r in [r for r in waiting if r.shard not in keep]:
                waiting.remove(r)
                self._queued.discard(r.key)
                r.on_done()
            if not waiting:
                del self._parked[park]
        for key, entry in list(self._inflight.items()):
            if entry.ready.shard not in keep:
                entry.claim_check.cancel()
                del self._inflight[key]
                entry.ready.on_done()

    def queued_by_group(self) -> dict[str, int]:
        """Queued tasks per fair-share group, ``namespace/key`` (summed over
        types): for the scrape-time gauge, O(groups), never on the dispatch path."""
        counts: dict[str, int] = collections.Counter()
        for (namespace, _), queue in self._queues.items():
            for name, group in queue.groups.items():
                counts[f"{namespace}/{name}"] += group.size
        for (namespace, _, name), waiting in self._parked.items():
            counts[f"{namespace}/{name}"] += len(waiting)
        return dict(counts)

    def queue_by_type(self) -> dict[str, tuple[int, int | None]]:
        """Task type → (queued tasks, due time of the oldest one or None),
        summed over namespaces: the queued tasks waiting for a worker slot
        (not those held by a gate or a full concurrency limit: they wait by
        design, and their own metrics say so). For the scrape-time gauges,
        read from the metrics thread: O(queues × groups × priorities) (one
        heap head each), nothing on the dispatch path. A queue changing under
        the read (the event loop runs on) is read again."""
        for _ in range(3):
            try:
                result: dict[str, tuple[int, int | None]] = {}
                for (_, type_), queue in list(self._queues.items()):
                    count, oldest = result.get(type_, (0, None))
                    head = queue.oldest_run_at()
                    if head is not None and (oldest is None or head < oldest):
                        oldest = head
                    result[type_] = (count + queue.size, oldest)
                return result
            except RuntimeError:  # a dict changed size during iteration
                continue
        return {}

    def stats(self) -> dict[str, int]:
        return {
            "queued": sum(len(q) for q in self._queues.values()) + sum(len(h) for h in self._gated.values())
            + sum(len(w) for w in self._parked.values()),
            "limited": sum(len(w) for w in self._parked.values()),
            "gated": sum(len(h) for h in self._gated.values()),
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
        if ready.created is not None:
            dispatch.created.CopyFrom(ready.created)
        if ready.seen_at:
            dispatch.due_seen_at.FromNanoseconds(int(ready.seen_at * 1e9))
        link.outbox.put_nowait(dispatch)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._claim_timeout_s, self._start_claim_check, ready.key)
        self._inflight[ready.key] = InFlight(ready, timer, link)
        self.dispatched_total += 1
        metrics.tasks_dispatched.labels(metrics.type_label(ready.type)).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s dispatched to %s", ready.task_id, link.worker_id, extra=_fields(ready, link.worker_id))

    def _queue(self, namespace: str, type_: str) -> _Queue:
        queue = self._queues.get((namespace, type_))
        if queue is None:
            queue = self._queues[(namespace, type_)] = _Queue(namespace, self._policy)
        return queue

    def _drain(self, link: WorkerLink) -> None:
        now = self._clock()  # one drain is one moment: no ageing happens within it
        while link.credits > 0:
            queues = [q for t in link.types if (q := self._queues.get((link.namespace, t))) is not None and q.size]
            if not queues:
                return
            if len(queues) == 1:
                queue = queues[0]
            else:
                # The highest priority across the link's types; types tied at it
                # take turns, so fair share holds across types too.
                levels = [q.top_level(now) for q in queues]
                top = max(levels)
                tied = [q for q, level in zip(queues, levels) if level == top]
                queue = tied[link.turn % len(tied)]
                link.turn += 1
            ready = queue.pop(now)
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
        gate: str = "",
        seen_at: float | None = None,
        created: pb.CreatedTask | None = None,
    ) -> Ready:
        """``seen_at``: wall time the trigger learned the task was due; now when not given.
        ``created``: the task's creation row from its hint (``Ready.created``)."""
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
            gate=gate,
            seen_at=time.time() if seen_at is None else seen_at,
            created=created,
        )
