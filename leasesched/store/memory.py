"""An in-memory store with the same conditional semantics as Cassandra's LWTs.

For pure unit tests of the logic above the store only: nothing that claims to
test storage, leases or sharding may use it. ``fail_next`` injects a
StoreUnavailable into the named operation, to test crash points; ``reads``
counts task-row reads, for tests of code whose point is to avoid them.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from leasesched.model import DueEntry, Task
from leasesched.store.base import CasResult, Expect, IdempotencyRecord, ListQuery, Page, StoreUnavailable


class MemoryStore:
    def __init__(self) -> None:
        self.tasks: dict[uuid.UUID, Task] = {}
        self.keys: dict[tuple[str, str], IdempotencyRecord] = {}
        self.due: set[DueEntry] = set()
        self.checkpoints: dict[int, int] = {}
        self.fail_next: set[str] = set()
        self.reads = 0  # get_task calls

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail_next:
            self.fail_next.discard(op)
            raise StoreUnavailable(f"injected failure in {op}")

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def insert_task(self, task: Task, new_id: bool = False) -> bool:
        self._maybe_fail("insert_task")
        if task.task_id in self.tasks:
            return False
        self.tasks[task.task_id] = copy.deepcopy(task)
        return True

    async def get_task(self, task_id: uuid.UUID, serial: bool = False) -> Task | None:
        self._maybe_fail("get_task")
        self.reads += 1
        task = self.tasks.get(task_id)
        return copy.deepcopy(task) if task else None

    async def update_task(self, task_id: uuid.UUID, expect: Expect, changes: dict[str, Any]) -> CasResult:
        self._maybe_fail("update_task")
        task = self.tasks.get(task_id)
        if task is None:
            return CasResult(applied=False, exists=False)
        ok = task.status == expect.status
        ok = ok and (expect.lease_token is None or task.lease_token == expect.lease_token)
        ok = ok and (expect.cancel_requested is None or task.cancel_requested == expect.cancel_requested)
        ok = ok and (expect.namespace is None or task.namespace == expect.namespace)
        if not ok:
            return CasResult(False, task.status, task.lease_token, task.cancel_requested, task.namespace)
        self.tasks[task_id] = task.replace(**changes)
        return CasResult(applied=True)

    async def list_tasks(self, query: ListQuery) -> Page:
        rows = sorted(
            (t for t in self.tasks.values() if t.namespace == query.namespace),
            key=lambda t: (t.created_at, t.task_id.int),
            reverse=True,
        )
        rows = [t for t in rows if query.status is None or t.status == query.status]
        start = int(query.page_token or 0)
        page = rows[start : start + query.page_size]
        more = start + query.page_size < len(rows)
        return Page([copy.deepcopy(t) for t in page], str(start + query.page_size) if more else "")

    async def claim_idempotency_key(self, namespace: str, key: str, record: IdempotencyRecord) -> IdempotencyRecord | None:
        self._maybe_fail("claim_idempotency_key")
        existing = self.keys.get((namespace, key))
        if existing is None:
            self.keys[(namespace, key)] = record
        return existing

    async def add_due(self, entry: DueEntry) -> None:
        self._maybe_fail("add_due")
        self.due.add(entry)

    async def read_due(self, shard: int, from_ms: int, to_ms: int, bucket_s: int) -> list[DueEntry]:
        return sorted((e for e in self.due if e.shard == shard and from_ms <= e.due_at <= to_ms), key=lambda e: e.due_at)

    async def delete_due(self, entry: DueEntry, bucket_s: int) -> None:
        self.due.discard(entry)

    async def get_checkpoint(self, shard: int) -> int | None:
        return self.checkpoints.get(shard)

    async def set_checkpoint(self, shard: int, at_ms: int) -> None:
        self.checkpoints[shard] = at_ms
