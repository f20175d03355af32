"""The local infrastructure as one unit: a Cassandra node and a ZooKeeper server.

Everything is derived from a ``Config`` so that the servers listen exactly
where the scheduler processes will look for them:

* ``<home>/dist``        downloaded Cassandra distribution (shareable cache)
* ``<home>/cassandra``   Cassandra's config, data, commit log, logs, PID file
* ``<home>/zookeeper``   ZooKeeper's config, data, log, PID file

``up()`` is idempotent, so ``make run`` and scripts can call it every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from leasesched.config import Config
from leasesched.infra.cassandra import CassandraServer
from leasesched.infra.process import InfraError, ServerStatus
from leasesched.infra.zookeeper import ZooKeeperServer

T = TypeVar("T")


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
class LocalInfra:
    config: Config
    cassandra: CassandraServer
    zookeeper: ZooKeeperServer

    @classmethod
    def from_config(cls, cfg: Config, dist_dir: Path | None = None) -> LocalInfra:
        """Build both servers from ``cfg``; ``dist_dir`` lets tests share the dev download."""
        home = Path(cfg.home)
        return cls(
            config=cfg,
            cassandra=CassandraServer(
                dist_dir=dist_dir if dist_dir is not None else home / "dist",
                data_dir=home / "cassandra",
                native_port=cfg.cassandra_port,
                storage_port=cfg.cassandra_storage_port,
                heap=cfg.cassandra_heap,
                commitlog_sync=cfg.cassandra_commitlog_sync,
            ),
            zookeeper=ZooKeeperServer(data_dir=home / "zookeeper", client_port=zk_client_port(cfg.zk_hosts)),
        )

    def up(self, timeout: float | None = None) -> list[UpResult]:
        """Install and start whatever is not running, then wait until both answer.

        Both servers start at the same time (Cassandra alone takes 10-60 s).
        A server that is already running is left alone but still checked, so
        a successful ``up()`` always means "both are usable now".
        """
        cass_timeout = timeout if timeout is not None else self.config.cassandra_start_timeout_s
        zk_timeout = timeout if timeout is not None else self.config.zk_start_timeout_s
        return _both(
            lambda: _ensure_up(self.cassandra, cass_timeout),
            lambda: _ensure_up(self.zookeeper, zk_timeout),
        )

    def down(self, timeout: float = 60.0) -> list[str]:
        """Stop both servers (data is kept); return the names of those that were running."""
        stopped = _both(lambda: self.cassandra.stop(timeout), lambda: self.zookeeper.stop(timeout))
        return [name for name, was_running in zip(("cassandra", "zookeeper"), stopped) if was_running]

    def status(self) -> list[ServerStatus]:
        return [self.cassandra.status(), self.zookeeper.status()]


def _ensure_up(server: CassandraServer | ZooKeeperServer, timeout: float) -> UpResult:
    server.ensure_installed()  # a first download is not start-up time
    t0 = time.monotonic()
    started = not server.is_running()
    if started:
        server.start()
    server.wait_ready(timeout)
    return UpResult(server.name, started, time.monotonic() - t0)


def _both(first: Callable[[], T], second: Callable[[], T]) -> list[T]:
    """Run two calls in parallel; if either fails, raise after both finished.

    Waiting for both keeps a failure of one from leaving the other half
    started in the background while the caller already handles the error.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(first), pool.submit(second)]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if len(errors) == 1:
        raise errors[0]  # type: ignore[misc]
    if errors:
        raise InfraError("\n\n".join(str(e) for e in errors))
    return [f.result() for f in futures]
