"""What a trigger tells ZooKeeper about itself, in its registration: the shards
it owns (TaskService sends due hints to the owner; ``cluster status`` shows
them) and the workers subscribed to it (so operators, and tests, can see that
dispatches can flow instead of guessing from a delay).

Both change on other threads' schedules (kazoo's partitioner, gRPC streams),
so the writes go through one task, one at a time, each with the latest state:
a slow write can never let older data land after newer data, and a burst of
changes costs one write, not one per change. Changes before ``start`` (the
registration needs the server's port, the server needs the dispatcher) are
kept and written first thing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

log = logging.getLogger(__name__)

RETRY_S = 1.0  # after a failed write (ZooKeeper away): try again with whatever is newest then
STOP_WAIT_S = 5.0  # on stop: how long a write under way may take to finish


class Updatable(Protocol):
    def update(self, data: dict[str, Any]) -> None: ...


class Announcer:
    def __init__(self) -> None:
        self._shards: list[int] = []
        self._workers: list[str] = []
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def data(self) -> dict[str, Any]:
        return {"shards": list(self._shards), "workers": list(self._workers)}

    def set_shards(self, owned: Iterable[int]) -> None:
        self._shards = sorted(owned)
        self._dirty.set()

    def set_workers(self, worker_ids: Iterable[str]) -> None:
        workers = sorted(set(worker_ids))
        if workers != self._workers:
            self._workers = workers
            self._dirty.set()

    def start(self, registration: Updatable) -> None:
        self._task = asyncio.create_task(self._run(registration))

    async def stop(self) -> None:
        """Ends the writer, after a write under way: one finishing after the
        registration is closed would create the node again."""
        self._stopping = True
        self._dirty.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, STOP_WAIT_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass

    async def _run(self, registration: Updatable) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._stopping:
                return
            data = self.data()
            try:
                await asyncio.to_thread(registration.update, data)
            except Exception as exc:  # noqa: BLE001 - ZooKeeper trouble: the registration comes back with its session
                log.debug("could not publish %s: %s", data, exc)
                if not self._stopping:
                    await asyncio.sleep(RETRY_S)
                self._dirty.set()
