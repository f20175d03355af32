"""The local infrastructure as one unit: Cassandra node(s) and ZooKeeper server(s).

Everything is derived from a ``Config`` so that the servers listen exactly
where the scheduler processes will look for them:

* ``<home>/dist``        Cassandra's jars and Maven's cache (shareable)
* ``<home>/cassandra5``  the single node's config, data, commit log, logs, PID file
* ``<home>/cassandra5-x3/node<n>``  node n of a 3-node cluster (on 127.0.0.n)
* ``<home>/zookeeper``   the standalone ZooKeeper's config, data, log, PID file
* ``<home>/zookeeper-x3/server<n>``  server n of a 3-server ensemble (on 127.0.0.n)

A cluster's folders are named by its size, so a home used with one node and
later with three never mixes their data (a node's token ranges and the
keyspace's replication differ between the two). The 2.1 data of earlier
versions (``<home>/cassandra``) is not read: 5.0 cannot open it.

``up()`` is idempotent, so ``make run`` and scripts can call it every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from leasesched.config import Config, local_hosts
from leasesched.infra.cassandra import CassandraServer, initial_token
from leasesched.infra.process import InfraError, ServerStatus
from leasesched.infra.zookeeper import ZooKeeperServer

T = TypeVar("T")
MAX_NODES = 9


def zk_client_port(zk_hosts: str) -> int:
    """The port of the first host in a kazoo connection string.

    Accepts "host:port,host:port/chroot" and bare hosts (ZooKeeper's default
    port 2181 then applies).
    """
    first = zk_hosts.split("/", 1)[0].split(",")[0].strip()
    if not first:
        raise ValueError(f"no ZooKeeper host in {zk_hosts!r}")
    if first.startswith("["):  # [::1]:2181
        _, _, rest = first.partition("]")
        return int(rest[1:]) if rest.startswith(":") else 2181
    _, sep, port = first.rpartition(":")
    return int(port) if sep else 2181


@dataclass(frozen=True)
class UpResult:
    """What ``up()`` did for one server."""

    name: str
    started: bool  # False: it was already running and was only checked
    seconds: float  # until it answered a real request


@dataclass(frozen=True)
class Quorum:
    """Whether a replicated service can still decide: a majority of its members answer."""

    name: str
    up: int
    size: int

    @property
    def has_quorum(self) -> bool:
        return self.up >= self.size // 2 + 1


@dataclass(frozen=True)
class LocalInfra:
    config: Config
    cassandra_nodes: tuple[CassandraServer, ...]
    zookeeper_servers: tuple[ZooKeeperServer, ...]

    @property
    def cassandra(self) -> CassandraServer:
        """The first (or only) Cassandra node."""
        return self.cassandra_nodes[0]

    @property
    def zookeeper(self) -> ZooKeeperServer:
        """The first (or only) ZooKeeper server."""
        return self.zookeeper_servers[0]

    @classmethod
    def from_config(cls, cfg: Config, dist_dir: Path | None = None) -> LocalInfra:
        """Build every server from ``cfg``; ``dist_dir`` lets tests share the dev download."""
        if not 1 <= cfg.cassandra_nodes <= MAX_NODES:
            raise InfraError(f"cassandra_nodes must be 1..{MAX_NODES}, not {cfg.cassandra_nodes}")
        if not (1 <= cfg.zk_nodes <= MAX_NODES and cfg.zk_nodes % 2 == 1):
            raise InfraError(f"zk_nodes must be an odd number 1..{MAX_NODES} (a majority must survive), not {cfg.zk_nodes}")
        home = Path(cfg.home)
        dist = dist_dir if dist_dir is not None else home / "dist"
        count = cfg.cassandra_nodes
        hosts = local_hosts(count)
        cassandra = tuple(
            CassandraServer(
                dist_dir=dist,
                data_dir=home / "cassandra5" if count == 1 else home / f"cassandra5-x{count}" / f"node{n}",
                native_port=cfg.cassandra_port,
                storage_port=cfg.cassandra_storage_port,
                heap=cfg.cassandra_heap_per_node,
                commitlog_sync=cfg.cassandra_commitlog_sync,
                jit=cfg.cassandra_jit,
                timer_slack_ns=cfg.cassandra_timer_slack_us * 1000,
                host=host,
                seeds=tuple(hosts),
                token=initial_token(n, count) if count > 1 else None,
                node_name="cassandra" if count == 1 else f"cassandra-{n}",
            )
            for n, host in enumerate(hosts, start=1)
        )
        zk_port = zk_client_port(cfg.zk_hosts)
        if cfg.zk_nodes == 1:
            zookeepers: tuple[ZooKeeperServer, ...] = (
                ZooKeeperServer(data_dir=home / "zookeeper", client_port=zk_port),
            )
        else:
            members = tuple(local_hosts(cfg.zk_nodes))
            zookeepers = tuple(
                ZooKeeperServer(
                    data_dir=home / f"zookeeper-x{cfg.zk_nodes}" / f"server{n}",
                    client_port=zk_port,
                    host=host,
                    server_id=n,
                    ensemble=members,
                    quorum_port=cfg.zk_quorum_port,
                    election_port=cfg.zk_election_port,
                    node_name=f"zookeeper-{n}",
                )
                for n, host in enumerate(members, start=1)
            )
        return cls(config=cfg, cassandra_nodes=cassandra, zookeeper_servers=zookeepers)

    @property
    def servers(self) -> list[CassandraServer | ZooKeeperServer]:
        return [*self.cassandra_nodes, *self.zookeeper_servers]

    def up(self, timeout: float | None = None) -> list[UpResult]:
        """Install and start whatever is not running, then wait until every server answers.

        All servers start at the same time (every Cassandra node is a seed, so
        none waits for another; an ensemble elects its leader once a majority
        runs). A server that is already running is left alone but still
        checked, so a successful ``up()`` always means "all are usable now".
        """
        cass_timeout = timeout if timeout is not None else self.config.cassandra_start_timeout_s
        zk_timeout = timeout if timeout is not None else self.config.zk_start_timeout_s
        self.cassandra.ensure_installed()  # once, before the nodes start side by side
        calls: list[Callable[[], UpResult]] = []
        for node in self.cassandra_nodes:
            calls.append(lambda node=node: _ensure_up(node, cass_timeout))  # type: ignore[misc]
        for server in self.zookeeper_servers:
            calls.append(lambda server=server: _ensure_up(server, zk_timeout))  # type: ignore[misc]
        return _all(calls)

    def down(self, timeout: float = 60.0) -> list[str]:
        """Stop every server (data is kept); return the names of those that were running."""
        servers = self.servers
        stopped = _all([lambda s=s: s.stop(timeout) for s in servers])  # type: ignore[misc]
        return [s.node_name for s, was_running in zip(servers, stopped) if was_running]

    def status(self) -> list[ServerStatus]:
        statuses = [node.status() for node in self.cassandra_nodes]
        for server in self.zookeeper_servers:
            status = server.status()
            role = server.mode() if status.running and not status.paused else ""
            statuses.append(ServerStatus(**{**status.__dict__, "role": role}))
        return statuses

    def quorums(self, statuses: Sequence[ServerStatus] | None = None) -> list[Quorum]:
        """Cassandra: how many nodes accept CQL connections (QUORUM reads and
        writes need a majority of the 3 replicas); ZooKeeper: how many servers
        serve requests (a leader or follower, or the standalone server)."""
        statuses = self.status() if statuses is None else statuses
        cassandra = [s for s in statuses if s.name.startswith("cassandra")]
        zookeeper = [s for s in statuses if s.name.startswith("zookeeper")]
        return [
            Quorum("cassandra", sum(s.running and s.listening and not s.paused for s in cassandra), len(cassandra)),
            Quorum("zookeeper", sum(bool(s.role) for s in zookeeper), len(zookeeper)),
        ]


def _ensure_up(server: CassandraServer | ZooKeeperServer, timeout: float) -> UpResult:
    server.ensure_installed()  # a first download is not start-up time
    t0 = time.monotonic()
    started = not server.is_running()
    if started:
        server.start()
    server.wait_ready(timeout)
    return UpResult(server.node_name, started, time.monotonic() - t0)


def _all(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run the calls in parallel; if any fails, raise after all finished.

    Waiting for all keeps a failure of one from leaving the others half
    started in the background while the caller already handles the error.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if len(errors) == 1:
        raise errors[0]  # type: ignore[misc]
    if errors:
        raise InfraError("\n\n".join(str(e) for e in errors))
    return [f.result() for f in futures]
