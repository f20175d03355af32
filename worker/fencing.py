"""Fenced side effects: a write that a stale execution of a task cannot make.

Why this exists. A worker stops its handler, or ends its own process, before
any other worker may start the task. But a pause (GC, SIGSTOP, a slow disk)
can fall between a handler's last look at its lease and its write, and land
that write after the next execution began. Only the resource can refuse it:
every execution of a task carries a lease token (``ctx.lease_token``) larger
than every earlier execution's, so the resource keeps the largest token that
has written and refuses a smaller one.

Semantics (the same for every store): a write with token ``t`` applies iff no
write with a token larger than ``t`` has applied to that row, i.e. the stored
token ``<= t``. The *same* token may write again: one token belongs to one
execution, so that is the same execution writing twice or retrying a write
whose answer it lost; replaying a write is therefore harmless (idempotent when
it carries the same values). Tokens order the executions of *one* task; they
are not comparable between tasks, so fence rows that one task owns (for
example keyed by ``ctx.task_id`` or by the output the task is responsible for).

Cassandra (this module)::

    # CREATE TABLE reports (id text PRIMARY KEY, body text, fence_token bigint)
    reports = FencedTable(session, "reports")
    applied = reports.write({"id": ctx.task_id}, {"body": body}, ctx.lease_token)

The fence is two lightweight transactions at most: ``INSERT ... IF NOT
EXISTS`` for the first write; when the row exists, its answer carries the
stored token, and if that is not larger than ours,
``UPDATE t SET ..., fence_token = ? WHERE key = ? IF fence_token <= ?``
(Cassandra 4.0+; ``IF fence_token = null`` for a row written outside the
fence, as ``null <= t`` is false). A refused condition answers with the token
now stored, and the loop decides again: it applies, or finds a larger token
(refused); writers with smaller tokens racing each other no longer make it go
round. Every statement may be repeated safely (the same token applies again),
so a conditional write whose outcome is unknown (timeout) is simply retried.
Write fenced rows only through the fence: a plain write carries a client
timestamp that can silently win over a lightweight transaction's (see
leasesched/store/cassandra.py).

Any other store with a conditional write: store the token next to the data
and make the write conditional on it, with an upsert for the first write.
PostgreSQL, in one statement (one row changed: applied; none: stale)::

    INSERT INTO reports (id, body, fence_token) VALUES (%s, %s, %s)
    ON CONFLICT (id) DO UPDATE SET body = excluded.body, fence_token = excluded.fence_token
    WHERE reports.fence_token <= excluded.fence_token

or ``UPDATE reports SET body = ?, fence_token = ? WHERE id = ? AND fence_token <= ?``
followed, when it changed no row and the row is missing, by an insert that
fails on a duplicate key (then go round again). Object stores with
conditional puts (ETag / generation match) fence the same way by keeping the
token in the object's metadata.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import backoff
from cassandra import ReadTimeout, Unavailable, WriteTimeout
from cassandra.cluster import OperationTimedOut, Session

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
_TABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,47}\.)?[A-Za-z_][A-Za-z0-9_]{0,47}")
# Outcome unknown, or nothing done. The same token may always write again, so
# repeating any statement here is safe; the loop in write() then decides.
_RETRYABLE = (WriteTimeout, ReadTimeout, Unavailable, OperationTimedOut)
_ROUNDS = 10
_UNSEEN = object()  # the stored token is not known yet


class StaleLease(Exception):
    """A newer execution of the task has written: this execution's lease is gone.

    Not a ``PermanentError``: the task is fine, only this execution is stale.
    Its report will be refused anyway (reports are conditional on the token).
    """


class FencedTable:
    """Writes to one Cassandra table, each fenced by a lease token.

    The table has a ``bigint`` token column (``fence_token`` unless named
    otherwise). Statements are prepared once per set of columns and reused,
    so keep one instance per table (thread-safe; share it between handlers).
    """

    def __init__(self, session: Session, table: str, token_column: str = "fence_token") -> None:
        if not _TABLE.fullmatch(table):
            raise ValueError(f"table must be [keyspace.]name of letters, digits and _: {table!r}")
        _check_identifiers([token_column])
        self._session = session
        self._table = table
        self._token = token_column
        self._lock = threading.Lock()
        self._prepared: dict[tuple[str, tuple[str, ...], tuple[str, ...]], Any] = {}

    def write(self, key: Mapping[str, Any], values: Mapping[str, Any], token: int) -> bool:
        """Write ``values`` to the row ``key`` (every primary key column) as
        the execution holding ``token``. True: applied. False: refused, a
        larger token has written (this execution is stale)."""
        keys, cols = self._columns(key, values)
        key_params = [key[k] for k in keys]
        value_params = [values[c] for c in cols]
        seen: int | None | object = _UNSEEN
        for _ in range(_ROUNDS):
            if seen is _UNSEEN:
                result = self._execute(self._statement("insert", keys, cols), [*key_params, *value_params, token])
            elif seen is None:
                result = self._execute(self._statement("claim", keys, cols), [*value_params, token, *key_params])
            else:
                params = [*value_params, token, *key_params, token]
                result = self._execute(self._statement("update", keys, cols), params)
            applied, exists, current = self._outcome(result)
            if applied:
                return True
            if current is not None and current > token:
                return False  # a newer execution has written
            seen = current if exists else _UNSEEN
        raise RuntimeError(f"fenced write to {self._table}: no decision after {_ROUNDS} rounds of racing writers")

    def write_or_raise(self, key: Mapping[str, Any], values: Mapping[str, Any], token: int) -> None:
        """``write``, raising ``StaleLease`` when refused: for handlers that should stop there."""
        if not self.write(key, values, token):
            raise StaleLease(f"a newer execution than lease token {token} has written to {self._table}")

    async def write_async(self, key: Mapping[str, Any], values: Mapping[str, Any], token: int) -> bool:
        """``write`` for async handlers, without blocking the worker's event loop."""
        return await asyncio.to_thread(self.write, key, values, token)

    # ------------------------------------------------------------------ helpers

    def _columns(self, key: Mapping[str, Any], values: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        keys, cols = tuple(sorted(key)), tuple(sorted(values))
        if not keys:
            raise ValueError("key must name every primary key column")
        _check_identifiers([*keys, *cols])
        if self._token in key or self._token in values or set(keys) & set(cols):
            raise ValueError(f"{self._token!r} is written by the fence; key and value columns must differ")
        return keys, cols

    def _statement(self, kind: str, keys: tuple[str, ...], cols: tuple[str, ...]) -> Any:
        with self._lock:
            found = self._prepared.get((kind, keys, cols))
        if found is not None:
            return found
        sets = ", ".join(f"{c} = ?" for c in (*cols, self._token))
        where = " AND ".join(f"{k} = ?" for k in keys)
        if kind == "update":
            cql = f"UPDATE {self._table} SET {sets} WHERE {where} IF {self._token} <= ?"
        elif kind == "claim":
            cql = f"UPDATE {self._table} SET {sets} WHERE {where} IF {self._token} = null"
        else:
            names = ", ".join((*keys, *cols, self._token))
            cql = f"INSERT INTO {self._table} ({names}) VALUES ({', '.join('?' * (len(keys) + len(cols) + 1))}) IF NOT EXISTS"
        prepared = self._session.prepare(cql)
        with self._lock:
            self._prepared[(kind, keys, cols)] = prepared
        return prepared

    @backoff.on_exception(backoff.expo, _RETRYABLE, max_tries=4, factor=0.1, logger=None)
    def _execute(self, statement: Any, params: Sequence[Any]) -> Any:
        return self._session.execute(statement, params)

    def _outcome(self, result: Any) -> tuple[bool, bool, int | None]:
        """(applied, row exists, stored token) of a lightweight transaction's answer.

        A refused condition answers ``[applied]`` plus the row's columns when
        the row exists, ``[applied]`` alone when it does not. Works with the
        driver's tuple, named-tuple and dict row factories."""
        names = list(result.column_names or [])
        row = result.current_rows[0]
        cells = dict(row) if isinstance(row, Mapping) else dict(zip(names, row))
        applied = bool(cells.get("[applied]"))
        exists = len(cells) > 1
        current = cells.get(self._token)
        return applied, exists, None if current is None else int(current)


def fenced_write(
    session: Session, table: str, key: Mapping[str, Any], values: Mapping[str, Any], token: int, token_column: str = "fence_token"
) -> bool:
    """One fenced write (see the module docstring); keep a ``FencedTable`` for many."""
    return FencedTable(session, table, token_column).write(key, values, token)


def _check_identifiers(names: Sequence[str]) -> None:
    for name in names:
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"column names must be unquoted CQL identifiers: {name!r}")
