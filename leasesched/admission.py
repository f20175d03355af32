"""Admission: taking, confirming and giving back concurrency-limit slots.

``leasesched.concurrency`` says what a limit is and when a slot is free; this
module does it against the store, for ``Lifecycle.claim`` (take before the
claim, confirm after it) and for every end of an attempt (give back). A
process keeps the limits it read for ``LIMITS_REFRESH_S`` (``LimitTable``):
a new or changed limit applies within that time, without a read per claim.

Costs, per claim of a task with limits, per level: one read of the group's
slots and one conditional write to take one, one to confirm it, one to give
it back at the end (the holder is remembered, so the end needs no read when
it reaches the TaskUpdater that claimed). The levels are taken, confirmed and
given back side by side: a claim adds three round trips (read, take,
confirm) however many levels limit it. A task without limits costs nothing
but a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import OrderedDict

from leasesched.concurrency import (
    LIMIT_REACHED,
    ConcurrencyLimit,
    LimitKey,
    LimitScope,
    SlotGroup,
    SlotHolder,
    groups_for,
    holder_is_free,
    index_limits,
)
from leasesched.errors import ResourceExhausted, Unavailable
from leasesched.model import Task
from leasesched.observability.logs import fields
from leasesched.states import TaskStatus
from leasesched.store.base import StoreUnavailable, TaskStore, UnreadableTask

log = logging.getLogger(__name__)

LIMITS_REFRESH_S = 2.0
# A full group whose holders were all found live is not looked at again (its
# holders' tasks read again) for this long, unless its slots changed: refused
# claims of a busy group cost one read of the slots, not one per holder.
FULL_MEMORY_S = 0.5
MAX_RACES = 5
MAX_HELD = 100_000  # holders remembered for giving back without a read
MAX_GATE_CAPS = 10_000  # gates whose max_in_flight is remembered


class LimitReached(ResourceExhausted):
    """Every slot of ``group`` is held by a running task: the task waits."""

    def __init__(self, group: SlotGroup) -> None:
        super().__init__(f"{LIMIT_REACHED}{group.label()} ({group.max_running} running) reached; the task waits for a slot")
        self.group = group


@dataclass(frozen=True)
class Held:
    group: SlotGroup
    holder: SlotHolder


class LimitTable:
    """The limits as last read, re-read when older than ``refresh_s``.

    A claim never waits for a re-read: past ``refresh_s`` the table is read
    again in the background and the claim goes on with the one it has; only
    a process's first claims wait, for the first read. Why: while a Cassandra
    node is frozen a read can take the store's whole deadline (11 s), and
    every claim of the process would wait behind it."""

    def __init__(self, store: TaskStore, refresh_s: float = LIMITS_REFRESH_S) -> None:
        self._store = store
        self.refresh_s = refresh_s
        self._table: dict[LimitKey, ConcurrencyLimit] | None = None
        self._read_at = 0.0
        self._first: asyncio.Future[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def current(self) -> dict[LimitKey, ConcurrencyLimit]:
        if self._table is None:
            if self._first is None or self._first.done():
                self._first = asyncio.ensure_future(self._read())
            await asyncio.shield(self._first)  # one read however many claims wait for it
        elif time.monotonic() - self._read_at >= self.refresh_s and self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh())
        assert self._table is not None
        return self._table

    def snapshot(self) -> dict[LimitKey, ConcurrencyLimit]:
        """What was read last, without reading (empty before the first read)."""
        return self._table or {}

    async def _read(self) -> None:
        try:
            table = index_limits(await self._store.list_limits(None))
        except StoreUnavailable as exc:
            raise Unavailable(f"the concurrency limits cannot be read: {exc}") from exc
        self._table, self._read_at = table, time.monotonic()

    async def _refresh(self) -> None:
        try:
            await self._read()
        except Exception as exc:  # noqa: BLE001 - keep the table we have; try again in refresh_s
            log.warning("concurrency limits not re-read (%s); using the ones read %.0f s ago", exc, time.monotonic() - self._read_at)
            self._read_at = time.monotonic()
        finally:
            self._refreshing = None


class Admission:
    def __init__(self, store: TaskStore, table: LimitTable | None = None, full_memory_s: float = FULL_MEMORY_S) -> None:
        self._store = store
        self.table = table or LimitTable(store)
        self._full_memory_s = full_memory_s
        self._held: OrderedDict[tuple[uuid.UUID, int], list[Held]] = OrderedDict()
        self._gate_caps: dict[tuple[str, str], tuple[int, float]] = {}  # (namespace, gate) -> (max_in_flight, read at)
        self._gate_reads: dict[tuple[str, str], asyncio.Task[int]] = {}  # background re-reads under way
        self._full: dict[SlotGroup, tuple[float, frozenset[tuple[int, uuid.UUID, int]]]] = {}

    async def groups(self, task: Task) -> list[SlotGroup]:
        found = groups_for(task.namespace, task.type, task.concurrency_key, await self.table.current())
        if task.gate:
            cap = await self._gate_cap(task.namespace, task.gate)
            if cap:
                found.append(SlotGroup(task.namespace, LimitScope.GATE, task.gate, cap))
        return found

    async def _gate_cap(self, namespace: str, gate: str) -> int:
        """The gate's max_in_flight (0: none). As for the limits, a claim waits
        only for the first read of a gate; later ones happen in the background."""
        key = (namespace, gate)
        known = self._gate_caps.get(key)
        if known is None:
            return await self._read_gate_cap(key)
        if time.monotonic() - known[1] >= self.table.refresh_s and key not in self._gate_reads:
            read = asyncio.create_task(self._read_gate_cap(key, quiet=True))
            self._gate_reads[key] = read
            read.add_done_callback(lambda _: self._gate_reads.pop(key, None))
        return known[0]

    async def _read_gate_cap(self, key: tuple[str, str], quiet: bool = False) -> int:
        try:
            found = await self._store.get_gate(*key)
        except StoreUnavailable as exc:
            if quiet:
                log.warning("gate %s/%s not re-read (%s); using its max_in_flight as read before", *key, exc)
                cap = self._gate_caps.get(key, (0, 0.0))[0]
                self._gate_caps[key] = (cap, time.monotonic())  # try again in refresh_s, not at the next claim
                return cap
            raise Unavailable(f"gate {key[1]!r} cannot be read: {exc}") from exc
        cap = found.max_in_flight if found is not None else 0
        self._gate_caps[key] = (cap, time.monotonic())
        if len(self._gate_caps) > MAX_GATE_CAPS:
            self._gate_caps.pop(next(iter(self._gate_caps)))
        return cap

    async def take(self, task: Task, token: int, now: int) -> list[Held]:
        """A slot of every level for the claim that sets ``token``, outermost
        first; LimitReached when a level is full (nothing is kept then)."""
        groups = await self.groups(task)
        if not groups:
            return []
        # Every level at once: nothing here waits for a slot (a full level is
        # refused at once), so the order cannot deadlock, and a claim costs one
        # round of round trips however many levels limit it.
        results = await asyncio.gather(*(self._take_one(g, task.task_id, token, now) for g in groups), return_exceptions=True)
        held = [r for r in results if isinstance(r, Held)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.give_back(held)
            raise next((f for f in failures if isinstance(f, LimitReached)), failures[0])
        return held

    async def confirm(self, task_id: uuid.UUID, token: int, held: list[Held]) -> bool:
        """After the claim landed: True if every slot is still ours (now
        confirmed), False if one was taken over meanwhile (the claim must be
        given back unrun)."""
        try:
            confirmed = await asyncio.gather(*(self._store.confirm_slot(item.group, item.holder) for item in held))
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        for item, ok in zip(held, confirmed):
            if not ok:
                log.warning("task %s: slot %d of %s was taken over before the claim confirmed it", task_id, item.holder.index,
                            item.group.label(), extra=fields(task_id=str(task_id)))  # fmt: skip
                return False
        if held:
            self._held[(task_id, token)] = held
            if len(self._held) > MAX_HELD:
                self._held.popitem(last=False)
        return True

    async def release(self, task: Task, token: int) -> None:
        """The attempt under ``token`` ended: give its slots back. Best effort:
        a slot not given back is found free by the next claim that needs it."""
        held = self._held.pop((task.task_id, token), None)
        if held is None:
            held = []
            for group in await self.groups(task):
                try:
                    rows = await self._store.read_slots(group)
                except StoreUnavailable:
                    return
                held += [Held(group, h) for h in rows if h.task_id == task.task_id and h.lease_token == token]
        await self.give_back(held)

    async def release_known(self, task_id: uuid.UUID, token: int) -> None:
        """As ``release`` for a report that did not read its task: only the
        slots this process took for that claim (others wait for a claim's check)."""
        held = self._held.pop((task_id, token), None)
        if held:
            await self.give_back(held)

    async def give_back(self, held: list[Held]) -> None:
        async def free(item: Held) -> None:
            try:
                await self._store.free_slot(item.group, item.holder)
            except StoreUnavailable as exc:
                log.warning("slot %d of %s not given back (%s); the next claim that needs it finds it free",
                            item.holder.index, item.group.label(), exc)  # fmt: skip

        await asyncio.gather(*(free(item) for item in held))

    async def _take_one(self, group: SlotGroup, task_id: uuid.UUID, token: int, now: int) -> Held:
        for _ in range(MAX_RACES):
            try:
                rows = await self._store.read_slots(group)
            except StoreUnavailable as exc:
                raise Unavailable(str(exc)) from exc
            for h in rows:
                if h.task_id == task_id and h.lease_token == token:
                    return Held(group, h)  # a retried claim: already ours
            taken = {h.index: h for h in rows if h.lease_token > 0}
            live = len(taken)
            choices: list[tuple[int, SlotHolder | None]] = []
            if live < group.max_running:
                existing = {h.index: h for h in rows}
                choices = [(i, existing.get(i)) for i in range(group.max_running) if i not in taken]
            if not choices:
                choices = [(h.index, h) for h in await self._free_holders(group, [h for h in taken.values() if h.index < group.max_running], now)]
            if not choices:
                raise LimitReached(group)
            index, previous = random.choice(choices)  # spread claims racing for one group over its free slots
            mine = SlotHolder(index=index, task_id=task_id, lease_token=token, taken_at=now, confirmed=False)
            try:
                if await self._store.take_slot(group, mine, previous):
                    self._full.pop(group, None)
                    return Held(group, mine)
            except StoreUnavailable as exc:
                raise Unavailable(str(exc)) from exc
        # Every free slot went to another claim meanwhile: the group is full
        # for now, and the task waits like any other over its limit. Never
        # UNAVAILABLE: nothing is unavailable, and a worker answered that
        # leaves this TaskUpdater (``worker.updater_client``).
        raise LimitReached(group)

    async def _free_holders(self, group: SlotGroup, holders: list[SlotHolder], now: int) -> list[SlotHolder]:
        """The holders of a full group whose task no longer runs under their token."""
        seen = frozenset((h.index, h.task_id, h.lease_token) for h in holders)
        last = self._full.get(group)
        if last is not None and last[1] == seen and time.monotonic() - last[0] < self._full_memory_s:
            return []

        async def free(h: SlotHolder) -> bool:
            if not h.confirmed:
                return holder_is_free(h, None, None, now)
            try:
                task = await self._store.get_task(h.task_id)
            except UnreadableTask:
                return False  # its quarantine decides; until then it counts as running
            if task is None:
                return True
            return holder_is_free(h, task.status == TaskStatus.RUNNING, task.lease_token, now)

        try:
            verdicts = await asyncio.gather(*(free(h) for h in holders))
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        found = [h for h, ok in zip(holders, verdicts) if ok]
        if not found:
            if len(self._full) >= MAX_GATE_CAPS:
                self._full.clear()  # a memory of busy groups only: forgetting costs a read each
            self._full[group] = (time.monotonic(), seen)
        return found
