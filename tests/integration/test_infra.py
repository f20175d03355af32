"""The local infrastructure really works: real servers, real clients, real restarts.

The first tests need no servers: they check ManagedProcess, which the chaos
tests rely on, with plain `sleep` processes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy
from kazoo.client import KazooClient

from leasesched.config import Config
from leasesched.infra.cassandra import CASSANDRA_VERSION
from leasesched.infra.local import LocalInfra, zk_client_port
from leasesched.infra.process import ManagedProcess
from tests.cluster import wait_for

# -- ManagedProcess ----------------------------------------------------------


def _sleeper(tmp_path: Path, argv: list[str] | None = None) -> ManagedProcess:
    return ManagedProcess(
        name="sleeper",
        pid_file=tmp_path / "sleeper.pid",
        log_file=tmp_path / "sleeper.log",
        argv=argv or ["sleep", "60"],
    )


def test_process_start_pause_resume_stop(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    pid = proc.start()
    try:
        assert proc.is_running() and proc.pid() == pid
        proc.pause()
        assert proc.is_paused()
        proc.resume()
        assert not proc.is_paused()
        proc.pause()  # stop() must also end a paused process
    finally:
        assert proc.stop(timeout=5)
    assert not proc.is_running()
    assert not proc.pid_file.exists()
    assert not proc.stop()  # nothing left to stop


def test_process_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    ready = tmp_path / "trap-installed"
    proc = _sleeper(tmp_path, ["sh", "-c", f"trap '' TERM; touch {ready}; sleep 60 & wait"])
    proc.start()
    wait_for(ready.exists, 10, "the shell to install its trap")  # from then on SIGTERM is ignored
    started = time.monotonic()
    assert proc.stop(timeout=0.5)
    assert time.monotonic() - started < 5
    assert not proc.is_running()


def test_process_kill9(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    proc.start()
    assert proc.kill9()
    assert not proc.is_running()


def test_stale_pid_file_is_not_running(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    # PID 1 is alive but started at another time: a reused PID, not ours.
    proc.pid_file.write_text("1\n-1\n")
    assert not proc.is_running()
    assert not proc.pid_file.exists()
    proc.pid_file.write_text("garbage\n")
    assert proc.pid() is None


def test_zk_client_port_parsing() -> None:
    assert zk_client_port("127.0.0.1:2182") == 2182
    assert zk_client_port("a:1,b:2/chroot") == 1
    assert zk_client_port("zk.example") == 2181
    assert zk_client_port("[::1]:3000") == 3000


# -- the real servers ---------------------------------------------------------


@pytest.fixture
def cql(infra: LocalInfra) -> Iterator[Session]:
    cluster = _cluster(infra)
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def _cluster(infra: LocalInfra) -> Cluster:
    return Cluster(
        infra.config.cassandra_contact_points,
        port=infra.config.cassandra_port,
        protocol_version=infra.config.cassandra_protocol_version,
        execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy())},
    )


def test_cassandra_answers_cql(cql: Session) -> None:
    """The store is the pinned Cassandra 5.0, spoken to in native protocol v4
    (the default since issue 17: the driver's v5 framing costs CPU in Python;
    leasesched/config.py), with Paxos v2."""
    row = cql.execute("SELECT release_version FROM system.local").one()
    assert row.release_version == CASSANDRA_VERSION
    assert cql.cluster.protocol_version == Config().cassandra_protocol_version == 4
    paxos = cql.execute("SELECT value FROM system_views.settings WHERE name = 'paxos_variant'").one()
    assert paxos.value == "v2"


def test_zookeeper_gives_a_session(infra: LocalInfra) -> None:
    client = KazooClient(hosts=infra.config.zk_hosts, timeout=5.0)
    client.start(timeout=10)
    try:
        path = client.create("/infra-test-", b"x", ephemeral=True, sequence=True)
        assert client.get(path)[0] == b"x"
    finally:
        client.stop()
        client.close()


def test_status_reports_running(infra: LocalInfra) -> None:
    cassandra, zookeeper = infra.status()
    assert cassandra.running and cassandra.listening and cassandra.pid is not None
    assert cassandra.port == infra.config.cassandra_port
    assert zookeeper.running and zookeeper.listening and zookeeper.pid is not None
    assert zookeeper.port == zk_client_port(infra.config.zk_hosts)
    assert cassandra.log_file.exists() and zookeeper.log_file.exists()


def test_up_is_idempotent(infra: LocalInfra) -> None:
    pids = [s.pid for s in infra.status()]
    results = infra.up(timeout=30)
    assert [r.started for r in results] == [False, False]
    assert [s.pid for s in infra.status()] == pids


def _write_then(infra: LocalInfra, interrupt: str) -> None:
    """Write a row, interrupt Cassandra (clean stop or SIGKILL), restart, read it back."""
    keyspace = f"infra_{interrupt}"
    cluster = _cluster(infra)
    session = cluster.connect()
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    )
    session.execute(f"CREATE TABLE IF NOT EXISTS {keyspace}.kv (k uuid PRIMARY KEY, v text)")
    key = uuid.uuid4()
    session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES (%s, %s)", (key, "survives"))
    cluster.shutdown()

    if interrupt == "stop":
        assert infra.cassandra.stop()
    else:
        assert infra.cassandra.kill9()
    status = infra.cassandra.status()
    assert not status.running and status.pid is None and not status.listening

    infra.cassandra.start()
    infra.cassandra.wait_ready(infra.config.cassandra_start_timeout_s)
    assert infra.cassandra.status().running

    cluster = _cluster(infra)
    try:
        session = cluster.connect()
        row = session.execute(f"SELECT v FROM {keyspace}.kv WHERE k = %s", (key,)).one()
        assert row is not None and row.v == "survives"
        session.execute(f"DROP KEYSPACE {keyspace}")
    finally:
        cluster.shutdown()


def test_cassandra_restart_keeps_data(infra: LocalInfra) -> None:
    _write_then(infra, "stop")


def test_cassandra_kill9_keeps_acknowledged_writes(infra: LocalInfra) -> None:
    # Holds only because the commit log syncs in batch mode (see infra/cassandra.py).
    _write_then(infra, "kill9")


def test_zookeeper_restart_keeps_data(infra: LocalInfra) -> None:
    client = KazooClient(hosts=infra.config.zk_hosts, timeout=5.0)
    client.start(timeout=10)
    path = client.create("/infra-test-persistent-", b"kept", sequence=True)
    client.stop()
    client.close()

    assert infra.zookeeper.stop()
    assert not infra.zookeeper.status().running
    infra.zookeeper.start()
    infra.zookeeper.wait_ready(infra.config.zk_start_timeout_s)

    client = KazooClient(hosts=infra.config.zk_hosts, timeout=5.0)
    client.start(timeout=10)
    try:
        assert client.get(path)[0] == b"kept"
        client.delete(path)
    finally:
        client.stop()
        client.close()


def test_paused_zookeeper_is_reported_and_recovers(infra: LocalInfra) -> None:
    infra.zookeeper.pause()
    try:
        assert infra.zookeeper.status().paused
        assert not infra.zookeeper.probe()
    finally:
        infra.zookeeper.resume()
    infra.zookeeper.wait_ready(30)
    assert not infra.zookeeper.status().paused
