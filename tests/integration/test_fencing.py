"""worker/fencing.py against the real Cassandra: a stale lease token cannot write.

Each test uses its own key in a table of the module's keyspace, so the
tests are independent. Semantics under test (see the module docstring): a
write with token t applies iff no larger token has written; the same token
may write again (a replay applies and leaves the same row).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy
from cassandra.query import dict_factory

from leasesched.config import Config
from worker.fencing import FencedTable, StaleLease, fenced_write


@pytest.fixture(scope="module")
def session(module_config: Config) -> Iterator[Session]:
    cluster = Cluster(
        module_config.cassandra_contact_points,
        port=module_config.cassandra_port,
        protocol_version=module_config.cassandra_protocol_version,
        execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy())},
    )
    try:
        s = cluster.connect(module_config.keyspace)
        s.execute("CREATE TABLE IF NOT EXISTS fenced (id text PRIMARY KEY, body text, fence_token bigint)")
        s.execute("CREATE TABLE IF NOT EXISTS fenced2 (a text, b int, body text, tok bigint, PRIMARY KEY (a, b))")
        yield s
    finally:
        cluster.shutdown()


def _row(session: Session, key: str) -> tuple[Any, Any]:
    row = session.execute("SELECT body, fence_token FROM fenced WHERE id = %s", (key,)).one()
    return (row.body, row.fence_token) if row is not None else (None, None)


def test_older_token_is_refused_newer_applies_same_token_replays(session: Session) -> None:
    table = FencedTable(session, "fenced")
    key = {"id": str(uuid.uuid4())}
    assert table.write(key, {"body": "five"}, 5)  # first write: the row is created
    assert _row(session, key["id"]) == ("five", 5)
    assert not table.write(key, {"body": "four"}, 4)  # stale: refused at the resource
    assert _row(session, key["id"]) == ("five", 5)
    assert table.write(key, {"body": "six"}, 6)
    assert table.write(key, {"body": "six"}, 6)  # a replay (lost answer, retry) applies again, same row
    assert _row(session, key["id"]) == ("six", 6)
    assert not table.write(key, {"body": "five again"}, 5)
    with pytest.raises(StaleLease):
        table.write_or_raise(key, {"body": "five again"}, 5)
    assert _row(session, key["id"]) == ("six", 6)


def test_two_writers_racing_end_with_the_newer_token(session: Session) -> None:
    table = FencedTable(session, "fenced")
    # Both orders, sequentially: the result never depends on who came first.
    for first, second in ((7, 8), (8, 7)):
        key = {"id": str(uuid.uuid4())}
        table.write(key, {"body": f"token {first}"}, first)
        table.write(key, {"body": f"token {second}"}, second)
        assert _row(session, key["id"]) == ("token 8", 8)
    # Really at once, on a missing row (both take the creation path) and on an existing one.
    for existing in (False, True):
        for _ in range(5):
            key = {"id": str(uuid.uuid4())}
            if existing:
                assert table.write(key, {"body": "token 1"}, 1)
            results: dict[int, bool] = {}
            barrier = threading.Barrier(2)

            def race(token: int, key: dict[str, str] = key) -> None:
                barrier.wait(timeout=10)
                results[token] = table.write(key, {"body": f"token {token}"}, token)

            threads = [threading.Thread(target=race, args=(t,)) for t in (7, 8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert results[8] is True  # the newest token is never refused
            assert _row(session, key["id"]) == ("token 8", 8)


def test_row_written_outside_the_fence_is_claimed_then_fenced(session: Session) -> None:
    key = str(uuid.uuid4())
    session.execute("INSERT INTO fenced (id, body) VALUES (%s, %s)", (key, "unfenced"))  # no token
    assert fenced_write(session, "fenced", {"id": key}, {"body": "three"}, 3)
    assert _row(session, key) == ("three", 3)
    assert not fenced_write(session, "fenced", {"id": key}, {"body": "two"}, 2)


def test_compound_key_custom_token_column_dict_rows_and_async(module_config: Config, session: Session) -> None:
    cluster = Cluster(module_config.cassandra_contact_points, port=module_config.cassandra_port,
                      protocol_version=module_config.cassandra_protocol_version)
    try:
        dict_session = cluster.connect(module_config.keyspace)
        dict_session.row_factory = dict_factory  # the fence must not depend on the row factory
        table = FencedTable(dict_session, f"{module_config.keyspace}.fenced2", token_column="tok")
        key = {"a": str(uuid.uuid4()), "b": 1}
        assert asyncio.run(table.write_async(key, {"body": "ten"}, 10))
        assert not table.write(key, {"body": "nine"}, 9)
        assert table.write({**key, "b": 2}, {"body": "other row"}, 9)  # another row has its own fence
        row = session.execute("SELECT body, tok FROM fenced2 WHERE a = %s AND b = 1", (key["a"],)).one()
        assert (row.body, row.tok) == ("ten", 10)
    finally:
        cluster.shutdown()


def test_bad_names_are_refused_before_any_cql(session: Session) -> None:
    with pytest.raises(ValueError):
        FencedTable(session, "fenced; DROP TABLE x")
    table = FencedTable(session, "fenced")
    with pytest.raises(ValueError):
        table.write({"id": "x"}, {"fence_token": 1}, 1)  # the token column is the fence's
    with pytest.raises(ValueError):
        table.write({"id": "x"}, {"body = 'y'": 1}, 1)
