"""An in-memory store with the same conditional semantics as Cassandra's LWTs.

For pure unit tests of the logic above the store only: nothing that claims to
test storage, leases or sharding may use it. ``fail_next`` injects a
StoreUnavailable into the named operation, to test crash points; ``reads``
counts task-row reads, for tests of code whose point is to avoid them.
``put_raw`` stores a task as a raw row (columns as Cassandra holds them,
times as ms) that may break what the scheduler relies on, to test how an
unreadable row is quarantined.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import uuid
from typing import Any

from leasesched.changes import TaskChange
from leasesched.concurrency import ConcurrencyLimit, LimitKey, LimitScope, SlotGroup, SlotHolder
from leasesched.gates import Gate
from leasesched.history import HistoryEntry
from leasesched.model import DueEntry, Task, listed_size
from leasesched.schedules import Schedule
from leasesched.states import TaskStatus
from leasesched.store.base import (
    CasResult,
    Expect,
    FailedCounts,
    IdempotencyRecord,
    ListQuery,
    Page,
    RawCondition,
    StoreUnavailable,
    UnreadableTask,
    creation_write_id,
    task_from_row,
)
from leasesched.store.page_token import DAY_MS, decode_token, encode_token
from leasesched.store.schedule_codec import dump_definition, dump_state, load_definition, load_state


def raw_row(task: Task, **overrides: Any) -> types.SimpleNamespace:
    """``task`` as the raw ``tasks`` row the Cassandra store reads (status as
    text, times as ms, the retry policy and timeouts in their own columns),
    with ``overrides`` (column → raw value) applied."""
    row = types.SimpleNamespace(
        task_id=task.task_id,
        namespace=task.namespace,
        type=task.type,
        payload=task.payload,
        shard=task.shard,
        priority=task.priority,
        status=task.status.value,
        attempt=task.attempt,
        max_attempts=task.retry.maximum_attempts,
        retry_initial_ms=task.retry.initial_interval_ms,
        retry_coefficient=task.retry.backoff_coefficient,
        retry_max_ms=task.retry.maximum_interval_ms,
        non_retryable=list(task.retry.non_retryable_error_types),
        schedule_to_start_ms=task.timeouts.schedule_to_start_ms,
        start_to_close_ms=task.timeouts.start_to_close_ms,
        schedule_to_close_ms=task.timeouts.schedule_to_close_ms,
        lease_ms=task.lease_ms,
        lease_owner=task.lease_owner,
        lease_expires_at=task.lease_expires_at,
        lease_token=task.lease_token,
        progress_percent=task.progress_percent,
        progress_message=task.progress_message,
        result=task.result,
        error=task.error,
        error_type=task.error_type,
        cancel_requested=task.cancel_requested,
        created_at=task.created_at,
        run_at=task.run_at,
        first_run_at=task.first_run_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        deadline_at=task.deadline_at,
        schedule_id=task.schedule_id,
        nominal_time=task.nominal_time,
        concurrency_key=task.concurrency_key,
        gate=task.gate,
        lease_losses=task.lease_losses,
        write_id=None,
    )
    for column, value in overrides.items():
        if not hasattr(row, column):
            raise ValueError(f"no column {column!r} in tasks")
        setattr(row, column, value)
    return row


class MemoryStore:
    def __init__(self) -> None:
        self.tasks: dict[uuid.UUID, Task] = {}
        self.keys: dict[tuple[str, str], IdempotencyRecord] = {}
        self.due: set[DueEntry] = set()
        self.checkpoints: dict[int, int] = {}
        self.secrets: dict[str, bytes] = {}
        self.fail_next: set[str] = set()
        self.reads = 0  # get_task calls
        # The write id of rows untouched since their creation (``Untouched``);
        # gone at the row's first conditional write.
        self.creation_write_ids: dict[uuid.UUID, uuid.UUID] = {}
        self.raw: dict[uuid.UUID, types.SimpleNamespace] = {}  # rows kept as stored (see put_raw)
        self.quarantines: list[tuple[uuid.UUID, RawCondition, dict[str, Any], bool]] = []  # (.., applied)
        self.schedules: dict[tuple[str, str], _Stored] = {}
        self.gates: dict[tuple[str, str], Gate] = {}
        self.gate_writes = 0  # conditional writes on gate rows (reservations, closes, changes)
        self.slots: dict[tuple[str, LimitScope, str], dict[int, SlotHolder]] = {}  # group -> index -> row
        self.slot_writes = 0  # conditional writes on slot rows
        self.limits: dict[LimitKey, ConcurrencyLimit] = {}
        self.history: dict[uuid.UUID, dict[tuple[int, str], HistoryEntry]] = {}
        self.failed: dict[tuple[str, str, uuid.UUID], int] = {}  # the dead-letter index → failed_at

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail_next:
            self.fail_next.discard(op)
            raise StoreUnavailable(f"injected failure in {op}")

    async def connect(self) -> None:
        pass

    async def add_history(self, entry: HistoryEntry) -> None:
        self._maybe_fail("add_history")
        self.history.setdefault(entry.task_id, {})[(entry.started_at, entry.key)] = entry

    async def read_history(self, task_id: uuid.UUID, limit: int) -> list[HistoryEntry]:
        self._maybe_fail("read_history")
        rows = self.history.get(task_id, {})
        newest_first = sorted(rows.items(), key=lambda item: item[0], reverse=True)  # (time, key) descending, as Cassandra
        return [entry for _, entry in newest_first[:limit]]

    async def trim_history(self, task_id: uuid.UUID, keep: int) -> None:
        self._maybe_fail("trim_history")
        rows = self.history.get(task_id, {})
        if len(rows) <= keep:
            return
        # As the Cassandra store does it: everything strictly older than the keep-th newest entry's time.
        oldest_kept = sorted(key[0] for key in rows)[-keep]
        for key in [k for k in rows if k[0] < oldest_kept]:
            del rows[key]

    async def close(self) -> None:
        pass

    async def insert_task(self, task: Task, new_id: bool = False, write_id: uuid.UUID | None = None) -> bool:
        self._maybe_fail("insert_task")
        if task.task_id in self.tasks:
            return False
        self.tasks[task.task_id] = copy.deepcopy(task)
        if write_id is None:
            write_id = creation_write_id(task.task_id) if new_id else uuid.uuid4()
        self.creation_write_ids[task.task_id] = write_id
        return True

    def put_raw(self, task: Task, **overrides: Any) -> None:
        """Store ``task`` as a raw row with ``overrides`` (e.g. a time past year
        9999): what a direct CQL write or an old version may have left."""
        self.tasks.pop(task.task_id, None)
        self.creation_write_ids.pop(task.task_id, None)
        self.raw[task.task_id] = raw_row(task, **overrides)

    def _settle_raw(self, task_id: uuid.UUID) -> None:
        """A raw row that has become readable is a plain task again."""
        try:
            task = task_from_row(self.raw[task_id])
        except UnreadableTask:
            return
        del self.raw[task_id]
        self.tasks[task_id] = task

    async def get_task(self, task_id: uuid.UUID, serial: bool = False) -> Task | None:
        self._maybe_fail("get_task")
        self.reads += 1
        if task_id in self.raw:
            return task_from_row(copy.deepcopy(self.raw[task_id]))
        task = self.tasks.get(task_id)
        return copy.deepcopy(task) if task else None

    async def quarantine_task(self, task_id: uuid.UUID, expect: RawCondition, columns: dict[str, Any]) -> bool:
        self._maybe_fail("quarantine_task")
        row = self.raw.get(task_id)
        applied = row is not None and (row.status, row.lease_token, row.write_id) == (
            expect.status,
            expect.lease_token,
            expect.write_id,
        )
        self.quarantines.append((task_id, expect, dict(columns), applied))
        if not applied or row is None:
            return False
        for column, value in columns.items():
            setattr(row, column, value)
        row.write_id = uuid.uuid4()
        self._settle_raw(task_id)
        return True

    async def update_task(self, task_id: uuid.UUID, expect: Expect, change: TaskChange) -> CasResult:
        self._maybe_fail("update_task")
        if task_id in self.raw:
            return self._update_raw(task_id, expect, change)
        task = self.tasks.get(task_id)
        if task is None:
            return CasResult(applied=False, exists=False)
        untouched = expect.untouched is None or expect.untouched.write_id == self.creation_write_ids.get(task_id)
        if not expect.holds_for(task) or not untouched:
            return CasResult(False, task.status, task.lease_token, task.namespace)
        self.tasks[task_id] = change.apply(task)
        self.creation_write_ids.pop(task_id, None)  # a new write id
        return CasResult(applied=True)

    def _update_raw(self, task_id: uuid.UUID, expect: Expect, change: TaskChange) -> CasResult:
        """A conditional write on a raw row, as Cassandra would apply it (a
        concurrent writer in tests of the quarantine)."""
        row = self.raw[task_id]
        ok = row.status == expect.status.value
        ok = ok and (expect.lease_token is None or row.lease_token == expect.lease_token)
        ok = ok and (expect.namespace is None or row.namespace == expect.namespace)
        if not ok:
            known = row.status in {s.value for s in TaskStatus}
            return CasResult(
                False, TaskStatus(row.status) if known else None, row.lease_token, row.namespace
            )
        for name, value in change.set_fields().items():
            setattr(row, name, value.value if isinstance(value, TaskStatus) else value)
        row.write_id = uuid.uuid4()
        self._settle_raw(task_id)
        return CasResult(applied=True)

    async def list_tasks(self, query: ListQuery) -> Page:
        """Newest first, with every filter of ``ListQuery``. The token is the
        Cassandra store's cursor format (``page_token.encode_token``: the
        last row returned), so TaskService treats both stores alike; unlike
        Cassandra's, a page here is never cut short by a scan bound."""
        if self.raw:
            return self._list_with_raw(query)
        rows = sorted(
            (t for t in self.tasks.values() if t.namespace == query.namespace),
            key=lambda t: (t.created_at, t.task_id.int),
            reverse=True,
        )
        cursor = decode_token(query.page_token)
        if cursor is not None and cursor.created_at is not None and cursor.task_id is not None:
            position = (cursor.created_at, cursor.task_id.int)
            rows = [t for t in rows if (t.created_at, t.task_id.int) < position]
        examined = len(rows)
        rows = [t for t in rows if query.matches(t)]
        page = rows[: query.page_size]
        size = 0
        for count, task in enumerate(page, 1):
            size += listed_size(task)
            if 0 < query.max_bytes <= size:
                page = page[:count]
                break
        if len(page) == len(rows) or not page:
            return Page([copy.deepcopy(t) for t in page], "", scanned=examined)
        last = page[-1]
        token = encode_token(last.created_at // DAY_MS, last.created_at, last.task_id)
        return Page([copy.deepcopy(t) for t in page], token, scanned=examined)

    def _list_with_raw(self, query: ListQuery) -> Page:
        """``list_tasks`` when raw rows exist: an unreadable one holds its place
        in the page and is handed back in ``Page.unreadable``."""
        rows: list[Task | types.SimpleNamespace] = [t for t in self.tasks.values() if t.namespace == query.namespace]
        rows += [r for r in self.raw.values() if r.namespace == query.namespace]

        def created(item: Task | types.SimpleNamespace) -> int:
            return item.created_at if isinstance(item.created_at, int) else 0

        rows.sort(key=lambda item: (created(item), item.task_id.int), reverse=True)
        cursor = decode_token(query.page_token)
        if cursor is not None and cursor.created_at is not None and cursor.task_id is not None:
            position = (cursor.created_at, cursor.task_id.int)
            rows = [r for r in rows if (created(r), r.task_id.int) < position]
        readable: list[Task | UnreadableTask] = []
        positions: list[tuple[int, uuid.UUID]] = []
        for item in rows:
            try:
                task = item if isinstance(item, Task) else task_from_row(copy.deepcopy(item))
            except UnreadableTask as bad:
                readable.append(bad)
                positions.append((created(item), item.task_id))
                continue
            if query.matches(task):
                readable.append(task)
                positions.append((created(item), item.task_id))
        window = readable[: query.page_size]
        token = ""
        if len(readable) > query.page_size:
            at, task_id = positions[query.page_size - 1]
            token = encode_token(at // DAY_MS, at, task_id)
        return Page(
            [copy.deepcopy(t) for t in window if isinstance(t, Task)],
            token,
            [(i, t) for i, t in enumerate(window) if isinstance(t, UnreadableTask)],
        )

    # -- dead letters
    async def add_failed(self, task: Task) -> None:
        self._maybe_fail("add_failed")
        self.failed[(task.namespace, task.type, task.task_id)] = task.finished_at or 0

    async def remove_failed(self, task: Task) -> None:
        self._maybe_fail("remove_failed")
        self.failed.pop((task.namespace, task.type, task.task_id), None)

    async def count_failed(self, namespace: str, type_: str, limit: int) -> FailedCounts:
        self._maybe_fail("count_failed")
        keys = sorted(k for k in self.failed if k[0] == namespace and (not type_ or k[1] == type_))
        read = keys[:limit]
        counts: dict[str, int] = {}
        for _, task_type, _ in read:
            counts[task_type] = counts.get(task_type, 0) + 1
        return FailedCounts(counts, len(read), exact=len(keys) <= limit)

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

    async def cluster_secret(self, name: str) -> bytes:
        return self.secrets.setdefault(name, os.urandom(32))

    async def get_checkpoint(self, shard: int) -> int | None:
        return self.checkpoints.get(shard)

    async def set_checkpoint(self, shard: int, at_ms: int) -> None:
        self.checkpoints[shard] = at_ms

    # -- schedules: stored encoded, as Cassandra holds them, so the codec is exercised too

    async def insert_schedule(self, schedule: Schedule) -> bool:
        self._maybe_fail("insert_schedule")
        key = (schedule.namespace, schedule.schedule_id)
        if key in self.schedules:
            return False
        self.schedules[key] = _encode(schedule)
        return True

    async def get_schedule(self, namespace: str, schedule_id: str, serial: bool = False) -> Schedule | None:
        self._maybe_fail("get_schedule")
        stored = self.schedules.get((namespace, schedule_id))
        return None if stored is None else _decode(stored)

    async def update_schedule(self, schedule: Schedule, expected_version: int, definition: bool = True) -> bool:
        self._maybe_fail("update_schedule")
        key = (schedule.namespace, schedule.schedule_id)
        stored = self.schedules.get(key)
        if stored is None or stored[0].version != expected_version:
            return False
        if not definition:  # as Cassandra: only the state (and version) is written
            kept = _decode(stored)
            schedule = schedule.replace(spec=kept.spec, action=kept.action, policy=kept.policy)
        self.schedules[key] = _encode(schedule)
        return True

    async def delete_schedule(self, namespace: str, schedule_id: str, expected_version: int) -> bool:
        self._maybe_fail("delete_schedule")
        stored = self.schedules.get((namespace, schedule_id))
        if stored is None or stored[0].version != expected_version:
            return False
        del self.schedules[(namespace, schedule_id)]
        return True

    async def list_schedules(self, namespace: str, after_id: str, limit: int) -> list[Schedule]:
        ids = sorted(sid for ns, sid in self.schedules if ns == namespace and sid > after_id)[:limit]
        return [_decode(self.schedules[(namespace, sid)]) for sid in ids]


    # -- concurrency-limit slots: the same conditions as the Cassandra store's lightweight transactions

    def _slot_rows(self, group: SlotGroup) -> dict[int, SlotHolder]:
        return self.slots.setdefault((group.namespace, group.scope, group.name), {})

    async def read_slots(self, group: SlotGroup) -> list[SlotHolder]:
        self._maybe_fail("read_slots")
        return sorted(self._slot_rows(group).values(), key=lambda h: h.index)

    async def take_slot(self, group: SlotGroup, holder: SlotHolder, previous: SlotHolder | None) -> bool:
        self._maybe_fail("take_slot")
        self.slot_writes += 1
        rows = self._slot_rows(group)
        stored = rows.get(holder.index)
        if previous is None:
            if stored is not None:
                return False
        elif stored is None or (stored.task_id, stored.lease_token) != (previous.task_id, previous.lease_token):
            return False
        rows[holder.index] = holder
        return True

    def _set_if_held(self, group: SlotGroup, holder: SlotHolder, new: SlotHolder) -> bool:
        self.slot_writes += 1
        rows = self._slot_rows(group)
        stored = rows.get(holder.index)
        if stored is None or (stored.task_id, stored.lease_token) != (holder.task_id, holder.lease_token):
            return False
        rows[holder.index] = new
        return True

    async def confirm_slot(self, group: SlotGroup, holder: SlotHolder) -> bool:
        self._maybe_fail("confirm_slot")
        return self._set_if_held(group, holder, dataclasses.replace(holder, confirmed=True))

    async def free_slot(self, group: SlotGroup, holder: SlotHolder) -> bool:
        self._maybe_fail("free_slot")
        return self._set_if_held(group, holder, dataclasses.replace(holder, lease_token=0, confirmed=False))

    # -- gates: the same conditions as the Cassandra store's lightweight transactions

    async def insert_gate(self, gate: Gate) -> bool:
        self._maybe_fail("insert_gate")
        self.gate_writes += 1
        key = (gate.namespace, gate.name)
        if key in self.gates:
            return False
        self.gates[key] = gate
        return True

    async def get_gate(self, namespace: str, name: str, serial: bool = False) -> Gate | None:
        self._maybe_fail("get_gate")
        return self.gates.get((namespace, name))

    async def update_gate(self, gate: Gate, expected: Gate) -> bool:
        self._maybe_fail("update_gate")
        self.gate_writes += 1
        stored = self.gates.get((gate.namespace, gate.name))
        if stored is None or (stored.version, stored.closed_until_ms) != (expected.version, expected.closed_until_ms):
            return False
        self.gates[(gate.namespace, gate.name)] = gate.replace(tat_us=stored.tat_us)
        return True

    async def reserve_gate(self, expected: Gate, tat_us: int, ramp_from_ms: int) -> bool:
        self._maybe_fail("reserve_gate")
        self.gate_writes += 1
        key = (expected.namespace, expected.name)
        stored = self.gates.get(key)
        if stored is None or (stored.version, stored.tat_us, stored.closed_until_ms) != (
            expected.version, expected.tat_us, expected.closed_until_ms,
        ):  # fmt: skip
            return False
        self.gates[key] = stored.replace(tat_us=tat_us, ramp_from_ms=ramp_from_ms)
        return True

    async def close_gate(self, namespace: str, name: str, until_ms: int) -> bool:
        self._maybe_fail("close_gate")
        self.gate_writes += 1
        stored = self.gates.get((namespace, name))
        if stored is None:
            return False
        if stored.closed_until_ms < until_ms:
            self.gates[(namespace, name)] = stored.replace(closed_until_ms=until_ms)
        return True

    async def delete_gate(self, namespace: str, name: str, expected_version: int) -> bool:
        self._maybe_fail("delete_gate")
        stored = self.gates.get((namespace, name))
        if stored is None or stored.version != expected_version:
            return False
        del self.gates[(namespace, name)]
        return True

    async def list_gates(self, namespace: str, after: str, limit: int) -> list[Gate]:
        names = sorted(n for ns, n in self.gates if ns == namespace and n > after)[:limit]
        return [self.gates[(namespace, n)] for n in names]

    # -- concurrency limits: definitions, the same conditions as the Cassandra store's

    async def insert_limit(self, limit: ConcurrencyLimit) -> bool:
        self._maybe_fail("insert_limit")
        key = (limit.namespace, limit.scope, limit.name)
        if key in self.limits:
            return False
        self.limits[key] = limit
        return True

    async def get_limit(self, namespace: str, scope: LimitScope, name: str) -> ConcurrencyLimit | None:
        self._maybe_fail("get_limit")
        return self.limits.get((namespace, scope, name))

    async def update_limit(self, limit: ConcurrencyLimit, expected_version: int) -> bool:
        self._maybe_fail("update_limit")
        key = (limit.namespace, limit.scope, limit.name)
        stored = self.limits.get(key)
        if stored is None or stored.version != expected_version:
            return False
        # Only what the Cassandra UPDATE writes: created_at stays the stored one.
        self.limits[key] = dataclasses.replace(
            stored, max_running=limit.max_running, version=limit.version, updated_at=limit.updated_at
        )
        return True

    async def delete_limit(self, namespace: str, scope: LimitScope, name: str, expected_version: int) -> bool:
        self._maybe_fail("delete_limit")
        stored = self.limits.get((namespace, scope, name))
        if stored is None or (expected_version and stored.version != expected_version):
            return False
        del self.limits[(namespace, scope, name)]
        return True

    async def list_limits(self, namespace: str | None) -> list[ConcurrencyLimit]:
        self._maybe_fail("list_limits")
        found = [v for (ns, _, _), v in self.limits.items() if namespace is None or ns == namespace]
        return sorted(found, key=lambda v: (v.namespace, v.scope.value, v.name))


_Stored = tuple[Schedule, str, str]


def _encode(schedule: Schedule) -> _Stored:
    return schedule, dump_definition(schedule.spec, schedule.action, schedule.policy), dump_state(schedule.state)


def _decode(stored: _Stored) -> Schedule:
    schedule, definition, state = stored
    spec, action, policy = load_definition(definition)
    return schedule.replace(spec=spec, action=action, policy=policy, state=load_state(state))
