"""Versioned CQL migrations, applied idempotently (``leasesched schema apply``).

Migrations are the numbered ``migrations/NNN_name.cql`` files of this package.
Each applied version is recorded in ``schema_migrations``; every statement is
written ``IF NOT EXISTS`` as well, so a run interrupted half-way is simply run
again. The keyspace and its replication come from configuration, never from
the CQL files, so the same files serve a laptop and a multi-DC cluster.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, cast
from dataclasses import dataclass
from importlib import resources

import backoff
from cassandra import InvalidRequest, OperationTimedOut, ReadFailure, Unavailable
from cassandra.cluster import NoHostAvailable, Session
from cassandra.connection import ConnectionException

from leasesched.config import Config
from leasesched.store.cassandra import new_cluster, replication_cql

log = logging.getLogger(__name__)

# How long a schema change may take to reach every node (a node restarted a
# moment ago pulls the schema it missed only after a delay of up to a minute).
SCHEMA_WAIT_S = 90


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def load_migrations() -> list[Migration]:
    folder = resources.files("leasesched.store") / "migrations"
    found = []
    for item in folder.iterdir():
        if not item.name.endswith(".cql"):
            continue
        version_text, _, rest = item.name.partition("_")
        text = item.read_text()
        lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
        statements = tuple(s.strip() for s in "\n".join(lines).split(";") if s.strip())
        found.append(Migration(int(version_text), rest.removesuffix(".cql"), statements))
    return sorted(found, key=lambda m: m.version)


def _wait_schema_agreement(session: Session) -> None:
    # On a multi-node cluster a table created on one coordinator is not yet
    # known to the others; the driver can wait for every node to agree.
    cluster = session.cluster
    if not cluster.control_connection.wait_for_schema_agreement(wait_time=SCHEMA_WAIT_S):
        log.warning("schema agreement not reached within %d s", SCHEMA_WAIT_S)


@backoff.on_exception(
    backoff.constant, (InvalidRequest, OperationTimedOut, Unavailable, NoHostAvailable, ConnectionException, ReadFailure),
    max_time=SCHEMA_WAIT_S, interval=2, jitter=None,
    on_backoff=lambda d: log.warning("schema statement failed, trying again: %s", d["exception"]),
)  # fmt: skip
def _execute(session: Session, statement: str, params: tuple[object, ...] | None = None) -> object:
    """One schema statement. Every one is idempotent (IF NOT EXISTS), so a
    failure is tried again: a node that has just rejoined may not know the
    keyspace yet (schema disagreement) or answer in time. A test cluster whose
    two nodes had just been restarted disagreed for more than 30 s and its
    ``USE`` failed with "Failed to set keyspace on all hosts" (a
    ConnectionException): a restarted node pulls the schema it missed only
    after a delay, so the statement is tried again for up to a minute and a half."""
    return session.execute(statement, params)


def apply(cfg: Config) -> list[Migration]:
    """Create the keyspace if needed and apply missing migrations; returns those applied."""
    cluster = new_cluster(cfg)
    try:
        session = cluster.connect()
        _execute(
            session,
            f"CREATE KEYSPACE IF NOT EXISTS {cfg.keyspace} WITH replication = {replication_cql(cfg.replication_spec)}",
        )
        _wait_schema_agreement(session)
        _execute(session, f"USE {cfg.keyspace}")  # the driver's set_keyspace, tried again like the rest
        _execute(session, "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text, applied_at timestamp)")
        _wait_schema_agreement(session)
        # Tried again too: a replica still pulling the new table answers
        # INCOMPATIBLE_SCHEMA (a ReadFailure; a 3-node cluster just started, one CI run).
        rows = cast(Iterable[Any], _execute(session, "SELECT version FROM schema_migrations"))
        done = {row.version for row in rows}
        applied = []
        for migration in load_migrations():
            if migration.version in done:
                continue
            for statement in migration.statements:
                _execute(session, statement)
            _wait_schema_agreement(session)
            _execute(
                session,
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                (migration.version, migration.name, int(time.time() * 1000)),
            )
            applied.append(migration)
            log.info("applied migration %03d_%s", migration.version, migration.name)
        return applied
    finally:
        cluster.shutdown()


def drop_keyspace(cfg: Config) -> None:
    """Tests only: start from an empty keyspace."""
    cluster = new_cluster(cfg)
    try:
        # Idempotent, and tried again like a migration: a drop of a keyspace
        # with many tables on a busy node outlasted the driver's 10 s (CI).
        _execute(cluster.connect(), f"DROP KEYSPACE IF EXISTS {cfg.keyspace}")
    finally:
        cluster.shutdown()
