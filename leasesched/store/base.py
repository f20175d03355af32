"""The store interface: every read and write of task state goes through it.

Two backends implement it: ``cassandra.CassandraStore`` (the product) and
``memory.MemoryStore`` (pure unit tests of the logic above the store only).

The interface is deliberately small and mechanical. Policy (what a failure
means, when to retry, which transition is legal) lives in
``leasesched.lifecycle``; the store only knows how to make one conditional
write atomic and how to tell for sure whether it was applied.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from leasesched.model import DueEntry, Task
from leasesched.states import TaskStatus


class StoreError(Exception):
    """Base of every error the store raises."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or did not answer in time; nothing is known
    to have been written (a conditional write with unknown outcome is resolved
    by a serial read before this is raised)."""


@dataclass(frozen=True)
class Expect:
    """The condition of a conditional write: the state the writer read.

    ``lease_token`` fences: a write by the holder of an older lease never
    applies. ``cancel_requested`` lets a heartbeat fail fast (and so learn of a
    cancel) in the same round trip.
    """

    status: TaskStatus
    lease_token: int | None = None
    cancel_requested: bool | None = None
    namespace: str | None = None  # a worker may only touch its own namespace's tasks


@dataclass(frozen=True)
class CasResult:
    applied: bool
    # The values the store holds now for the columns of the condition, when
    # not applied (what Cassandra returns with a failed lightweight transaction).
    current_status: TaskStatus | None = None
    current_lease_token: int | None = None
    current_cancel_requested: bool | None = None
    current_namespace: str | None = None
    exists: bool = True


@dataclass(frozen=True)
class IdempotencyRecord:
    task_id: uuid.UUID
    request_hash: bytes


@dataclass(frozen=True)
class Page:
    tasks: list[Task]
    next_token: str = ""


@dataclass
class ListQuery:
    namespace: str
    status: TaskStatus | None = None
    page_size: int = 100
    page_token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class TaskStore(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    # -- tasks --
    async def insert_task(self, task: Task, new_id: bool = False) -> bool:
        """Create the row if absent (conditional). False: the id already exists.

        ``new_id``: the id was drawn for this call and never handed out, so the
        row cannot exist yet; the store may then skip the conditional round
        (always returns True)."""
        ...

    async def get_task(self, task_id: uuid.UUID, serial: bool = False) -> Task | None: ...

    async def update_task(self, task_id: uuid.UUID, expect: Expect, changes: dict[str, Any]) -> CasResult:
        """Apply ``changes`` (Task field → value) only if ``expect`` holds."""
        ...

    async def list_tasks(self, query: ListQuery) -> Page: ...

    # -- idempotency keys --
    async def claim_idempotency_key(
        self, namespace: str, key: str, record: IdempotencyRecord
    ) -> IdempotencyRecord | None:
        """Bind key → record if the key is new (conditional). Returns the
        existing record when the key was already bound, else None."""
        ...

    # -- due index --
    async def add_due(self, entry: DueEntry) -> None: ...

    async def read_due(self, shard: int, from_ms: int, to_ms: int, bucket_s: int) -> list[DueEntry]:
        """Entries with from_ms <= due_at <= to_ms, oldest first."""
        ...

    async def delete_due(self, entry: DueEntry, bucket_s: int) -> None: ...

    # -- trigger checkpoints --
    async def get_checkpoint(self, shard: int) -> int | None: ...

    async def set_checkpoint(self, shard: int, at_ms: int) -> None: ...
