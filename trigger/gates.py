"""Taking tokens of gates for the tasks that wait in this trigger's dispatcher.

One pump (an asyncio task) per gate with waiting tasks, and none for a gate
without: a trigger that holds no gated task does no gate work at all. A pump
loops:

1. the gate as last read (read again when older than ``refresh_s``, or after
   a lost race, at SERIAL); a paused or closed gate, or one that does not
   exist, holds its tasks: look again after ``refresh_s`` (or when the close
   ends, if sooner);
2. as many tokens as tasks wait *and* free worker slots can take them, at
   most ``batch``: ``gates.reserve`` on the cached row says how many the GCRA
   allows now, or how long until one is allowed (then sleep, no store call:
   the stored TAT is never behind the cached one, so the cached answer "not
   yet" is right);
3. one conditional write takes them (``reserve_gate``: IF version, TAT and
   closed_until are as read); lost: read again (another trigger took tokens,
   or the gate changed) and decide again;
4. the tasks go to workers at once (``Dispatcher.release_gated``).

So the rate holds for the whole cluster at one LWT per batch, and a token is
never held: it is taken only for a task that goes out in the same step.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable

from leasesched import gates
from leasesched.gates import Gate, GateState
from leasesched.observability.metrics import GateSample
from leasesched.store.base import StoreError, TaskStore
from trigger.dispatcher import Dispatcher, GateKey

log = logging.getLogger(__name__)

# Tokens one conditional write takes at most: more costs fewer LWTs, fewer
# lets two triggers share a small burst more evenly.
DEFAULT_BATCH = 10
# How old a read of a gate may be while its tasks wait for a switch (paused,
# closed, missing) to change: the delay before an unpause is seen.
DEFAULT_REFRESH_S = 1.0
MIN_SLEEP_S = 0.002
MAX_KNOWN = 10_000
WAIT_JITTER = 0.2  # share of the wait for the next token added at random


@dataclass
class _Known:
    gate: Gate | None  # None: no such gate (its tasks wait)
    read_at: float  # monotonic


class GateKeeper:
    def __init__(
        self,
        store: TaskStore,
        dispatcher: Dispatcher,
        batch: int = DEFAULT_BATCH,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._batch = max(1, batch)
        self._refresh_s = refresh_s
        self._clock = clock
        self._known: dict[GateKey, _Known] = {}
        self._pumps: dict[GateKey, asyncio.Task[None]] = {}
        self._wakes: dict[GateKey, asyncio.Event] = {}
        self.reservations = 0  # conditional writes that took tokens (tests, stats)
        self.conflicts = 0  # conditional writes lost to another trigger or a change
        dispatcher.gates = self

    # ------------------------------------------------------------ dispatcher's side

    def wake(self, key: GateKey) -> None:
        event = self._wakes.get(key)
        if event is None:
            event = self._wakes[key] = asyncio.Event()
        event.set()
        if key not in self._pumps:
            self._pumps[key] = asyncio.ensure_future(self._pump(key))

    def wake_all(self) -> None:
        for key in self._dispatcher.gated_keys():
            self.wake(key)

    def stop(self) -> None:
        for pump in self._pumps.values():
            pump.cancel()
        self._pumps.clear()

    def samples(self) -> list[GateSample]:
        """The gates this trigger has read, for the metrics (scrape time)."""
        now_us = int(self._clock() * 1_000_000)
        return [
            GateSample(k[0], k[1], gates.available(known.gate, now_us), known.gate.state(now_us // 1000).value)
            for k, known in list(self._known.items())
            if known.gate is not None
        ]

    # ------------------------------------------------------------ pump

    async def _pump(self, key: GateKey) -> None:
        try:
            while self._dispatcher.gated_waiting(key):
                try:
                    await self._step(key)
                except StoreError as exc:
                    log.warning("gate %s/%s: store error, trying again: %s", key[0], key[1], exc)
                    self._known.pop(key, None)
                    await asyncio.sleep(self._refresh_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a pump must never die silently with tasks waiting
            log.exception("gate %s/%s: pump failed", key[0], key[1])
        finally:
            if self._pumps.get(key) is asyncio.current_task():
                del self._pumps[key]
        # Offered while this pump was ending (no await since the loop's check): start again.
        if self._dispatcher.gated_waiting(key) and key not in self._pumps:
            self.wake(key)

    async def _read(self, key: GateKey, serial: bool = False) -> Gate | None:
        gate = await self._store.get_gate(key[0], key[1], serial=serial)
        if len(self._known) >= MAX_KNOWN and key not in self._known:
            self._known.clear()
        self._known[key] = _Known(gate, time.monotonic())
        return gate

    async def _current(self, key: GateKey) -> Gate | None:
        known = self._known.get(key)
        if known is None or time.monotonic() - known.read_at >= self._refresh_s:
            return await self._read(key)
        return known.gate

    async def _wait(self, key: GateKey, seconds: float) -> None:
        """Sleep ``seconds``, or until woken (new tasks, freed slots)."""
        event = self._wakes.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), max(MIN_SLEEP_S, seconds))
        except asyncio.TimeoutError:
            pass

    async def _step(self, key: GateKey) -> None:
        self._wakes.setdefault(key, asyncio.Event()).clear()  # a wake from here on ends the next _wait early
        gate = await self._current(key)
        now = self._clock()
        now_ms = int(now * 1000)
        if gate is None:
            await asyncio.sleep(self._refresh_s)
            await self._read(key)
            return
        state = gate.state(now_ms)
        if state != GateState.OPEN:
            wait = self._refresh_s
            if state == GateState.CLOSED:
                wait = min(wait, (gate.closed_until_ms - now_ms) / 1000)
            await asyncio.sleep(max(MIN_SLEEP_S, wait))
            await self._read(key)
            return
        free = self._dispatcher.gated_free_slots(key)
        if free <= 0:
            await self._wait(key, self._refresh_s)  # woken when a worker grants slots
            return
        wanted = min(self._batch, self._dispatcher.gated_waiting(key), free)
        now_us = int(now * 1_000_000)
        reservation = gates.reserve(gate, now_us, wanted)
        if reservation.granted == 0:
            # Not yet: sleep until one token is due (the stored TAT is never
            # behind this one, so asking the store could only say the same).
            # A little jitter: two triggers waiting for the same token would
            # otherwise wake together and one conditional write would always lose.
            wait_s = reservation.wait_us / 1_000_000 * (1.0 + random.uniform(0.0, WAIT_JITTER))
            await asyncio.sleep(max(MIN_SLEEP_S, min(wait_s, self._refresh_s)))
            return
        if not await self._store.reserve_gate(gate, reservation.tat_us, reservation.ramp_from_ms):
            self.conflicts += 1
            await self._read(key, serial=True)
            return
        self.reservations += 1
        known = self._known.get(key)
        read_at = known.read_at if known is not None else time.monotonic()
        self._known[key] = _Known(gate.replace(tat_us=reservation.tat_us, ramp_from_ms=reservation.ramp_from_ms), read_at)
        sent = self._dispatcher.release_gated(key, reservation.granted)
        if sent < reservation.granted:
            log.debug("gate %s/%s: %d of %d tokens unused (slots went meanwhile)", key[0], key[1], reservation.granted - sent, reservation.granted)
