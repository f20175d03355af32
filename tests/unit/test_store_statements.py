"""Every statement the Cassandra store prepares names its tables in the
configured keyspace, so the session needs no ``USE`` (Cassandra 5.0 warns a
session that prepares unqualified statements under one: ``make run`` printed
that warning)."""

from __future__ import annotations

import re
from typing import Any

from leasesched.config import Config
from leasesched.store.cassandra import CassandraStore, in_keyspace

TABLE_AFTER = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+(\S+)", re.IGNORECASE)


def test_in_keyspace_qualifies_each_table_once() -> None:
    assert in_keyspace("SELECT a FROM tasks WHERE b = ?", "ks") == "SELECT a FROM ks.tasks WHERE b = ?"
    assert in_keyspace("INSERT INTO due_index (a) VALUES (?)", "ks") == "INSERT INTO ks.due_index (a) VALUES (?)"
    assert in_keyspace("UPDATE tasks SET a = ? WHERE b = ? IF c = ?", "ks") == "UPDATE ks.tasks SET a = ? WHERE b = ? IF c = ?"
    assert in_keyspace("DELETE FROM gates WHERE a = ?", "ks") == "DELETE FROM ks.gates WHERE a = ?"
    assert in_keyspace("SELECT a FROM other.tasks", "ks") == "SELECT a FROM other.tasks"  # already qualified


def test_every_prepared_statement_names_its_table_in_the_keyspace() -> None:
    prepared: list[str] = []

    class Statement:
        consistency_level: Any = None
        is_idempotent = True

    class Session:
        def prepare(self, cql: str) -> Statement:
            prepared.append(cql)
            return Statement()

    store = CassandraStore(Config(keyspace="probe_ks"))
    store._prepare_all(Session())  # type: ignore[arg-type]
    store._session = Session()  # type: ignore[assignment]
    store._update_stmt(("status",), ("lease_token",))
    assert len(prepared) > 50
    for cql in prepared:
        tables = TABLE_AFTER.findall(cql)
        assert tables, cql
        assert all(t.startswith("probe_ks.") for t in tables), cql
