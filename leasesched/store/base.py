"""The store interface: every read and write of task state goes through it.

Two backends implement it: ``cassandra.CassandraStore`` (the product) and
``memory.MemoryStore`` (pure unit tests of the logic above the store only).

The interface is deliberately small and mechanical. Policy (what a failure
means, when to retry, which transition is legal) lives in
``leasesched.lifecycle``; the store only knows how to make one conditional
write atomic and how to tell for sure whether it was applied.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from leasesched.changes import TaskChange
from leasesched.concurrency import ConcurrencyLimit, LimitScope, SlotGroup, SlotHolder
from leasesched.gates import Gate
from leasesched.limits import MAX_STORED_TIME_MS, PRIORITY
from leasesched.history import HistoryEntry
from leasesched.model import DueEntry, RetryPolicy, Task, Timeouts
from leasesched.schedules import Schedule
from leasesched.states import TaskStatus
from leasesched.versions import TaskVersion


class StoreError(Exception):
    """Base of every error the store raises."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or did not answer in time; nothing is known
    to have been written (a conditional write with unknown outcome is resolved
    by a serial read before this is raised)."""


class StatementRefused(StoreError):
    """Cassandra answered that a statement is invalid (a syntax error, an
    unknown column, a batch over its size limit): a bug here, not an outage.
    Never answered UNAVAILABLE, which clients retry; it surfaces as INTERNAL."""


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with a stored task row, and how the quarantine repairs it.

    ``reason`` is a short fixed word (a metric label: bounded cardinality);
    ``repair`` is the value the quarantine writes to ``column`` (None = null).
    """

    column: str
    value: Any
    reason: str
    repair: Any

    def describe(self) -> str:
        return f"{self.column}={self.value!r} ({self.reason})"


@dataclass(frozen=True)
class RawCondition:
    """What the quarantine's conditional write expects: the row exactly as it
    was read, in raw column values (an unreadable row's status may be no
    ``TaskStatus`` at all, or null). ``write_id`` changes with every
    conditional write, so any change made since the read makes it fail."""

    status: str | None
    lease_token: int | None
    write_id: uuid.UUID | None


class UnreadableTask(StoreError):
    """A task row exists but breaks what the scheduler relies on (an unknown
    status, a time past year 9999, a priority out of range, a missing column).

    Raised by ``get_task`` (and carried by ``list_tasks``'s page) instead of a
    half-built ``Task``: the caller (``Lifecycle``, the one writer of state)
    quarantines it with one conditional write (``TaskStore.quarantine_task``)
    and reads it again.
    """

    def __init__(
        self,
        task_id: uuid.UUID,
        problems: tuple[RowProblem, ...],
        expect: RawCondition,
        status: TaskStatus | None,
    ) -> None:
        super().__init__(f"task {task_id} is unreadable: {'; '.join(p.describe() for p in problems)}")
        self.task_id = task_id
        self.problems = problems
        self.expect = expect
        self.status = status  # the stored status when it is a known one, else None

    @property
    def repairs(self) -> dict[str, Any]:
        """Column → the value that makes the row readable again."""
        return {p.column: p.repair for p in self.problems}

    @property
    def reason(self) -> str:
        """The first problem's reason: one bounded label per task for the metric."""
        return self.problems[0].reason


def creation_write_id(task_id: uuid.UUID) -> uuid.UUID:
    """The ``write_id`` of a row created by a plain insert (a task without an
    idempotency key): its own id, so that its creator knows it without being
    told. Every conditional write sets a fresh write id (a random prefix per
    process, never a task's id)."""
    return task_id


@dataclass(frozen=True)
class Untouched:
    """The condition of a claim without a read: the row is exactly ``task``
    as TaskService created it (its due hint carried it, ``CreatedTask``).
    ``write_id`` is the one its creation wrote; every conditional write sets
    a fresh one, so while it is still there nothing changed the row since.
    Every field a claim decides on must also be as ``task`` says: a ticket
    that lies, or a task changed since, only makes the write not apply."""

    task: Task
    write_id: uuid.UUID

    def conditions(self) -> dict[str, object]:
        return {"write_id": self.write_id, **_creation_fields(self.task)}

    def holds_for(self, task: Task) -> bool:
        """The fields' part (whether the row was changed since its creation
        is the store's to know: its write id)."""
        return task.task_id == self.task.task_id and _creation_fields(task) == _creation_fields(self.task)


def _creation_fields(t: Task) -> dict[str, object]:
    """Column → value of the creation-row fields a claim decides on: what a
    claim without a read is conditional on, beside the write id."""
    return {
        "attempt": t.attempt,
        "shard": t.shard,
        "type": t.type,
        "priority": t.priority,
        "lease_ms": t.lease_ms,
        "run_at": t.run_at,
        "deadline_at": t.deadline_at,
        "schedule_to_start_ms": t.timeouts.schedule_to_start_ms,
        "start_to_close_ms": t.timeouts.start_to_close_ms,
        "concurrency_key": t.concurrency_key,
        "gate": t.gate,
    }


@dataclass(frozen=True)
class Expect:
    """The condition of a conditional write: the state the writer read.

    ``lease_token`` fences: a write by the holder of an older lease never
    applies. ``version``: an operator's action, conditional on every column
    of the version it read (``leasesched.versions``); its status and lease
    token must equal ``status`` and ``lease_token``.
    """

    status: TaskStatus
    lease_token: int | None = None
    namespace: str | None = None  # a worker may only touch its own namespace's tasks
    version: TaskVersion | None = None
    untouched: Untouched | None = None  # a claim without a read (``Untouched``)

    def conditions(self) -> dict[str, object]:
        """Column → the value the write expects (status as its text, times as ms,
        None: null), in a fixed order: what a store puts in its condition."""
        conds: dict[str, object] = {"status": self.status.value}
        if self.lease_token is not None:
            conds["lease_token"] = self.lease_token
        if self.namespace is not None:
            conds["namespace"] = self.namespace
        if self.version is not None:
            conds.update(
                attempt=self.version.attempt,
                run_at=self.version.run_at,
                cancel_requested=self.version.cancel_requested,
                finished_at=self.version.finished_at,
            )
        if self.untouched is not None:
            conds.update(self.untouched.conditions())
        return conds

    def holds_for(self, task: Task) -> bool:
        """Whether this condition is true of ``task``."""
        return (
            task.status == self.status
            and (self.lease_token is None or task.lease_token == self.lease_token)
            and (self.namespace is None or task.namespace == self.namespace)
            and (self.version is None or self.version.holds_for(task))
            and (self.untouched is None or self.untouched.holds_for(task))
        )


@dataclass(frozen=True)
class CasResult:
    applied: bool
    # The values the store holds now for the columns of the condition, when
    # not applied (what Cassandra returns with a failed lightweight transaction).
    current_status: TaskStatus | None = None
    current_lease_token: int | None = None
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
    # Rows of this page that could not be read, with the position each holds
    # in the page (ascending): the lifecycle quarantines them and puts the
    # re-read tasks back there. They count toward the page size.
    unreadable: list[tuple[int, UnreadableTask]] = field(default_factory=list)
    # Listing-index rows examined for this page (filters read more rows than
    # they return): what CountTasks reports and bounds.
    scanned: int = 0


@dataclass
class ListQuery:
    namespace: str
    status: TaskStatus | None = None
    page_size: int = 100
    page_token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # A page ends early once its tasks' listed size reaches this many bytes
    # (0 = no limit): a page of 1 MiB results must still fit one gRPC message.
    max_bytes: int = 0
    # "" = every type. Like ``status``, tested on each row as read (the
    # listing index does not hold it): a bounded scan per page.
    type: str = ""
    # created_after <= created_at < created_before (ms; None = open). Part of
    # the listing index's key: only the days and rows in range are read.
    created_after: int | None = None
    created_before: int | None = None

    def in_range(self, created_at: int) -> bool:
        """Whether ``created_at`` lies in the query's time range."""
        return (self.created_after is None or created_at >= self.created_after) and (
            self.created_before is None or created_at < self.created_before
        )

    def matches(self, task: Task) -> bool:
        """Whether ``task`` passes the filters (status, type, time range)."""
        return (
            (self.status is None or task.status == self.status)
            and (not self.type or task.type == self.type)
            and self.in_range(task.created_at)
        )


@dataclass(frozen=True)
class FailedCounts:
    """FAILED tasks per type, counted from the dead-letter index
    (``TaskStore.count_failed``). ``exact``: every entry was read (False: the
    bound was reached and the counts are lower bounds)."""

    counts: dict[str, int]
    scanned: int
    exact: bool


class TaskStore(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    # -- tasks --
    async def insert_task(self, task: Task, new_id: bool = False, write_id: uuid.UUID | None = None) -> bool:
        """Create the row if absent (conditional). False: the id already exists.

        ``new_id``: the id was drawn for this call and never handed out, so the
        row cannot exist yet; the store may then skip the conditional round
        (always returns True). ``write_id``: the created row's write id (see
        ``Untouched``); None: ``creation_write_id`` for a new id, a fresh one
        otherwise."""
        ...

    async def get_task(self, task_id: uuid.UUID, serial: bool = False) -> Task | None:
        """The task, or None. Raises ``UnreadableTask`` for a row that exists
        but cannot be trusted (see ``task_from_row``)."""
        ...

    async def update_task(self, task_id: uuid.UUID, expect: Expect, change: TaskChange) -> CasResult:
        """Write the set fields of ``change`` (``TaskChange.set_fields``: Task
        field → value, None = null) only if ``expect`` holds; its unset
        fields are not written."""
        ...

    async def list_tasks(self, query: ListQuery) -> Page: ...

    async def quarantine_task(self, task_id: uuid.UUID, expect: RawCondition, columns: dict[str, Any]) -> bool:
        """Write raw ``columns`` (status as text, times as ms) to a row that
        ``get_task`` found unreadable, only if its status, lease token and
        write id are still ``expect`` (one conditional write). Only the
        lifecycle calls it. False: the row changed since it was read."""
        ...

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

    # -- shared secrets --
    async def cluster_secret(self, name: str) -> bytes:
        """A random secret shared by every process of the cluster, made once."""
        ...

    # -- schedules (each change conditional on the stored version) --
    async def insert_schedule(self, schedule: Schedule) -> bool:
        """Create it if its id is free in its namespace. False: the id is taken."""
        ...

    async def get_schedule(self, namespace: str, schedule_id: str, serial: bool = False) -> Schedule | None: ...

    async def update_schedule(self, schedule: Schedule, expected_version: int, definition: bool = True) -> bool:
        """Write ``schedule`` only if the stored version is ``expected_version``:
        its state and version, and its definition unless ``definition`` is False."""
        ...

    async def delete_schedule(self, namespace: str, schedule_id: str, expected_version: int) -> bool: ...

    async def list_schedules(self, namespace: str, after_id: str, limit: int) -> list[Schedule]: ...

    # -- gates (leasesched.gates; every change conditional) --
    async def insert_gate(self, gate: Gate) -> bool:
        """Create it if its name is free in its namespace. False: it exists."""
        ...

    async def get_gate(self, namespace: str, name: str, serial: bool = False) -> Gate | None: ...

    async def update_gate(self, gate: Gate, expected: Gate) -> bool:
        """Write ``gate``'s definition, switches and version only if the stored
        version and closed_until are still ``expected``'s (a close landing in
        between is never overwritten)."""
        ...

    async def reserve_gate(self, expected: Gate, tat_us: int, ramp_from_ms: int) -> bool:
        """Take tokens: write the new TAT (and ramp start) only if version, TAT
        and closed_until are still ``expected``'s. False: someone else moved it."""
        ...

    async def close_gate(self, namespace: str, name: str, until_ms: int) -> bool:
        """Raise closed_until to ``until_ms`` (never lowers it: a max, so
        repeating it is harmless). False: there is no such gate."""
        ...

    async def delete_gate(self, namespace: str, name: str, expected_version: int) -> bool: ...

    async def list_gates(self, namespace: str, after: str, limit: int) -> list[Gate]: ...

    # -- concurrency limits: definitions (leasesched.concurrency; every change conditional) --
    async def insert_limit(self, limit: ConcurrencyLimit) -> bool:
        """Create it if no limit of that (namespace, scope, name) exists. False: it exists."""
        ...

    async def get_limit(self, namespace: str, scope: LimitScope, name: str) -> ConcurrencyLimit | None: ...

    async def update_limit(self, limit: ConcurrencyLimit, expected_version: int) -> bool:
        """Write it (its max_running, version and updated_at) only if the stored version is ``expected_version``."""
        ...

    async def delete_limit(self, namespace: str, scope: LimitScope, name: str, expected_version: int) -> bool:
        """Delete it; ``expected_version`` 0 = whatever it is. False: none, or another version."""
        ...

    async def list_limits(self, namespace: str | None) -> list[ConcurrencyLimit]:
        """The limits of one namespace, or of every namespace (None): what the
        claim path caches. Ordered by namespace, scope, name."""
        ...

    # -- concurrency limits: slots (one partition per group; every change conditional) --
    async def read_slots(self, group: SlotGroup) -> list[SlotHolder]:
        """The taken slots of a group, any index (also past max_running after a limit was lowered)."""
        ...

    async def take_slot(self, group: SlotGroup, holder: SlotHolder, previous: SlotHolder | None) -> bool:
        """Take slot ``holder.index`` for ``holder`` if it is free (``previous`` None)
        or still held by exactly ``previous`` (a takeover)."""
        ...

    async def confirm_slot(self, group: SlotGroup, holder: SlotHolder) -> bool:
        """Mark the slot confirmed if ``holder`` (task and token) still holds it."""
        ...

    async def free_slot(self, group: SlotGroup, holder: SlotHolder) -> bool:
        """Give the slot back if ``holder`` (task and token) still holds it."""
        ...

    # -- task history (leasesched/history.py) --
    async def add_history(self, entry: HistoryEntry) -> None:
        """Write one history entry (plain write; an ATTEMPT entry with the same
        task and lease token overwrites the earlier one)."""
        ...

    async def read_history(self, task_id: uuid.UUID, limit: int) -> list[HistoryEntry]:
        """The task's newest ``limit`` entries, newest first."""
        ...

    # -- dead letters: the index of FAILED tasks (migration 013) --
    async def add_failed(self, task: Task) -> None:
        """Note ``task`` (FAILED now) in the dead-letter index: a plain,
        idempotent write keyed by (namespace, type, task id), so writing it
        twice (a retried report) counts once."""
        ...

    async def remove_failed(self, task: Task) -> None:
        """Take ``task`` out of the dead-letter index (it left FAILED)."""
        ...

    async def count_failed(self, namespace: str, type_: str, limit: int) -> FailedCounts:
        """FAILED tasks of ``namespace`` per type (only ``type_`` unless ""),
        reading at most ``limit`` index entries."""
        ...

    async def trim_history(self, task_id: uuid.UUID, keep: int) -> None:
        """Remove the task's entries older than its newest ``keep`` (plain
        statements: a read of ``keep`` keys, then one range delete). The
        caller decides when it is worth it (``leasesched.attempt_history``)."""
        ...

    # -- trigger checkpoints --
    async def get_checkpoint(self, shard: int) -> int | None: ...

    async def set_checkpoint(self, shard: int, at_ms: int) -> None: ...


# ---------------------------------------------------------------- reading rows

# The time columns of ``tasks``, read as integers of milliseconds.
TIME_COLUMNS = (
    "lease_expires_at",
    "created_at",
    "run_at",
    "first_run_at",
    "started_at",
    "finished_at",
    "deadline_at",
    "nominal_time",
)
_DEFAULT_RETRY = RetryPolicy()
_DEFAULT_LEASE_MS = Task.__dataclass_fields__["lease_ms"].default


def row_problems(row: Any) -> list[RowProblem]:
    """What is wrong with a raw ``tasks`` row (attributes named as its columns,
    times as integers of ms): every value the scheduler computes with or
    relies on, checked against what the product itself ever writes. Cheap
    (a few comparisons), so it runs on every read."""
    problems: list[RowProblem] = []

    def bad(column: str, reason: str, repair: Any) -> None:
        problems.append(RowProblem(column, getattr(row, column), reason, repair))

    if row.status not in _STATUS_VALUES:
        bad("status", "status", TaskStatus.FAILED.value)
    for column in ("namespace", "type"):
        if getattr(row, column) is None:
            bad(column, "missing", "")
    if row.shard is None or row.shard < 0:
        bad("shard", "missing", 0)
    for column in TIME_COLUMNS:
        value = getattr(row, column)
        if value is not None and not 0 <= value <= MAX_STORED_TIME_MS:
            bad(column, "time", None)
    if row.priority is None or not PRIORITY.low <= row.priority <= PRIORITY.high:
        bad("priority", "priority", 5)
    if row.attempt is None or row.attempt < 1:
        bad("attempt", "attempt", 1)
    if row.max_attempts is None or row.max_attempts < 1:
        bad("max_attempts", "retry_policy", 1)
    if row.lease_ms is None or row.lease_ms <= 0:
        bad("lease_ms", "lease", _DEFAULT_LEASE_MS)
    if row.lease_token is not None and row.lease_token < 0:
        bad("lease_token", "lease", 0)
    for column, default in (
        ("retry_initial_ms", _DEFAULT_RETRY.initial_interval_ms),
        ("retry_max_ms", _DEFAULT_RETRY.maximum_interval_ms),
    ):
        value = getattr(row, column)
        if value is None or value < 0:
            bad(column, "retry_policy", default)
    coefficient = row.retry_coefficient
    if coefficient is None or not math.isfinite(coefficient) or coefficient < 1.0:
        bad("retry_coefficient", "retry_policy", _DEFAULT_RETRY.backoff_coefficient)
    for column in ("schedule_to_start_ms", "start_to_close_ms", "schedule_to_close_ms"):
        value = getattr(row, column)
        if value is not None and value < 0:
            bad(column, "timeouts", 0)
    return problems


_STATUS_VALUES = frozenset(s.value for s in TaskStatus)


def task_from_row(row: Any) -> Task:
    """A ``Task`` from a raw ``tasks`` row, or ``UnreadableTask`` naming every
    problem: never a half-valid Task that fails later, somewhere else."""
    problems = row_problems(row)
    if problems:
        known = TaskStatus(row.status) if row.status in _STATUS_VALUES else None
        expect = RawCondition(status=row.status, lease_token=row.lease_token, write_id=row.write_id)
        raise UnreadableTask(row.task_id, tuple(problems), expect, known)
    return Task(
        task_id=row.task_id,
        namespace=row.namespace,
        type=row.type,
        payload=row.payload or b"",
        shard=row.shard,
        priority=row.priority,
        status=TaskStatus(row.status),
        attempt=row.attempt,
        retry=RetryPolicy(
            initial_interval_ms=row.retry_initial_ms,
            backoff_coefficient=row.retry_coefficient,
            maximum_interval_ms=row.retry_max_ms,
            maximum_attempts=row.max_attempts,
            non_retryable_error_types=tuple(row.non_retryable or ()),
        ),
        timeouts=Timeouts(
            schedule_to_start_ms=row.schedule_to_start_ms or 0,
            start_to_close_ms=row.start_to_close_ms or 0,
            schedule_to_close_ms=row.schedule_to_close_ms or 0,
        ),
        lease_ms=row.lease_ms,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        lease_token=row.lease_token or 0,
        progress_percent=row.progress_percent or 0.0,
        progress_message=row.progress_message or "",
        result=row.result or b"",
        error=row.error or "",
        error_type=row.error_type or "",
        cancel_requested=bool(row.cancel_requested),
        created_at=row.created_at or 0,
        run_at=row.run_at or 0,
        first_run_at=row.first_run_at or 0,
        started_at=row.started_at,
        finished_at=row.finished_at,
        deadline_at=row.deadline_at,
        schedule_id=row.schedule_id or "",
        nominal_time=row.nominal_time,
        concurrency_key=row.concurrency_key or "",
        gate=getattr(row, "gate", None) or "",
        lease_losses=getattr(row, "lease_losses", None) or 0,  # null: a row from before migration 011
    )
