"""How full each concurrency-limit group is, for Prometheus (docs/concurrency.md).

The slots of a group are rows in the store, taken and given back by every
TaskUpdater; no process counts them as they change. So the TaskService
samples: every ``interval_s`` it reads the slots of each group it knows of
and exports ``leasesched_limit_running`` beside ``leasesched_limit_max_running``
(``metrics.LimitCollector``). Groups it knows of: every limit with a concrete
name (the namespace, a type, one key), plus — for a namespace's default key
limit ``*``, whose groups are one per key — the keys of tasks this process
scheduled lately (``note_key``, bounded). One read per group per round, at
most ``MAX_GROUPS`` groups: 500 reads every 10 s at worst.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Mapping

from leasesched.admission import LimitTable
from leasesched.concurrency import DEFAULT_KEY, ConcurrencyLimit, LimitKey, LimitScope, SlotGroup
from leasesched.observability import metrics
from leasesched.errors import Unavailable
from leasesched.store.base import TaskStore
from services.slot_use import SlotUse

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 10.0
MAX_GROUPS = metrics.MAX_LIMIT_LABELS
MAX_KEYS = 1_000  # recent (namespace, key) pairs kept for default-key limits


class LimitSampler:
    def __init__(
        self, store: TaskStore, table: LimitTable | None = None, slots: SlotUse | None = None,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:  # fmt: skip
        self._table = table or LimitTable(store)
        self._slots = slots or SlotUse(store)
        self._interval_s = interval_s
        self._keys: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._samples: list[metrics.LimitSample] = []
        self._task: asyncio.Task[None] | None = None

    def note_key(self, namespace: str, key: str) -> None:
        """A task with this concurrency key was scheduled (O(1), on the ScheduleTask path)."""
        if not key:
            return
        self._keys[(namespace, key)] = None
        self._keys.move_to_end((namespace, key))
        if len(self._keys) > MAX_KEYS:
            self._keys.popitem(last=False)

    def samples(self) -> list[metrics.LimitSample]:
        return self._samples

    async def start(self) -> None:
        metrics.limit_status.set_source(self.samples)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # noqa: BLE001 - a metric must never stop the service
                log.warning("concurrency limits not sampled: %s", exc)
            await asyncio.sleep(self._interval_s)

    def groups(self, table: Mapping[LimitKey, ConcurrencyLimit]) -> list[SlotGroup]:
        """The groups to sample: concrete limits, then recent keys under a default."""
        found: list[SlotGroup] = []
        for (namespace, scope, name), limit in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1].value, kv[0][2])):
            if not (scope == LimitScope.KEY and name == DEFAULT_KEY):
                found.append(SlotGroup(namespace, scope, name, limit.max_running))
        for namespace, key in reversed(self._keys):  # the most recent first
            if (namespace, LimitScope.KEY, key) in table:
                continue  # sampled above under its own limit
            default = table.get((namespace, LimitScope.KEY, DEFAULT_KEY))
            if default is not None:
                found.append(SlotGroup(namespace, LimitScope.KEY, key, default.max_running))
        return found[:MAX_GROUPS]

    async def sample(self) -> None:
        table = await self._table.current()
        groups = self.groups(table)
        samples: list[metrics.LimitSample] = []
        for group in groups:
            try:
                running = await self._slots.taken(group)
            except Unavailable as exc:
                log.info("slots of %s not sampled: %s", group.label(), exc)
                continue
            samples.append(metrics.LimitSample(group.namespace, group.scope.value, group.name, running, group.max_running))
        self._samples = samples
