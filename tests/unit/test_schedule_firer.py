"""ScheduleFirer.handle: one evaluation of a schedule at a time per trigger, extra entries coalesced."""

from __future__ import annotations

import asyncio
import uuid

from leasesched.model import DueEntry
from trigger.schedule_firer import Pace, ScheduleFirer


class Recording(ScheduleFirer):
    def __init__(self) -> None:  # no store: _handle is replaced
        self._pace = Pace(20)
        self._locks = {}
        self._queued = set()
        self.running = 0
        self.most = 0
        self.handled: list[int] = []
        self.release = asyncio.Event()

    async def _handle(self, entry: DueEntry, scanner: object) -> None:  # type: ignore[override]
        self.running += 1
        self.most = max(self.most, self.running)
        await self.release.wait()
        self.handled.append(entry.due_at)
        self.running -= 1


def entry(uid: uuid.UUID, due_at: int) -> DueEntry:
    return DueEntry(shard=0, due_at=due_at, task_id=uid, kind=DueEntry.SCHEDULE, ref="ns/s")


async def test_entries_of_one_schedule_are_evaluated_one_at_a_time_and_coalesced() -> None:
    firer = Recording()
    uid, other = uuid.uuid4(), uuid.uuid4()
    calls = [asyncio.ensure_future(firer.handle(entry(uid, t), None)) for t in range(1, 6)]  # type: ignore[arg-type]
    calls.append(asyncio.ensure_future(firer.handle(entry(other, 100), None)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert firer.running == 2  # the first entry of each schedule
    firer.release.set()
    await asyncio.gather(*calls)
    # Entry 1 ran, entry 2 waited and ran after it; 3-5 came while 2 waited: done by 2's evaluation.
    assert sorted(firer.handled) == [1, 2, 100]
    assert firer.most == 2
    assert not firer._locks and not firer._queued


async def test_a_waiting_entry_cancelled_does_not_block_later_ones() -> None:
    firer = Recording()
    uid = uuid.uuid4()
    first = asyncio.ensure_future(firer.handle(entry(uid, 1), None))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(firer.handle(entry(uid, 2), None))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.sleep(0.01)
    firer.release.set()
    await first
    await firer.handle(entry(uid, 3), None)  # type: ignore[arg-type]
    assert firer.handled == [1, 3]
    assert not firer._locks and not firer._queued
