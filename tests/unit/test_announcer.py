"""What a trigger publishes in its registration (pure logic, no ZooKeeper):
the dispatcher reports its subscribed workers, and the announcer writes the
newest shards and workers one write at a time, retrying after a failure."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest

from tests.unit import waiting
from trigger import announcer as announcer_module
from trigger.announcer import Announcer
from trigger.dispatcher import Dispatcher, Ready

wait_until = functools.partial(waiting.wait_until, timeout_s=5.0)


async def _never_checked(ready: Ready) -> bool:
    raise AssertionError("no claim check expected")


class Registration:
    """Records every write; the first ``failures`` writes raise; a write waits
    for ``gate`` (a slow ZooKeeper); two writes at once fail the test."""

    def __init__(self, failures: int = 0) -> None:
        self.writes: list[dict[str, Any]] = []
        self.failures = failures
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self._busy = threading.Lock()

    def update(self, data: dict[str, Any]) -> None:
        assert self._busy.acquire(blocking=False), "two writes at the same time"
        try:
            self.entered.set()
            assert self.gate.wait(5), "gate never opened"
            if self.failures:
                self.failures -= 1
                raise ConnectionError("ZooKeeper away")
            self.writes.append(data)
        finally:
            self._busy.release()


async def stuck_in_first_write(shards: list[int]) -> tuple[Announcer, Registration]:
    """A started announcer whose first write (of ``shards``) is under way and held at the gate."""
    announcer = Announcer()
    registration = Registration()
    registration.gate.clear()
    announcer.start(registration)
    announcer.set_shards(shards)
    await wait_until(registration.entered.is_set)
    return announcer, registration


async def test_dispatcher_reports_the_subscribed_workers_once_per_worker() -> None:
    seen: list[set[str]] = []
    dispatcher = Dispatcher(1.0, _never_checked, on_workers=seen.append)
    a1 = dispatcher.connect("worker-a", "ns", frozenset({"t"}), 1)
    a2 = dispatcher.connect("worker-a", "ns", frozenset({"t"}), 1)  # a second stream of the same worker
    b = dispatcher.connect("worker-b", "ns", frozenset({"t"}), 1)
    assert seen[-1] == {"worker-a", "worker-b"}
    dispatcher.disconnect(a1)
    assert seen[-1] == {"worker-a", "worker-b"}  # worker-a still has a stream
    dispatcher.disconnect(a2)
    assert seen[-1] == {"worker-b"}
    dispatcher.disconnect(b)
    assert seen[-1] == set()


async def test_announcer_writes_changes_made_before_start_first() -> None:
    announcer = Announcer()
    announcer.set_shards({3, 1, 2})
    announcer.set_workers(["w2", "w1", "w1"])
    registration = Registration()
    announcer.start(registration)
    try:
        await wait_until(lambda: registration.writes)
        assert registration.writes[0] == {"shards": [1, 2, 3], "workers": ["w1", "w2"]}
    finally:
        await announcer.stop()


async def test_changes_during_a_slow_write_end_in_one_write_of_the_newest_state() -> None:
    announcer, registration = await stuck_in_first_write([0])
    try:
        for n in range(2, 30):
            announcer.set_shards(range(n))
            announcer.set_workers([f"w{i}" for i in range(n % 4)])
        registration.gate.set()
        newest = {"shards": list(range(29)), "workers": ["w0"]}
        await wait_until(lambda: len(registration.writes) == 2)
        assert registration.writes == [{"shards": [0], "workers": []}, newest]
    finally:
        await announcer.stop()


async def test_announcer_retries_a_failed_write_with_the_newest_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(announcer_module, "RETRY_S", 0.01)
    announcer = Announcer()
    registration = Registration(failures=2)
    announcer.start(registration)
    try:
        announcer.set_shards([5])
        await wait_until(lambda: registration.failures == 0)
        announcer.set_workers(["w9"])
        await wait_until(lambda: registration.writes and registration.writes[-1] == {"shards": [5], "workers": ["w9"]})
    finally:
        await announcer.stop()


async def test_stop_waits_for_the_write_under_way_and_writes_nothing_after() -> None:
    announcer, registration = await stuck_in_first_write([1])
    announcer.set_shards([1, 2])  # pending behind the stuck write
    stopping = asyncio.ensure_future(announcer.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # still waiting for the write under way
    registration.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert registration.writes == [{"shards": [1], "workers": []}]  # the pending change was not written after stop
