"""Shared pytest fixtures: real, test-only Cassandra and ZooKeeper servers.

Integration tests ask for the session-scoped ``infra`` fixture and get their
own Cassandra and ZooKeeper on free ports, with data under
``<repo>/.leasesched/test-<pid>/``, so a developer's running `infra up`
servers are never touched and two test sessions can run at once. The
Cassandra download is shared with the developer's (``<repo>/.leasesched/dist``)
so it happens once per checkout. Unit tests never request the fixture and pay
nothing for it.

Set LEASESCHED_KEEP_TEST_DATA=1 to keep the data and logs of a session after it
ends (for post-mortems of a failed run).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from leasesched.config import Config
from leasesched.infra.local import LocalInfra
from leasesched.testing import free_ports, pid_alive

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".leasesched"
DIST_DIR = STATE_DIR / "dist"
TEST_KEYSPACE = "leasesched_test"
REPLICATED_NODES = 3


def _remove_stale_test_dirs() -> None:
    """Stop servers and delete data left by test sessions that died without cleanup.

    A session killed with SIGKILL (or a second Ctrl-C) cannot run its
    teardown; its servers would keep running, holding ~1.5 GB of memory.
    """
    for folder in STATE_DIR.glob("test-*"):
        try:
            pid = int(folder.name.removeprefix("test-"))
        except ValueError:
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        for nodes in (1, REPLICATED_NODES):  # the session's servers and the replicated cluster's
            shape = Config(home=str(folder), cassandra_nodes=nodes, zk_nodes=nodes)
            LocalInfra.from_config(shape, dist_dir=DIST_DIR).down(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the real servers, so `-m "not integration"` skips them."""
    for item in items:
        if "infra" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def infra() -> Iterator[LocalInfra]:
    """A running Cassandra and ZooKeeper for this test session.

    Yields a ``LocalInfra``: ``.cassandra`` (CassandraServer), ``.zookeeper``
    (ZooKeeperServer) and ``.config`` (a Config pointing at them, keyspace
    ``leasesched_test``). Tests may stop, kill, pause and restart the servers
    (chaos tests do) but must leave them running when they finish.
    """
    _remove_stale_test_dirs()
    home = STATE_DIR / f"test-{os.getpid()}"
    cassandra_port, storage_port, zk_port = free_ports(3)
    config = Config(
        home=str(home),
        cassandra_port=cassandra_port,
        cassandra_storage_port=storage_port,
        zk_hosts=f"127.0.0.1:{zk_port}",
        keyspace=TEST_KEYSPACE,
        # Explicitly off for the tests of other features; tests/integration/test_auth.py turns it on.
        auth="off",
    )
    local = LocalInfra.from_config(config, dist_dir=DIST_DIR)
    try:
        local.up()  # both at once; also installs Cassandra on first use
        yield local
    finally:
        local.down(timeout=30)
        if not os.environ.get("LEASESCHED_KEEP_TEST_DATA"):
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def make_cluster(infra: LocalInfra, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """``make_cluster(triggers=2, workers=2, slots=8)`` → a started ``tests.cluster.LiveCluster``
    of real processes with its own keyspace and ZooKeeper root; stopped after the test.
    ``metrics=True``: every process serves /metrics on its own port (``tests.observe``)."""
    from tests.cluster import LiveCluster, cluster_config
    from tests.observe import MetricsGroup
    from tests.processes import SessionGroup

    clusters: list[LiveCluster] = []

    def make(overrides: dict[str, object] | None = None, metrics: bool = False, **kwargs: int) -> LiveCluster:
        cfg = cluster_config(infra.config, request.node.name).with_overrides(**(overrides or {}))
        group = (MetricsGroup if metrics else SessionGroup)(log_dir=tmp_path / f"logs-{len(clusters)}")
        cluster = LiveCluster(cfg=cfg, group=group, folder=tmp_path)
        clusters.append(cluster)
        return cluster.start(**kwargs)

    yield make
    for cluster in clusters:
        cluster.dispose()


@pytest.fixture(scope="module")
def replicated_infra() -> Iterator[LocalInfra]:
    """A replicated store and coordinator for one test module: 3 Cassandra nodes
    (127.0.0.1-3, replication factor 3, QUORUM / SERIAL) and a 3-server ZooKeeper
    ensemble, on free ports, in this session's folder (the shapes' folders
    differ, so it sits beside the ``infra`` fixture's single node).

    Tests may kill, pause and restart any node but must leave all running."""
    _remove_stale_test_dirs()
    home = STATE_DIR / f"test-{os.getpid()}"
    cassandra_port, storage_port, zk_port, quorum_port, election_port = free_ports(5)
    config = Config(
        home=str(home),
        cassandra_nodes=REPLICATED_NODES,
        zk_nodes=REPLICATED_NODES,
        cassandra_port=cassandra_port,
        cassandra_storage_port=storage_port,
        zk_hosts=f"127.0.0.1:{zk_port}",
        zk_quorum_port=quorum_port,
        zk_election_port=election_port,
        keyspace=TEST_KEYSPACE,
        auth="off",
    )
    local = LocalInfra.from_config(config, dist_dir=DIST_DIR)
    try:
        local.up()
        yield local
    finally:
        local.down(timeout=30)
        if not os.environ.get("LEASESCHED_KEEP_TEST_DATA"):
            for server in local.servers:
                shutil.rmtree(server.data_dir, ignore_errors=True)

