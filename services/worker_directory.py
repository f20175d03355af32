"""Which task types have a live worker: so a task nobody serves does not wait silently.

A task whose type no worker handles stays SCHEDULED for ever, and nothing said
so (a typo in the type, a worker deployed with the wrong module or namespace).
Workers register in ZooKeeper with their namespace and task types
(``worker.runner``); this directory reads those registrations in the
background, like ``services.due_notifier`` reads the triggers', so a request
never waits on ZooKeeper. PollTask and ListTasks then mark a SCHEDULED task
``no_worker_for_type``, and ScheduleTask counts tasks created for a type no
worker serves (``leasesched_tasks_scheduled_without_worker``).

The answer is a hint, never a refusal: workers come and go, and a task may be
scheduled before its worker starts. When the registrations could not be read
recently, the directory says "unknown" rather than guess.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kazoo.client import KazooClient

from leasesched.coordination import registry

log = logging.getLogger(__name__)

STALE_AFTER_S = 10.0  # older than this, the directory does not know


class WorkerDirectory:
    def __init__(self, zk: KazooClient, zk_root: str, refresh_s: float = 1.0) -> None:
        self._zk = zk
        self._root = zk_root
        self._refresh_s = refresh_s
        self._served: frozenset[tuple[str, str]] = frozenset()
        self._read_at = -float("inf")  # monotonic time of the last successful read
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - unknown until a read succeeds
            log.info("worker registrations not readable yet: %s", exc)
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except asyncio.CancelledError:
                pass

    def serves(self, namespace: str, task_type: str) -> bool | None:
        """True / False: a live worker does / does not serve the type; None: not known now."""
        if time.monotonic() - self._read_at > STALE_AFTER_S:
            return None
        return (namespace, task_type) in self._served

    async def refresh(self) -> None:
        members = await asyncio.to_thread(registry.members, self._zk, self._root, "worker")
        served: set[tuple[str, str]] = set()
        for data in members.values():
            namespace = data.get("namespace")
            types = data.get("types")
            if isinstance(namespace, str) and isinstance(types, list):
                served.update((namespace, t) for t in types if isinstance(t, str))
        self._served = frozenset(served)
        self._read_at = time.monotonic()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a stale directory only says "unknown"
                log.debug("worker registrations refresh failed: %s", exc)
