"""The Cassandra backend of the store: the only module that speaks CQL.

Rules this module keeps so that the rest of the code need not know them:

* every change of a ``tasks`` row is a lightweight transaction. The one plain
  write to that table is the creation of a row whose id was drawn for that
  very call (no idempotency key): nobody else can know the id, so a
  conditional insert would only cost a Paxos round. Plain and conditional
  writes on one row normally must not mix (their timestamps come from
  different clocks, and a plain write stamped later than a conditional one
  silently wins), so that insert is stamped ``CREATION_TIMESTAMP_US``, older
  than any conditional write can ever be: every later change wins over it,
  whatever the clocks say. An insert that may reuse an id (idempotency keys)
  stays ``IF NOT EXISTS``;
* conditional writes run under an execution profile whose retry policy never
  retries: a retried LWT may apply twice or report "not applied" for its own
  first success;
* a conditional write whose outcome is unknown (timeout, lost connection) is
  resolved by reading the row back at SERIAL consistency, which finishes any
  in-flight Paxos round, and comparing its ``write_id`` with ours;
* every statement is prepared once and run with ``execute_async``, bridged
  into asyncio without a thread per request;
* ``timestamp`` columns of ``tasks`` and ``due_index`` are read as integers
  of milliseconds (``blobAsBigint(timestampAsBlob(col))``, valid from
  Cassandra 2.1 to 5.x), never as driver datetimes: a stored time past year
  9999 cannot be decoded into a datetime, and the driver answers such a
  decode error by marking the host down for the whole process. Each task row
  is then checked (``base.task_from_row``); a row that breaks the scheduler's
  assumptions becomes ``UnreadableTask``, for the lifecycle to quarantine.
"""

from __future__ import annotations

import asyncio
import calendar
import collections
import dataclasses
import functools
import itertools
import os
import datetime as dt
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence

import backoff
from cassandra import ConsistencyLevel, DriverException, OperationTimedOut, RequestExecutionException, RequestValidationException
from cassandra import protocol
from cassandra.connection import ConnectionException
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, ResponseFuture, Session
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    FallthroughRetryPolicy,
    TokenAwarePolicy,
    RetryPolicy as DriverRetryPolicy,
)
from cassandra.query import BatchStatement, BatchType, PreparedStatement, _clean_column_name

from leasesched import limits
from leasesched.auth import TokenRecord
from leasesched.changes import TaskChange
from leasesched.concurrency import ConcurrencyLimit, LimitScope, SlotGroup, SlotHolder
from leasesched.config import Config
from leasesched.gates import Gate
from leasesched.history import AttemptOutcome, HistoryEntry, HistoryKind, Operation
from leasesched.model import DueEntry, Task, bucket_of, listed_size
from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.states import TaskStatus
from leasesched.schedules import Schedule
from leasesched.store.page_token import MAX_DAY, decode_token, encode_token
from leasesched.store.schedule_codec import dump_definition, dump_state, load_definition, load_state
from leasesched.store.base import (
    TIME_COLUMNS,
    CasResult,
    Expect,
    FailedCounts,
    IdempotencyRecord,
    ListQuery,
    Page,
    RawCondition,
    StatementRefused,
    StoreUnavailable,
    UnreadableTask,
    creation_write_id,
    task_from_row,
)

log = logging.getLogger(__name__)

WriteIdReader = Callable[[], Awaitable["uuid.UUID | None"]]
CAS_PROFILE = "cas"
DAY_MS = 86_400_000
# The write time (µs since the epoch) of a task row's plain creation: older
# than the Paxos ballot of any conditional write, on any clock.
CREATION_TIMESTAMP_US = 1

@dataclasses.dataclass(frozen=True)
class TaskCounts:
    by_status: dict[str, int]
    scheduled_by_type: dict[tuple[str, str], int]  # (namespace, type) → SCHEDULED tasks


# Task field -> tasks column, for the fields that map one to one.
_SIMPLE_COLUMNS = {
    "namespace": "namespace",
    "type": "type",
    "payload": "payload",
    "shard": "shard",
    "priority": "priority",
    "attempt": "attempt",
    "lease_ms": "lease_ms",
    "lease_owner": "lease_owner",
    "lease_token": "lease_token",
    "progress_percent": "progress_percent",
    "progress_message": "progress_message",
    "result": "result",
    "error": "error",
    "error_type": "error_type",
    "cancel_requested": "cancel_requested",
    "schedule_id": "schedule_id",
    "concurrency_key": "concurrency_key",
    "gate": "gate",
    "lease_losses": "lease_losses",
}
_TIME_COLUMNS = TIME_COLUMNS


def _ms_column(column: str) -> str:
    """A timestamp column selected as a bigint of ms, under its own name: the
    driver never builds a datetime (nor fails to) for it."""
    return f"blobAsBigint(timestampAsBlob({column})) AS {column}"


def _to_ms(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    return calendar.timegm(value.utctimetuple()) * 1000 + value.microsecond // 1000


def _task_columns(task: Task) -> dict[str, Any]:
    cols: dict[str, Any] = {col: getattr(task, f) for f, col in _SIMPLE_COLUMNS.items()}
    cols.update({c: getattr(task, c) for c in _TIME_COLUMNS})
    cols.update(
        task_id=task.task_id,
        status=task.status.value,
        max_attempts=task.retry.maximum_attempts,
        retry_initial_ms=task.retry.initial_interval_ms,
        retry_coefficient=task.retry.backoff_coefficient,
        retry_max_ms=task.retry.maximum_interval_ms,
        non_retryable=list(task.retry.non_retryable_error_types),
        schedule_to_start_ms=task.timeouts.schedule_to_start_ms,
        start_to_close_ms=task.timeouts.start_to_close_ms,
        schedule_to_close_ms=task.timeouts.schedule_to_close_ms,
    )
    return cols


def _change_columns(change: TaskChange) -> dict[str, Any]:
    """The ``tasks`` columns a change sets (its set fields, in field order):
    the status as its text, times as ints of ms (the driver writes an int to
    a ``timestamp`` column as ms), None as null."""
    cols: dict[str, Any] = {}
    for name, value in change.set_fields().items():
        if name != "status" and name not in _SIMPLE_COLUMNS and name not in _TIME_COLUMNS:
            raise ValueError(f"task field {name!r} cannot be changed by update_task")
        cols[name] = value.value if isinstance(value, TaskStatus) else value
    return cols


def _row_to_task(row: Any) -> Task:
    """Raises ``UnreadableTask`` for a row the scheduler cannot rely on."""
    return task_from_row(row)


@dataclasses.dataclass
class _UnreadableStandIn(Task):
    """Holds an unreadable row's place in a listing, so that the page's size
    and cursor logic stay as they are; ``list_tasks`` takes it out again and
    hands the row back in ``Page.unreadable``. Never leaves this module."""

    unreadable: UnreadableTask | None = None


def _row_to_token(row: Any) -> TokenRecord:
    return TokenRecord(
        token_id=row.token_id,
        secret_hash=row.secret_hash,
        namespace=row.namespace,
        role=row.role,
        name=row.name or "",
        created_at=_to_ms(row.created_at) or 0,
        revoked=bool(row.revoked),
    )


_TABLE_NAMED = re.compile(r"\b(FROM|INTO|UPDATE) (\w+)\b(?!\.)")


def in_keyspace(cql: str, keyspace: str) -> str:
    """``cql`` with its table named in ``keyspace``: ``FROM tasks`` → ``FROM ks.tasks``.

    Why: the store's statements name their tables plainly, for reading, and
    the session is bound to no keyspace. Cassandra 5.0 warns every session
    bound to one (``USE``) that prepares unqualified statements ("an
    anti-pattern due to ambiguity in non-qualified table names"), a warning
    ``make run`` used to print; so every statement is qualified here, in the
    store's one place that prepares them."""
    return _TABLE_NAMED.sub(lambda m: f"{m.group(1)} {keyspace}.{m.group(2)}", cql)


def replication_cql(spec: str) -> str:
    """'SimpleStrategy:1' or 'NetworkTopologyStrategy:dc1=3,dc2=2' → CQL map."""
    strategy, _, params = spec.partition(":")
    if strategy == "SimpleStrategy":
        return f"{{'class': 'SimpleStrategy', 'replication_factor': {int(params or 1)}}}"
    if strategy == "NetworkTopologyStrategy":
        pairs = [p.split("=") for p in params.split(",") if p]
        body = ", ".join(f"'{dc.strip()}': {int(rf)}" for dc, rf in pairs)
        return f"{{'class': 'NetworkTopologyStrategy', {body}}}"
    raise ValueError(f"unknown replication strategy {strategy!r} (SimpleStrategy or NetworkTopologyStrategy)")


def new_cluster(cfg: Config) -> Cluster:
    """A driver Cluster with the two execution profiles every process uses."""
    # Token-aware routing sends each request to a replica of its partition;
    # DC-aware keeps it in the local data centre (LOCAL_QUORUM/LOCAL_SERIAL).
    def profile(retry_policy: DriverRetryPolicy) -> ExecutionProfile:
        return ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=cfg.cassandra_local_dc or None)),
            consistency_level=ConsistencyLevel.name_to_value[cfg.consistency],
            serial_consistency_level=ConsistencyLevel.name_to_value[cfg.serial_consistency],
            request_timeout=cfg.cassandra_request_timeout_s,
            retry_policy=retry_policy,
            row_factory=cached_named_tuple_factory,
        )

    # The two profiles differ only in retries: plain statements may be retried
    # by the driver, lightweight transactions never (see the module docstring).
    plain = profile(DriverRetryPolicy())
    cas = profile(FallthroughRetryPolicy())
    return Cluster(
        contact_points=cfg.cassandra_contact_points,
        port=cfg.cassandra_port,
        protocol_version=cfg.cassandra_protocol_version,
        execution_profiles={EXEC_PROFILE_DEFAULT: plain, CAS_PROFILE: cas},
        reconnection_policy=ExponentialReconnectionPolicy(0.25, 2.0),
        connect_timeout=3,
        control_connection_timeout=3,
        idle_heartbeat_interval=5,
    )


# Everything the driver raises when Cassandra cannot answer. ConnectionException
# (e.g. ConnectionShutdown when a node goes down mid-request) is not a
# DriverException, so it is listed on its own.
_UNAVAILABLE_ERRORS = (
    NoHostAvailable,
    OperationTimedOut,
    RequestExecutionException,
    DriverException,
    ConnectionException,
    ConnectionError,
    # Server answers the driver raises as protocol messages, not as the
    # exceptions above: a node going down answers "overloaded: Server is
    # shutting down" (seen when 2 of 3 nodes stopped under load), a joining
    # node "is bootstrapping", a coordinator's own failure "server error".
    # Statement errors (syntax, invalid request) stay bugs: INTERNAL.
    protocol.RequestExecutionException,
    protocol.ServerError,
)


def driver_error(exc: BaseException) -> BaseException:
    """The error a statement's caller sees for what the driver reported.
    The driver raises Cassandra's "invalid statement" answers as
    ``RequestValidationException``s, which are ``DriverException``s too: left
    as they are, ``_UNAVAILABLE_ERRORS`` took a statement Cassandra refused
    (once, a batch over its size limit) for an outage, and clients retried
    a bug as UNAVAILABLE."""
    if isinstance(exc, RequestValidationException):
        return StatementRefused(f"Cassandra refused the statement: {type(exc).__name__}: {exc}")
    return exc


class WriteIds:
    """Unique ids for conditional writes, without a system call each.

    A write id only has to differ from every other write id of the same row
    (it tells "my write landed" from "someone else's did"): 64 random bits
    per process plus a counter is that, and costs a fraction of ``uuid4()``
    (an ``os.urandom`` call per write, ≈ 5 % of TaskService's CPU)."""

    def __init__(self) -> None:
        self._prefix = int.from_bytes(os.urandom(8), "big") << 64
        self._counter = itertools.count(1)

    def next(self) -> uuid.UUID:
        return uuid.UUID(int=self._prefix | next(self._counter))


class CassandraStore:
    """The product's store. One instance per process, shared by every request."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._resolutions: set[asyncio.Future[bool | None]] = set()  # read-backs whose callers may be gone
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._connect_lock = asyncio.Lock()
        self._last_connect_attempt = 0.0
        self._stmts: dict[str, PreparedStatement] = {}
        self._update_stmts: dict[tuple[tuple[str, ...], tuple[str, ...]], PreparedStatement] = {}
        self._inbox: _Inbox | None = None
        # The driver's timeout covers a request and its retries; twice that
        # plus a second means its answer is lost, not late.
        self._give_up_s = 2 * cfg.cassandra_request_timeout_s + 1.0
        self._write_ids = WriteIds()

    def _inbox_for(self, loop: asyncio.AbstractEventLoop) -> "_Inbox":
        if self._inbox is None or self._inbox.loop is not loop:
            self._inbox = _Inbox(loop)
        return self._inbox

    # ---------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Connect now; raises StoreUnavailable if Cassandra does not answer."""
        await self._ensure_session(force=True)

    async def _ensure_session(self, force: bool = False) -> Session:
        if self._session is not None:
            return self._session
        async with self._connect_lock:
            if self._session is not None:
                return self._session
            # Throttle reconnect attempts so an outage does not become a storm.
            if not force and time.monotonic() - self._last_connect_attempt < 1.0:
                raise StoreUnavailable("Cassandra is unreachable (retrying the connection)")
            self._last_connect_attempt = time.monotonic()
            try:
                session = await asyncio.to_thread(self._connect_blocking)
            except Exception as exc:  # noqa: BLE001 - every failure here means "unreachable"
                raise StoreUnavailable(f"Cassandra is unreachable: {exc}") from exc
            self._session = session
            return session

    def _connect_blocking(self) -> Session:
        cluster = new_cluster(self._cfg)
        try:
            session = cluster.connect()  # no keyspace: every statement names its own (in_keyspace)
            self._prepare_all(session)
        except Exception:
            cluster.shutdown()
            raise
        self._cluster = cluster
        return session

    def _prepare(self, session: Session, cql: str) -> PreparedStatement:
        return session.prepare(in_keyspace(cql, self._cfg.keyspace))

    def _prepare_all(self, session: Session) -> None:
        cols = list(_task_columns_names())
        select_task = f"SELECT {_task_select_list()} FROM tasks WHERE task_id = ?"
        stmts = {
            "insert_task": f"INSERT INTO tasks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) IF NOT EXISTS",
            "create_task": f"INSERT INTO tasks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"USING TIMESTAMP {CREATION_TIMESTAMP_US}",
            "get_task": select_task,
            "get_write_id": "SELECT write_id FROM tasks WHERE task_id = ?",
            "claim_key": "INSERT INTO idempotency_keys (namespace, idem_key, task_id, request_hash) VALUES (?, ?, ?, ?) IF NOT EXISTS",
            "add_due": "INSERT INTO due_index (shard, bucket, due_at, task_id, kind, attempt, priority, type, lease_token, ref) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
            "read_due": f"SELECT {_ms_column('due_at')}, task_id, kind, attempt, priority, type, lease_token, ref FROM due_index "
            "WHERE shard = ? AND bucket = ? AND due_at >= ? AND due_at <= ?",
            "delete_due": "DELETE FROM due_index WHERE shard = ? AND bucket = ? AND due_at = ? AND task_id = ? AND kind = ?",
            "index_ns": "INSERT INTO tasks_by_namespace (namespace, day, created_at, task_id) VALUES (?, ?, ?, ?)",
            # Every listing read is a clustering range of one day: [low, high)
            # for a day's first read, [low, cursor) after a cursor (tuple
            # notation for both bounds: Cassandra refuses a single-column and
            # a tuple bound on the same column in one query).
            "list_ns": "SELECT created_at, task_id FROM tasks_by_namespace WHERE namespace = ? AND day = ? "
            "AND created_at >= ? AND created_at < ? LIMIT ?",
            "list_ns_after": "SELECT created_at, task_id FROM tasks_by_namespace WHERE namespace = ? AND day = ? "
            "AND (created_at) >= (?) AND (created_at, task_id) < (?, ?) LIMIT ?",
            "add_failed": "INSERT INTO failed_tasks (namespace, type, task_id, failed_at) VALUES (?, ?, ?, ?)",
            "remove_failed": "DELETE FROM failed_tasks WHERE namespace = ? AND type = ? AND task_id = ?",
            "count_failed": "SELECT type FROM failed_tasks WHERE namespace = ? LIMIT ?",
            "count_failed_type": "SELECT type FROM failed_tasks WHERE namespace = ? AND type = ? LIMIT ?",
            "get_checkpoint": "SELECT checkpoint_ms FROM shard_checkpoints WHERE shard = ?",
            "set_checkpoint": "INSERT INTO shard_checkpoints (shard, checkpoint_ms, updated_at) VALUES (?, ?, ?)",
            "add_history": "INSERT INTO task_history (task_id, started_at, entry, kind, attempt, lease_token, worker_id, "
            "ended_at, outcome, error_type, error, progress_percent, progress_message, operation, operator, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
            "history_times": f"SELECT {_ms_column('started_at')} FROM task_history WHERE task_id = ? LIMIT ?",
            "trim_history": "DELETE FROM task_history WHERE task_id = ? AND started_at < ?",
            "read_history": f"SELECT task_id, {_ms_column('started_at')}, entry, kind, attempt, lease_token, worker_id, "
            f"{_ms_column('ended_at')}, outcome, error_type, error, progress_percent, progress_message, operation, "
            "operator, reason FROM task_history WHERE task_id = ? LIMIT ?",
            "put_token": "INSERT INTO auth_tokens (token_id, secret_hash, namespace, role, name, created_at, revoked) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            "get_token": "SELECT * FROM auth_tokens WHERE token_id = ?",
            "list_tokens": "SELECT * FROM auth_tokens",
            "revoke_token": "UPDATE auth_tokens SET revoked = true WHERE token_id = ?",
            "get_secret": "SELECT value FROM secrets WHERE name = ?",
            "create_secret": "INSERT INTO secrets (name, value, created_at) VALUES (?, ?, ?) IF NOT EXISTS",
            "insert_schedule": "INSERT INTO schedules (namespace, schedule_id, uid, shard, version, definition, state, "
            "created_at, updated_at, write_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            "get_schedule": _SELECT_SCHEDULE,
            "get_schedule_serial": _SELECT_SCHEDULE,
            "get_schedule_write_id": "SELECT write_id FROM schedules WHERE namespace = ? AND schedule_id = ?",
            "update_schedule": "UPDATE schedules SET version = ?, definition = ?, state = ?, updated_at = ?, write_id = ? "
            "WHERE namespace = ? AND schedule_id = ? IF version = ?",
            "update_schedule_state": "UPDATE schedules SET version = ?, state = ?, updated_at = ?, write_id = ? "
            "WHERE namespace = ? AND schedule_id = ? IF version = ?",
            "delete_schedule": "DELETE FROM schedules WHERE namespace = ? AND schedule_id = ? IF version = ?",
            "index_schedule": "INSERT INTO schedules_by_namespace (namespace, schedule_id) VALUES (?, ?)",
            "unindex_schedule": "DELETE FROM schedules_by_namespace WHERE namespace = ? AND schedule_id = ?",
            "list_schedules": "SELECT schedule_id FROM schedules_by_namespace WHERE namespace = ? AND schedule_id > ? LIMIT ?",
            "insert_gate": f"INSERT INTO gates ({_GATE_COLUMNS}) VALUES ({', '.join('?' * len(_GATE_COLUMNS.split(', ')))}) IF NOT EXISTS",
            "get_gate": _SELECT_GATE,
            "get_gate_serial": _SELECT_GATE,
            "get_gate_write_id": "SELECT write_id FROM gates WHERE namespace = ? AND gate = ?",
            "update_gate": "UPDATE gates SET rate = ?, burst = ?, warmup_ms = ?, paused = ?, closed_until_ms = ?, "
            "ramp_from_ms = ?, version = ?, updated_at_ms = ?, write_id = ?, max_in_flight = ? "
            "WHERE namespace = ? AND gate = ? IF version = ? AND closed_until_ms = ?",
            "reserve_gate": "UPDATE gates SET tat_us = ?, ramp_from_ms = ?, write_id = ? WHERE namespace = ? AND gate = ? "
            "IF version = ? AND tat_us = ? AND closed_until_ms = ?",
            "close_gate": "UPDATE gates SET closed_until_ms = ?, write_id = ? WHERE namespace = ? AND gate = ? IF closed_until_ms < ?",
            "delete_gate": "DELETE FROM gates WHERE namespace = ? AND gate = ? IF version = ?",
            "index_gate": "INSERT INTO gates_by_namespace (namespace, gate) VALUES (?, ?)",
            "unindex_gate": "DELETE FROM gates_by_namespace WHERE namespace = ? AND gate = ?",
            "list_gates": "SELECT gate FROM gates_by_namespace WHERE namespace = ? AND gate > ? LIMIT ?",
            "read_slots": "SELECT slot, task_id, lease_token, taken_at_ms, confirmed FROM limit_slots "
            "WHERE namespace = ? AND scope = ? AND name = ?",
            "get_slot_write_id": "SELECT write_id FROM limit_slots WHERE namespace = ? AND scope = ? AND name = ? AND slot = ?",
            "insert_slot": "INSERT INTO limit_slots (namespace, scope, name, slot, task_id, lease_token, taken_at_ms, confirmed, "
            "write_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            "takeover_slot": "UPDATE limit_slots SET task_id = ?, lease_token = ?, taken_at_ms = ?, confirmed = ?, write_id = ? "
            "WHERE namespace = ? AND scope = ? AND name = ? AND slot = ? IF task_id = ? AND lease_token = ?",
            "confirm_slot": "UPDATE limit_slots SET confirmed = true, write_id = ? "
            "WHERE namespace = ? AND scope = ? AND name = ? AND slot = ? IF task_id = ? AND lease_token = ?",
            "free_slot": "UPDATE limit_slots SET lease_token = 0, confirmed = false, write_id = ? "
            "WHERE namespace = ? AND scope = ? AND name = ? AND slot = ? IF task_id = ? AND lease_token = ?",
            "insert_limit": f"INSERT INTO concurrency_limits ({_LIMIT_COLUMNS}, write_id) "
            f"VALUES ({', '.join('?' * (len(_LIMIT_COLUMNS.split(', ')) + 1))}) IF NOT EXISTS",
            "get_limit": _SELECT_LIMITS + _ONE_LIMIT,
            "get_limit_serial": _SELECT_LIMITS + _ONE_LIMIT,
            "get_limit_write_id": "SELECT write_id FROM concurrency_limits" + _ONE_LIMIT,
            "update_limit": "UPDATE concurrency_limits SET max_running = ?, version = ?, updated_at_ms = ?, write_id = ?"
            + _ONE_LIMIT + " IF version = ?",
            "delete_limit": "DELETE FROM concurrency_limits" + _ONE_LIMIT + " IF version = ?",
            "delete_limit_any": "DELETE FROM concurrency_limits" + _ONE_LIMIT + " IF EXISTS",
            "list_limits": _SELECT_LIMITS + " WHERE namespace = ?",
            "list_all_limits": _SELECT_LIMITS,
        }
        self._stmts = {name: self._prepare(session, cql) for name, cql in stmts.items()}
        self._stmts["get_task_serial"] = self._prepare(session, select_task)
        self._stmts["get_task_serial"].consistency_level = ConsistencyLevel.name_to_value[self._cfg.serial_consistency]
        self._stmts["get_write_id"].consistency_level = ConsistencyLevel.name_to_value[self._cfg.serial_consistency]
        # Same cells under the same timestamp: repeating it changes nothing.
        self._stmts["create_task"].is_idempotent = True
        self._stmts["get_secret"].consistency_level = ConsistencyLevel.name_to_value[self._cfg.serial_consistency]
        for name in ("get_schedule_serial", "get_schedule_write_id", "get_gate_serial", "get_gate_write_id", "get_limit_serial",
                     "get_limit_write_id", "get_slot_write_id"):
            self._stmts[name].consistency_level = ConsistencyLevel.name_to_value[self._cfg.serial_consistency]
        for name in ("insert_task", "claim_key", "create_secret", "insert_schedule", "update_schedule", "update_schedule_state",
                     "delete_schedule", "insert_gate", "update_gate", "reserve_gate", "close_gate", "delete_gate",
                     "insert_limit", "update_limit", "delete_limit", "delete_limit_any",
                     "insert_slot", "takeover_slot", "confirm_slot", "free_slot"):
            self._stmts[name].is_idempotent = False
        # Limit definitions are a few rows per namespace, written by operators:
        # read whole in one response instead of page by page.
        for name in ("list_limits", "list_all_limits"):
            self._stmts[name].fetch_size = None
        self._update_stmts.clear()

    async def close(self) -> None:
        if self._resolutions:  # read-backs still running for callers that left: let them finish (bounded)
            await asyncio.wait(set(self._resolutions), timeout=3 * self._cfg.cassandra_request_timeout_s + 1)
        if self._cluster is not None:
            await asyncio.to_thread(self._cluster.shutdown)
        self._cluster = None
        self._session = None

    # ---------------------------------------------------------------- execution

    async def _run(
        self, name: str | PreparedStatement | BatchStatement, params: Sequence[Any] | None, cas: bool = False
    ) -> list[Any]:
        session = await self._ensure_session()
        stmt = self._stmts[name] if isinstance(name, str) else name
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[Any]] = loop.create_future()
        try:
            future: ResponseFuture = session.execute_async(
                stmt, params, execution_profile=CAS_PROFILE if cas else EXEC_PROFILE_DEFAULT
            )
        except _UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"Cassandra request failed: {exc}") from exc

        inbox = self._inbox_for(loop)

        collected: list[Any] = []

        def on_ok(rows: Any) -> None:
            # The driver hands an answer over in pages (5,000 rows); this
            # callback runs once per page. Every page is kept: a due-index scan
            # of a flood that saw only its first page skipped the rest for good.
            if rows is not None:
                collected.extend(rows)
            if future.has_more_pages:
                future.start_fetching_next_page()
            else:
                inbox.post(result, collected, None)

        def on_err(exc: BaseException) -> None:
            inbox.post(result, None, driver_error(exc))

        future.add_callbacks(on_ok, on_err)
        # Our own deadline behind the driver's: if its answer never comes (a
        # callback lost while a node froze), the caller sees a timeout instead
        # of waiting for ever. A scanner waiting for ever stops handling its
        # shard, and a conditional write's timeout is resolved like any other.
        guard = loop.call_later(self._give_up_s, _give_up, result, name if isinstance(name, str) else "statement")
        try:
            return await result
        finally:
            guard.cancel()

    async def _run_plain(self, name: str | PreparedStatement | BatchStatement, params: Sequence[Any] | None) -> list[Any]:
        try:
            return await self._run(name, params)
        except _UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"Cassandra request failed: {type(exc).__name__}: {exc}") from exc

    async def _run_cas(
        self, stmt: str | PreparedStatement, params: Sequence[Any], task_id: uuid.UUID | str, write_id: uuid.UUID,
        write_id_of: WriteIdReader | None = None,
    ) -> Any:
        """Run one lightweight transaction. Returns its first row, or None when
        an unknown outcome was resolved as applied by a serial read.
        ``task_id`` names the row (a task id, or a schedule's ref);
        ``write_id_of`` reads its write id serially (default: the task's)."""
        try:
            rows = await self._run(stmt, params, cas=True)
            return rows[0]
        except (StoreUnavailable, NoHostAvailable) as exc:
            # Never reached a replica: nothing to resolve.
            raise StoreUnavailable(f"Cassandra is unreachable: {exc}") from exc
        except _UNAVAILABLE_ERRORS as exc:
            log.warning("conditional write on task %s has an unknown outcome (%s); resolving with a serial read", task_id, exc)
            # Shielded: when the caller goes away meanwhile (its RPC's deadline
            # passed, as it does while a node is frozen), the read-back still
            # finishes and is counted and logged; only the answer is dropped.
            resolution = asyncio.ensure_future(self._resolve_and_report(task_id, write_id, write_id_of))
            self._resolutions.add(resolution)
            resolution.add_done_callback(self._resolutions.discard)
            applied = await asyncio.shield(resolution)
            if applied is None:
                raise StoreUnavailable(f"Cassandra did not confirm a conditional write: {exc}") from exc
            return None if applied else _NOT_APPLIED_UNKNOWN

    async def _resolve_and_report(
        self, task_id: uuid.UUID | str, write_id: uuid.UUID, write_id_of: WriteIdReader | None
    ) -> bool | None:
        applied = await self._resolve_unknown(task_id, write_id, write_id_of)
        resolved = "unresolved" if applied is None else ("applied" if applied else "not_applied")
        metrics.store_unknown_outcomes.labels(resolved).inc()
        log.warning("conditional write on task %s: unknown outcome resolved by a serial read: %s", task_id, resolved,
                    extra=fields(task_id=str(task_id), store_event="unknown_outcome", resolved=resolved))  # fmt: skip
        return applied

    async def _resolve_unknown(
        self, task_id: uuid.UUID | str, write_id: uuid.UUID, write_id_of: WriteIdReader | None
    ) -> bool | None:
        """True/False when a serial read tells; None when even that fails (three tries)."""

        async def task_write_id() -> uuid.UUID | None:
            rows = await self._run("get_write_id", (task_id,))
            return rows[0].write_id if rows else None

        current = write_id_of or task_write_id

        @backoff.on_exception(backoff.constant, Exception, max_tries=3, interval=0.2, jitter=None, logger=None,
                              on_backoff=lambda d: log.warning("serial read-back of task %s failed: %s", task_id, d["exception"]))  # fmt: skip
        async def read_back() -> bool:
            return await current() == write_id

        try:
            return await read_back()
        except Exception as exc:  # noqa: BLE001 - the outcome stays unknown
            log.warning("serial read-back of task %s failed: %s", task_id, exc)
            return None

    # ---------------------------------------------------------------- tasks

    async def insert_task(self, task: Task, new_id: bool = False, write_id: uuid.UUID | None = None) -> bool:
        cols = _task_columns(task)
        # The creator knows the created row's write id: a claim without a read
        # is conditional on it (``Untouched``). A plain insert's is the task's own id.
        if write_id is None:
            write_id = creation_write_id(task.task_id) if new_id else self._write_ids.next()
        cols["write_id"] = write_id
        params = [cols[c] for c in _task_columns_names()]
        if new_id:
            # See the module docstring: a plain insert, older than any change.
            # The listing entry at the same time (issue 17: one write's wait
            # less per ScheduleTask): listing skips an entry whose row it cannot
            # find (``_list_tasks``), so the order of the two does not matter.
            if not task.namespace:
                await self._run_plain("create_task", params)
                return True
            listing = (task.namespace, task.created_at // DAY_MS, task.created_at, task.task_id)
            if _row_bytes(params) <= BATCH_ROW_MAX_BYTES:
                # One request for both (an unlogged batch: two independent
                # writes, as the two requests were): one fewer round of driver
                # work here and of request handling in Cassandra per task.
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                batch.add(self._stmts["create_task"], params)
                batch.add(self._stmts["index_ns"], listing)
                batch.is_idempotent = True  # both are plain upserts of fixed values
                await self._run_plain(batch, None)
            else:
                await asyncio.gather(self._run_plain("create_task", params), self._run_plain("index_ns", listing))
            return True
        row = await self._run_cas("insert_task", params, task.task_id, write_id)
        if row is _NOT_APPLIED_UNKNOWN:
            raise StoreUnavailable("Cassandra did not apply the task insert; nothing was written")
        applied = row is None or row.applied
        created_at: int | None = task.created_at
        namespace: str | None = task.namespace
        if not applied:
            # The row existed. Its creator may have stopped between its insert
            # and the index write below (a trigger killed, or its shard released,
            # in the middle of a schedule's firing; the retry finds the row):
            # whoever finds it writes the listing entry again, from the row, or
            # the task would never be listed. The same key as the creator's.
            created_at, namespace = _to_ms(getattr(row, "created_at", None)), getattr(row, "namespace", None)
        if created_at is not None and namespace:
            # Plain write to another table: listing only, never read by the scheduler.
            day = created_at // DAY_MS
            await self._run_plain("index_ns", (namespace, day, created_at, task.task_id))
        return bool(applied)

    async def get_task(self, task_id: uuid.UUID, serial: bool = False) -> Task | None:
        rows = await self._run_plain("get_task_serial" if serial else "get_task", (task_id,))
        return _row_to_task(rows[0]) if rows else None

    def _update_stmt(self, columns: tuple[str, ...], conditions: tuple[str, ...]) -> PreparedStatement:
        key = (columns, conditions)
        stmt = self._update_stmts.get(key)
        if stmt is None:
            assert self._session is not None
            sets = ", ".join(f"{c} = ?" for c in columns)
            ifs = " AND ".join(f"{c} = ?" for c in conditions)
            stmt = self._prepare(self._session, f"UPDATE tasks SET {sets} WHERE task_id = ? IF {ifs}")
            stmt.is_idempotent = False
            self._update_stmts[key] = stmt
        return stmt

    async def update_task(self, task_id: uuid.UUID, expect: Expect, change: TaskChange) -> CasResult:
        await self._ensure_session()
        write_id = self._write_ids.next()
        cols = _change_columns(change)
        cols["write_id"] = write_id
        conds: dict[str, Any] = expect.conditions()
        columns, conditions = tuple(cols), tuple(conds)
        stmt = self._update_stmt(columns, conditions)
        params = [*cols.values(), task_id, *conds.values()]
        row = await self._run_cas(stmt, params, task_id, write_id)
        if row is None:
            return CasResult(applied=True)
        if row is _NOT_APPLIED_UNKNOWN:
            try:
                current = await self.get_task(task_id, serial=True)
            except UnreadableTask as bad:
                return CasResult(applied=False, current_status=bad.status, current_lease_token=bad.expect.lease_token)
            if current is not None and _still_holds(current, expect):
                # Not applied, yet nobody moved the task: the write failed on
                # its way (an overloaded coordinator, a node going down), it
                # lost no race. Answered as "not applied" it read as a lost
                # lease: a worker dropped its completion and the trigger its
                # lease check, and the task stayed RUNNING for good (the
                # replicated 2-of-3-nodes-down chaos test, one CI run). The
                # caller retries an unavailable store.
                raise StoreUnavailable(f"Cassandra did not apply a conditional write on task {task_id}; nothing was written")
            return _cas_from_task(current)
        if row.applied:
            return CasResult(applied=True)
        if getattr(row, "status", None) is None:
            return CasResult(applied=False, exists=False)
        return CasResult(
            applied=False,
            current_status=TaskStatus(row.status),
            current_lease_token=getattr(row, "lease_token", None),
            current_namespace=getattr(row, "namespace", None),
        )

    async def quarantine_task(self, task_id: uuid.UUID, expect: RawCondition, columns: dict[str, Any]) -> bool:
        """One conditional write that makes an unreadable row readable again.

        ``columns`` are raw ``tasks`` columns (status as text, times as ms);
        the write applies only while status, lease token and write id are
        still exactly what was read (a null reads as "still null"), so it
        never overwrites a change made since. False: not applied."""
        await self._ensure_session()
        unknown = set(columns) - set(_task_columns_names())
        if unknown or "task_id" in columns:
            raise ValueError(f"not columns a quarantine may write: {sorted(unknown) or ['task_id']}")
        write_id = self._write_ids.next()
        cols = {**columns, "write_id": write_id}
        conds = {"status": expect.status, "lease_token": expect.lease_token, "write_id": expect.write_id}
        stmt = self._update_stmt(tuple(cols), tuple(conds))
        row = await self._run_cas(stmt, [*cols.values(), task_id, *conds.values()], task_id, write_id)
        if row is None:
            return True  # an unknown outcome that the serial read found applied
        if row is _NOT_APPLIED_UNKNOWN:
            return False
        return bool(row.applied)

    async def list_tasks(self, query: ListQuery) -> Page:
        """See ``_list_tasks``. A row that cannot be read keeps its place in
        the page (it counts toward the page size and moves the cursor like
        any other) and comes back in ``Page.unreadable`` with its position."""
        page = await self._list_tasks(query)
        if not any(isinstance(t, _UnreadableStandIn) for t in page.tasks):
            return page
        tasks: list[Task] = []
        unreadable: list[tuple[int, UnreadableTask]] = []
        for position, task in enumerate(page.tasks):
            if isinstance(task, _UnreadableStandIn) and task.unreadable is not None:
                unreadable.append((position, task.unreadable))
            else:
                tasks.append(task)
        return dataclasses.replace(page, tasks=tasks, unreadable=unreadable)

    async def _read_listed(self, task_id: uuid.UUID) -> Task | None:
        try:
            return await self.get_task(task_id)
        except UnreadableTask as bad:
            return _UnreadableStandIn(task_id=task_id, namespace="", type="", payload=b"", shard=0, unreadable=bad)

    async def _list_tasks(self, query: ListQuery) -> Page:
        """Newest first, walking day partitions back ``list_days`` days.

        The time range narrows the walk itself: only the days it touches are
        read, each as the clustering range inside it. Status and type live
        only in ``tasks``, so they are tested on each candidate's row; each
        page scans a bounded number of index rows (``scan_budget``) so that
        a rare status or type cannot make one call unbounded: the page may
        come back short, even empty, with a token that resumes.
        """
        now_day = int(time.time() * 1000) // DAY_MS
        cursor = decode_token(query.page_token)
        # A cursor is signed by TaskService, but never trusted to send the walk
        # into the future: it starts at today at the latest.
        day = min(cursor.day, now_day) if cursor else now_day
        oldest_day = now_day - int(query.extra.get("list_days", 30))
        low_ms = 0 if query.created_after is None else max(query.created_after, 0)
        high_ms = MAX_DAY * DAY_MS if query.created_before is None else query.created_before  # exclusive
        if high_ms <= low_ms:
            return Page([], "")
        day = min(day, (high_ms - 1) // DAY_MS)
        oldest_day = max(oldest_day, low_ms // DAY_MS)
        found: list[Task] = []
        size = 0  # listed bytes so far (query.max_bytes)
        full = False
        scanned = 0
        scan_budget = max(query.page_size * 10, 200)
        # A cursor of a day read to its end (created_at None), or of a day the
        # walk does not start at, starts the day from its top (a null bound
        # would be refused by Cassandra).
        after: tuple[int | None, uuid.UUID] | None = None
        if cursor is not None and cursor.created_at is not None and cursor.task_id is not None and cursor.day == day:
            after = (cursor.created_at, cursor.task_id)
        filtered = query.status is not None or bool(query.type)
        chunk = query.page_size
        while day >= oldest_day and len(found) < query.page_size and scanned < scan_budget:
            limit = min(chunk, scan_budget - scanned)
            if filtered:
                # Few matches so far: read more rows per round trip (a rare type
                # with page_size 2 took 100 round trips of 2 rows for one page).
                chunk = min(max(chunk * 2, query.page_size), 100 if query.page_size < 100 else query.page_size)
            day_low = max(low_ms, day * DAY_MS)
            if after is None:
                day_high = min(high_ms, (day + 1) * DAY_MS)
                rows = await self._run_plain("list_ns", (query.namespace, day, day_low, day_high, limit))
            else:
                rows = await self._run_plain("list_ns_after", (query.namespace, day, day_low, after[0], after[1], limit))
            scanned += len(rows)
            tasks = await asyncio.gather(*(self._read_listed(r.task_id) for r in rows))
            for row, task in zip(rows, tasks):
                after = (_to_ms(row.created_at), row.task_id)
                # An unreadable row is listed whatever the filter: its status is
                # only known after the lifecycle has quarantined it.
                unreadable = isinstance(task, _UnreadableStandIn)
                if task is not None and (not filtered or unreadable or query.matches(task)):
                    found.append(task)
                    size += listed_size(task)
                    full = len(found) == query.page_size or 0 < query.max_bytes <= size
                    if full:
                        break
            if full:
                break
            if len(rows) < limit:
                day, after = day - 1, None  # this day is exhausted
        if day < oldest_day:
            return Page(found, "", scanned=scanned)
        if after is None:
            return Page(found, encode_token(day, None, None) if found or scanned else "", scanned=scanned)
        return Page(found, encode_token(day, after[0], after[1]), scanned=scanned)

    async def count_tasks(self, limit: int) -> TaskCounts:
        """Counts over at most ``limit`` task rows (an operator's view, not a hot path):
        by status, and the SCHEDULED ones by namespace and type."""
        from cassandra.query import SimpleStatement

        session = await self._ensure_session()
        cql = in_keyspace(f"SELECT status, namespace, type FROM tasks LIMIT {int(limit)}", self._cfg.keyspace)
        statement = SimpleStatement(cql, fetch_size=5000)
        rows = await asyncio.to_thread(lambda: [(r.status, r.namespace, r.type) for r in session.execute(statement)])
        scheduled = collections.Counter((ns, t) for status, ns, t in rows if status == TaskStatus.SCHEDULED.value)
        return TaskCounts(dict(collections.Counter(status for status, _, _ in rows)), dict(scheduled))

    # ---------------------------------------------------------------- dead letters

    async def add_failed(self, task: Task) -> None:
        failed_at = task.finished_at if task.finished_at is not None else int(time.time() * 1000)
        await self._run_plain("add_failed", (task.namespace, task.type, task.task_id, failed_at))

    async def remove_failed(self, task: Task) -> None:
        await self._run_plain("remove_failed", (task.namespace, task.type, task.task_id))

    async def count_failed(self, namespace: str, type_: str, limit: int) -> FailedCounts:
        """Reads the index entries (the type column only) in pages of 5,000:
        one partition per namespace, so this is one sequential partition read,
        never a scan of ``tasks``."""
        session = await self._ensure_session()
        assert self._stmts is not None
        if type_:
            bound = self._stmts["count_failed_type"].bind((namespace, type_, limit + 1))
        else:
            bound = self._stmts["count_failed"].bind((namespace, limit + 1))
        bound.fetch_size = 5000

        def read() -> list[str]:
            # The driver fetches the next page as the iteration reaches it (in
            # this thread), counting as it goes instead of keeping every row.
            return [r.type for r in session.execute(bound, timeout=self._give_up_s)]

        try:
            types_read = await asyncio.to_thread(read)
        except RequestValidationException as exc:
            raise driver_error(exc) from exc
        except _UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"count of failed tasks: {exc}") from exc
        exact = len(types_read) <= limit
        counts = collections.Counter(types_read[:limit])
        return FailedCounts(dict(counts), min(len(types_read), limit), exact)

    # ---------------------------------------------------------------- auth tokens

    async def put_token(self, record: TokenRecord) -> None:
        await self._run_plain(
            "put_token",
            (record.token_id, record.secret_hash, record.namespace, record.role, record.name, record.created_at, False),
        )

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._run_plain("get_token", (token_id,))
        return _row_to_token(rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        return [_row_to_token(r) for r in await self._run_plain("list_tokens", ())]

    async def revoke_token(self, token_id: str) -> bool:
        if await self.get_token(token_id) is None:
            return False
        await self._run_plain("revoke_token", (token_id,))
        return True

    # ---------------------------------------------------------------- shared secrets

    async def cluster_secret(self, name: str) -> bytes:
        """A random 256-bit secret shared by every process of the cluster, made
        once: the first caller's conditional insert wins, everyone reads that."""
        rows = await self._run_plain("get_secret", (name,))
        if rows and rows[0].value:
            return bytes(rows[0].value)
        params = (name, os.urandom(32), int(time.time() * 1000))
        try:
            rows = await self._run("create_secret", params, cas=True)
        except _UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"Cassandra request failed: {exc}") from exc
        if rows[0].applied:
            return params[1]
        return bytes(rows[0].value)

    # ---------------------------------------------------------------- idempotency

    async def claim_idempotency_key(self, namespace: str, key: str, record: IdempotencyRecord) -> IdempotencyRecord | None:
        params = (namespace, key, record.task_id, record.request_hash)
        try:
            rows = await self._run("claim_key", params, cas=True)
        except _UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"Cassandra request failed: {exc}") from exc
        row = rows[0]
        if row.applied:
            return None
        return IdempotencyRecord(task_id=row.task_id, request_hash=row.request_hash)

    # ---------------------------------------------------------------- due index

    async def add_due(self, entry: DueEntry) -> None:
        bucket = bucket_of(entry.due_at, self._cfg.due_bucket_s)
        ttl = limits.ttl_s(entry.due_at, int(time.time() * 1000))
        await self._run_plain(
            "add_due",
            (
                entry.shard,
                bucket,
                entry.due_at,
                entry.task_id,
                entry.kind,
                entry.attempt,
                entry.priority,
                entry.type,
                entry.lease_token,
                entry.ref or None,
                ttl,
            ),
        )

    async def read_due(self, shard: int, from_ms: int, to_ms: int, bucket_s: int) -> list[DueEntry]:
        width = bucket_s * 1000
        buckets = range(bucket_of(from_ms, bucket_s), to_ms + 1, width)
        results = await asyncio.gather(*(self._run_plain("read_due", (shard, b, from_ms, to_ms)) for b in buckets))
        return [
            DueEntry(
                shard=shard,
                due_at=r.due_at or 0,
                task_id=r.task_id,
                kind=r.kind,
                attempt=r.attempt or 1,
                priority=r.priority if r.priority is not None else 5,
                type=r.type or "",
                lease_token=r.lease_token or 0,
                ref=r.ref or "",
            )
            for rows in results
            for r in rows
        ]

    async def delete_due(self, entry: DueEntry, bucket_s: int) -> None:
        bucket = bucket_of(entry.due_at, bucket_s)
        await self._run_plain("delete_due", (entry.shard, bucket, entry.due_at, entry.task_id, entry.kind))

    # ---------------------------------------------------------------- schedules

    def _schedule_write_id(self, namespace: str, schedule_id: str) -> WriteIdReader:
        async def read() -> uuid.UUID | None:
            rows = await self._run("get_schedule_write_id", (namespace, schedule_id))
            return rows[0].write_id if rows else None

        return read

    async def insert_schedule(self, schedule: Schedule) -> bool:
        """Create the schedule if its id is free in its namespace (conditional).
        The listing row is written first: one without its schedule is skipped."""
        await self._run_plain("index_schedule", (schedule.namespace, schedule.schedule_id))
        write_id = self._write_ids.next()
        params = (
            schedule.namespace, schedule.schedule_id, schedule.uid, schedule.shard, schedule.version,
            dump_definition(schedule.spec, schedule.action, schedule.policy), dump_state(schedule.state),
            schedule.created_at_ms, schedule.updated_at_ms, write_id,
        )  # fmt: skip
        row = await self._run_cas("insert_schedule", params, schedule.ref, write_id, self._schedule_write_id(schedule.namespace, schedule.schedule_id))
        if row is _NOT_APPLIED_UNKNOWN:
            raise StoreUnavailable("Cassandra did not apply the schedule insert; nothing was written")
        return row is None or bool(row.applied)

    async def get_schedule(self, namespace: str, schedule_id: str, serial: bool = False) -> Schedule | None:
        rows = await self._run_plain("get_schedule_serial" if serial else "get_schedule", (namespace, schedule_id))
        if not rows:
            return None
        r = rows[0]
        spec, action, policy = load_definition(r.definition)
        return Schedule(
            namespace=r.namespace, schedule_id=r.schedule_id, uid=r.uid, shard=r.shard, spec=spec, action=action,
            policy=policy, state=load_state(r.state), version=r.version, created_at_ms=r.created_at or 0,
            updated_at_ms=r.updated_at or 0,
        )  # fmt: skip

    async def update_schedule(self, schedule: Schedule, expected_version: int, definition: bool = True) -> bool:
        """Write the schedule's state and version (and its definition, unless
        ``definition`` is False: a firing changes only the state, and the
        definition holds the action's payload) only if its stored version is
        still ``expected_version``."""
        write_id = self._write_ids.next()
        key = (schedule.namespace, schedule.schedule_id, expected_version)
        if definition:
            statement = "update_schedule"
            params: tuple[Any, ...] = (
                schedule.version, dump_definition(schedule.spec, schedule.action, schedule.policy),
                dump_state(schedule.state), schedule.updated_at_ms, write_id, *key,
            )  # fmt: skip
        else:
            statement = "update_schedule_state"
            params = (schedule.version, dump_state(schedule.state), schedule.updated_at_ms, write_id, *key)
        row = await self._run_cas(statement, params, schedule.ref, write_id, self._schedule_write_id(schedule.namespace, schedule.schedule_id))
        if row is _NOT_APPLIED_UNKNOWN:
            return False
        return row is None or bool(row.applied)

    async def delete_schedule(self, namespace: str, schedule_id: str, expected_version: int) -> bool:
        """Delete the schedule if its version is ``expected_version``. Its due
        entries stay and find nothing (or a successor with another uid)."""
        try:
            rows = await self._run("delete_schedule", (namespace, schedule_id, expected_version), cas=True)
        except _UNAVAILABLE_ERRORS as exc:
            # Unknown outcome: deleted or not, a serial read tells.
            if await self.get_schedule(namespace, schedule_id, serial=True) is not None:
                raise StoreUnavailable(f"Cassandra did not confirm the delete: {exc}") from exc
            rows = []
        if rows and not rows[0].applied:
            return False
        await self._run_plain("unindex_schedule", (namespace, schedule_id))
        return True

    async def list_schedules(self, namespace: str, after_id: str, limit: int) -> list[Schedule]:
        """Up to ``limit`` schedules of ``namespace`` with ids after ``after_id``, by id."""
        rows = await self._run_plain("list_schedules", (namespace, after_id, limit))
        found = await asyncio.gather(*(self.get_schedule(namespace, r.schedule_id) for r in rows))
        return [s for s in found if s is not None]

    # ---------------------------------------------------------------- gates

    def _gate_write_id(self, namespace: str, name: str) -> WriteIdReader:
        async def read() -> uuid.UUID | None:
            rows = await self._run("get_gate_write_id", (namespace, name))
            return rows[0].write_id if rows else None

        return read

    async def insert_gate(self, gate: Gate) -> bool:
        """Create the gate if its name is free (conditional); the listing row first."""
        await self._run_plain("index_gate", (gate.namespace, gate.name))
        write_id = self._write_ids.next()
        params = (
            gate.namespace, gate.name, gate.rate, gate.burst, gate.warmup_ms, gate.paused, gate.closed_until_ms,
            gate.tat_us, gate.ramp_from_ms, gate.version, gate.created_at_ms, gate.updated_at_ms, write_id,
            gate.max_in_flight,
        )  # fmt: skip
        row = await self._run_cas("insert_gate", params, f"gate {gate.namespace}/{gate.name}", write_id, self._gate_write_id(gate.namespace, gate.name))
        if row is _NOT_APPLIED_UNKNOWN:
            raise StoreUnavailable("Cassandra did not apply the gate insert; nothing was written")
        return row is None or bool(row.applied)

    async def get_gate(self, namespace: str, name: str, serial: bool = False) -> Gate | None:
        rows = await self._run_plain("get_gate_serial" if serial else "get_gate", (namespace, name))
        if not rows:
            return None
        r = rows[0]
        return Gate(
            namespace=r.namespace, name=r.gate, rate=r.rate or 1.0, burst=r.burst or 1, warmup_ms=r.warmup_ms or 0,
            paused=bool(r.paused), closed_until_ms=r.closed_until_ms or 0, tat_us=r.tat_us or 0,
            ramp_from_ms=r.ramp_from_ms or 0, version=r.version or 0, created_at_ms=r.created_at_ms or 0,
            updated_at_ms=r.updated_at_ms or 0, max_in_flight=r.max_in_flight or 0,
        )  # fmt: skip

    async def _gate_cas(self, statement: str, params: Sequence[Any], namespace: str, name: str, write_id: uuid.UUID) -> bool:
        """One conditional write on a gate row: applied or not (an unknown
        outcome is resolved by a serial read of its write id)."""
        row = await self._run_cas(statement, params, f"gate {namespace}/{name}", write_id, self._gate_write_id(namespace, name))
        if row is _NOT_APPLIED_UNKNOWN:
            return False
        return row is None or bool(row.applied)

    async def update_gate(self, gate: Gate, expected: Gate) -> bool:
        write_id = self._write_ids.next()
        params = (
            gate.rate, gate.burst, gate.warmup_ms, gate.paused, gate.closed_until_ms, gate.ramp_from_ms, gate.version,
            gate.updated_at_ms, write_id, gate.max_in_flight, gate.namespace, gate.name, expected.version,
            expected.closed_until_ms,
        )  # fmt: skip
        return await self._gate_cas("update_gate", params, gate.namespace, gate.name, write_id)

    async def reserve_gate(self, expected: Gate, tat_us: int, ramp_from_ms: int) -> bool:
        write_id = self._write_ids.next()
        params = (
            tat_us, ramp_from_ms, write_id, expected.namespace, expected.name, expected.version, expected.tat_us,
            expected.closed_until_ms,
        )  # fmt: skip
        return await self._gate_cas("reserve_gate", params, expected.namespace, expected.name, write_id)

    async def close_gate(self, namespace: str, name: str, until_ms: int) -> bool:
        """``closed_until = max(closed_until, until_ms)``: applied, or not applied
        because it already closes as long (both True); False when no such gate."""
        write_id = self._write_ids.next()
        params = (until_ms, write_id, namespace, name, until_ms)
        row = await self._run_cas("close_gate", params, f"gate {namespace}/{name}", write_id, self._gate_write_id(namespace, name))
        if row is None or (row is not _NOT_APPLIED_UNKNOWN and row.applied):
            return True
        current = await self.get_gate(namespace, name, serial=True)
        if current is None:
            return False
        if current.closed_until_ms >= until_ms:
            return True
        raise StoreUnavailable(f"Cassandra did not apply the close of gate {namespace}/{name}; nothing was written")

    async def delete_gate(self, namespace: str, name: str, expected_version: int) -> bool:
        """Delete the gate if its version is ``expected_version``."""
        try:
            rows = await self._run("delete_gate", (namespace, name, expected_version), cas=True)
        except _UNAVAILABLE_ERRORS as exc:
            if await self.get_gate(namespace, name, serial=True) is not None:
                raise StoreUnavailable(f"Cassandra did not confirm the delete: {exc}") from exc
            rows = []
        if rows and not rows[0].applied:
            return False
        await self._run_plain("unindex_gate", (namespace, name))
        return True

    async def list_gates(self, namespace: str, after: str, limit: int) -> list[Gate]:
        """Up to ``limit`` gates of ``namespace`` with names after ``after``, by name."""
        rows = await self._run_plain("list_gates", (namespace, after, limit))
        found = await asyncio.gather(*(self.get_gate(namespace, r.gate) for r in rows))
        return [g for g in found if g is not None]

    # ---------------------------------------------------------------- concurrency limits: definitions

    def _limit_write_id(self, namespace: str, scope: LimitScope, name: str) -> WriteIdReader:
        async def read() -> uuid.UUID | None:
            rows = await self._run("get_limit_write_id", (namespace, scope.value, name))
            return rows[0].write_id if rows else None

        return read

    async def _limit_cas(self, statement: str, params: Sequence[Any], key: tuple[str, LimitScope, str], write_id: uuid.UUID) -> bool:
        """One conditional write on a limit row: applied or not. An unknown
        outcome is resolved by a serial read of its write id; one that even
        that cannot resolve is StoreUnavailable (the caller may retry: every
        change names the version it expects, so a repeat never applies twice)."""
        namespace, scope, name = key
        label = f"concurrency limit {namespace}/{scope.value}={name}"
        row = await self._run_cas(statement, params, label, write_id, self._limit_write_id(namespace, scope, name))
        if row is _NOT_APPLIED_UNKNOWN:
            raise StoreUnavailable(f"Cassandra did not apply the change of {label}; nothing was written")
        return row is None or bool(row.applied)

    async def insert_limit(self, limit: ConcurrencyLimit) -> bool:
        """Create the limit if none of its (namespace, scope, name) exists (conditional)."""
        write_id = self._write_ids.next()
        params = (
            limit.namespace, limit.scope.value, limit.name, limit.max_running, limit.version, limit.created_at,
            limit.updated_at, write_id,
        )  # fmt: skip
        return await self._limit_cas("insert_limit", params, (limit.namespace, limit.scope, limit.name), write_id)

    async def get_limit(self, namespace: str, scope: LimitScope, name: str, serial: bool = False) -> ConcurrencyLimit | None:
        rows = await self._run_plain("get_limit_serial" if serial else "get_limit", (namespace, scope.value, name))
        found = [limit for limit in map(_limit_from_row, rows) if limit is not None]
        return found[0] if found else None

    async def update_limit(self, limit: ConcurrencyLimit, expected_version: int) -> bool:
        """Write max_running, version and updated_at only if the stored version is ``expected_version``."""
        write_id = self._write_ids.next()
        params = (
            limit.max_running, limit.version, limit.updated_at, write_id, limit.namespace, limit.scope.value, limit.name,
            expected_version,
        )  # fmt: skip
        return await self._limit_cas("update_limit", params, (limit.namespace, limit.scope, limit.name), write_id)

    async def delete_limit(self, namespace: str, scope: LimitScope, name: str, expected_version: int) -> bool:
        """Delete the limit if its version is ``expected_version`` (0: whatever it is)."""
        key = (namespace, scope.value, name)
        try:
            if expected_version:
                rows = await self._run("delete_limit", (*key, expected_version), cas=True)
            else:
                rows = await self._run("delete_limit_any", key, cas=True)
        except (StoreUnavailable, NoHostAvailable) as exc:
            raise StoreUnavailable(f"Cassandra is unreachable: {exc}") from exc
        except _UNAVAILABLE_ERRORS as exc:
            # Unknown outcome. A deleted row has no write id to compare, so the
            # serial read (which also finishes an in-flight Paxos round) asks
            # whether the row is gone: gone is "deleted", by us or by a delete
            # racing ours, which the caller cannot tell apart either way.
            if await self.get_limit(namespace, scope, name, serial=True) is not None:
                raise StoreUnavailable(f"Cassandra did not confirm the delete: {exc}") from exc
            return True
        return not rows or bool(rows[0].applied)

    async def list_limits(self, namespace: str | None) -> list[ConcurrencyLimit]:
        """The limits of ``namespace``, or of every namespace (None: a scan of
        the whole table, which holds only definitions). By namespace, scope, name."""
        if namespace is None:
            rows = await self._run_plain("list_all_limits", ())
        else:
            rows = await self._run_plain("list_limits", (namespace,))
        found = [limit for limit in map(_limit_from_row, rows) if limit is not None]
        return sorted(found, key=lambda v: (v.namespace, v.scope.value, v.name))
    # ---------------------------------------------------------------- concurrency-limit slots

    async def read_slots(self, group: SlotGroup) -> list[SlotHolder]:
        rows = await self._run_plain("read_slots", (group.namespace, group.scope.value, group.name))
        return [
            SlotHolder(index=r.slot, task_id=r.task_id, lease_token=r.lease_token or 0, taken_at=r.taken_at_ms or 0,
                       confirmed=bool(r.confirmed))  # fmt: skip
            for r in rows
            if r.task_id is not None
        ]

    async def _slot_cas(self, statement: str, params: Sequence[Any], group: SlotGroup, index: int, write_id: uuid.UUID) -> bool:
        """One conditional write on a slot row: applied or not (an unknown
        outcome is resolved by a serial read of the row's write id)."""
        key = (group.namespace, group.scope.value, group.name, index)

        async def read() -> uuid.UUID | None:
            rows = await self._run("get_slot_write_id", key)
            return rows[0].write_id if rows else None

        row = await self._run_cas(statement, params, f"slot {index} of {group.label()}", write_id, read)
        if row is _NOT_APPLIED_UNKNOWN:
            return False
        return row is None or bool(row.applied)

    async def take_slot(self, group: SlotGroup, holder: SlotHolder, previous: SlotHolder | None) -> bool:
        write_id = self._write_ids.next()
        key = (group.namespace, group.scope.value, group.name, holder.index)
        if previous is None:
            params: tuple[Any, ...] = (*key, holder.task_id, holder.lease_token, holder.taken_at, holder.confirmed, write_id)
            return await self._slot_cas("insert_slot", params, group, holder.index, write_id)
        params = (holder.task_id, holder.lease_token, holder.taken_at, holder.confirmed, write_id, *key,
                  previous.task_id, previous.lease_token)  # fmt: skip
        return await self._slot_cas("takeover_slot", params, group, holder.index, write_id)

    async def confirm_slot(self, group: SlotGroup, holder: SlotHolder) -> bool:
        write_id = self._write_ids.next()
        key = (group.namespace, group.scope.value, group.name, holder.index)
        return await self._slot_cas("confirm_slot", (write_id, *key, holder.task_id, holder.lease_token), group, holder.index, write_id)

    async def free_slot(self, group: SlotGroup, holder: SlotHolder) -> bool:
        write_id = self._write_ids.next()
        key = (group.namespace, group.scope.value, group.name, holder.index)
        return await self._slot_cas("free_slot", (write_id, *key, holder.task_id, holder.lease_token), group, holder.index, write_id)

    # ---------------------------------------------------------------- history

    async def add_history(self, entry: HistoryEntry) -> None:
        """One plain insert, with a write time taken from the entry itself
        (``_history_write_us``), not from the writing process's clock."""
        await self._run_plain(
            "add_history",
            (
                entry.task_id, entry.started_at, entry.key, entry.kind.value, entry.attempt, entry.lease_token,
                entry.worker_id, entry.ended_at, entry.outcome.value if entry.outcome else None, entry.error_type,
                entry.error, entry.progress_percent, entry.progress_message,
                entry.operation.value if entry.operation else None, entry.operator, entry.reason,
                _history_write_us(entry),
            ),
        )  # fmt: skip

    async def trim_history(self, task_id: uuid.UUID, keep: int) -> None:
        """A read of the newest ``keep`` entries' times (clustering keys only,
        one partition, newest first), then, if there are that many, ONE range
        delete of everything older than the last of them: a single range
        tombstone, however many entries it removes (a delete per entry would
        be a tombstone each). The clustering starts with ``started_at``, so
        "older than a time" is the only range a delete can name without
        knowing each entry's key; entries sharing the keep-th entry's exact
        time stay (reads are bounded by their LIMIT anyway)."""
        rows = await self._run_plain("history_times", (task_id, keep))
        if len(rows) < keep or keep <= 0:
            return
        await self._run_plain("trim_history", (task_id, rows[-1].started_at))

    async def read_history(self, task_id: uuid.UUID, limit: int) -> list[HistoryEntry]:
        rows = await self._run_plain("read_history", (task_id, limit))
        return [
            HistoryEntry(
                task_id=row.task_id,
                kind=HistoryKind(row.kind),
                started_at=row.started_at,
                attempt=row.attempt or 0,
                lease_token=row.lease_token or 0,
                worker_id=row.worker_id or "",
                ended_at=row.ended_at,
                outcome=AttemptOutcome(row.outcome) if row.outcome else None,
                error_type=row.error_type or "",
                error=row.error or "",
                progress_percent=row.progress_percent or 0.0,
                progress_message=row.progress_message or "",
                operation=Operation(row.operation) if row.operation else None,
                operator=row.operator or "",
                reason=row.reason or "",
                entry_id=uuid.UUID(row.entry[1:]) if row.entry.startswith("o") else None,
            )
            for row in rows
        ]

    # ---------------------------------------------------------------- checkpoints

    async def get_checkpoint(self, shard: int) -> int | None:
        rows = await self._run_plain("get_checkpoint", (shard,))
        return rows[0].checkpoint_ms if rows else None

    async def set_checkpoint(self, shard: int, at_ms: int) -> None:
        await self._run_plain("set_checkpoint", (shard, at_ms, int(time.time() * 1000)))


class _Inbox:
    """Driver answers, handed from the driver's thread to the asyncio loop.

    One ``call_soon_threadsafe`` per answer costs a self-pipe write and a loop
    wake-up each (10–15 % of a busy service's CPU); under load many answers
    arrive together, so they are queued and the loop is woken once per batch.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: collections.deque[tuple[asyncio.Future[list[Any]], list[Any] | None, BaseException | None]] = (
            collections.deque()
        )
        self._wake_pending = False

    def post(self, future: asyncio.Future[list[Any]], rows: list[Any] | None, exc: BaseException | None) -> None:
        # Runs on the driver's thread; deque.append is atomic.
        self._items.append((future, rows, exc))
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Clear the flag first: an answer posted while we drain either is
        # popped below or schedules a new drain; none can be left behind.
        self._wake_pending = False
        while self._items:
            _settle(*self._items.popleft())


# A new task row travels in one batch with its listing entry up to this size
# (its text and blob values): Cassandra logs a warning for every batch over
# 5 KiB (``batch_size_warn_threshold``) and refuses one over 50 KiB; a larger
# row (a big payload) goes as two requests.
BATCH_ROW_MAX_BYTES = 4 * 1024


def _row_bytes(params: Sequence[Any]) -> int:
    return sum(len(v) for v in params if isinstance(v, (bytes, str)))


@functools.lru_cache(maxsize=512)
def _row_class(colnames: tuple[str, ...]) -> Any:
    return collections.namedtuple("Row", [_clean_column_name(c) for c in colnames])


def cached_named_tuple_factory(colnames: list[str], rows: list[Any]) -> list[Any]:
    """The driver's named_tuple_factory builds a new namedtuple *class* (source
    text + exec) for every result set: 11–25 % of a service's CPU in the
    benchmark profile. Same rows, one class per column list."""
    cls = _row_class(tuple(colnames))
    return [cls(*row) for row in rows]


class _NotAppliedUnknown:
    """Marker: an unknown outcome that the serial read resolved as not applied."""


_NOT_APPLIED_UNKNOWN = _NotAppliedUnknown()


def _give_up(future: asyncio.Future[list[Any]], name: str) -> None:
    if future.done():
        return
    log.warning("Cassandra driver gave no answer to %s past its request timeout; treated as a timeout", name,
                extra=fields(store_event="driver_no_answer"))  # fmt: skip
    future.set_exception(OperationTimedOut(f"no answer from the driver to {name}"))


def _settle(future: asyncio.Future[list[Any]], rows: list[Any] | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(rows or [])


def _still_holds(task: Task, expect: Expect) -> bool:
    """Whether a conditional write's expectation is still true of ``task``."""
    return expect.holds_for(task)


def _cas_from_task(task: Task | None) -> CasResult:
    if task is None:
        return CasResult(applied=False, exists=False)
    return CasResult(
        applied=False,
        current_status=task.status,
        current_lease_token=task.lease_token,
        current_namespace=task.namespace,
    )


_SELECT_SCHEDULE = (
    "SELECT namespace, schedule_id, uid, shard, version, definition, state, "
    f"{_ms_column('created_at')}, {_ms_column('updated_at')} FROM schedules WHERE namespace = ? AND schedule_id = ?"
)

_GATE_COLUMNS = (
    "namespace, gate, rate, burst, warmup_ms, paused, closed_until_ms, tat_us, ramp_from_ms, version, created_at_ms, "
    "updated_at_ms, write_id, max_in_flight"
)
_SELECT_GATE = (
    "SELECT namespace, gate, rate, burst, warmup_ms, paused, closed_until_ms, tat_us, ramp_from_ms, version, "
    "created_at_ms, updated_at_ms, max_in_flight FROM gates WHERE namespace = ? AND gate = ?"
)

_LIMIT_COLUMNS = "namespace, scope, name, max_running, version, created_at_ms, updated_at_ms"
_SELECT_LIMITS = f"SELECT {_LIMIT_COLUMNS} FROM concurrency_limits"
_ONE_LIMIT = " WHERE namespace = ? AND scope = ? AND name = ?"


def _limit_from_row(r: Any) -> ConcurrencyLimit | None:
    """A limit row as the store's value; None for a row no version of this
    code writes (an unknown scope, a max_running that is not positive): such a
    row limits nothing, rather than failing every claim that reads the table."""
    try:
        scope = LimitScope(r.scope)
    except ValueError:
        log.warning("concurrency_limits row %s/%s=%s has an unknown scope; ignored", r.namespace, r.scope, r.name)
        return None
    if not r.max_running or r.max_running < 1:
        log.warning("concurrency_limits row %s/%s=%s has max_running %s; ignored", r.namespace, r.scope, r.name, r.max_running)
        return None
    return ConcurrencyLimit(
        namespace=r.namespace, scope=scope, name=r.name, max_running=r.max_running, version=r.version or 0,
        created_at=r.created_at_ms or 0, updated_at=r.updated_at_ms or 0,
    )  # fmt: skip


def _history_write_us(entry: HistoryEntry) -> int:
    """The write time of a history entry, in µs: an attempt's claim entry at
    its claim time, its end entry (the same row, overwritten) after both its
    end and its claim. So the end always wins over the claim, in whichever
    order the two plain writes arrive and whatever the skew between the
    clocks of the processes that wrote them (the claim is written by a
    TaskUpdater, a lease loss by a trigger, maybe on another machine). An
    operator's entry is written at its own time."""
    if entry.kind is HistoryKind.ATTEMPT and entry.ended_at is not None:
        return max(entry.ended_at, entry.started_at + 1) * 1000
    return entry.started_at * 1000


def _task_select_list() -> str:
    """Every column of ``tasks``, times as bigints of ms (see the module docstring)."""
    return ", ".join(_ms_column(c) if c in _TIME_COLUMNS else c for c in _task_columns_names())


def _task_columns_names() -> list[str]:
    sample = Task(task_id=uuid.UUID(int=0), namespace="", type="", payload=b"", shard=0)
    return [*_task_columns(sample).keys(), "write_id"]
