"""What every server process connects to before it serves: ZooKeeper (the
cluster's shape, registrations) and Cassandra (through the store and the
lifecycle). Shared by TaskService, TaskUpdater and the trigger."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kazoo.client import KazooClient

from leasesched.config import Config
from leasesched.coordination import cluster_meta, zk
from leasesched.coordination.cluster_meta import ClusterMeta
from leasesched.lifecycle import Lifecycle
from leasesched.store.base import StoreUnavailable
from leasesched.store.cassandra import CassandraStore

log = logging.getLogger(__name__)


@dataclass
class Core:
    zk: KazooClient
    meta: ClusterMeta
    store: CassandraStore
    lifecycle: Lifecycle

    async def close(self) -> None:
        await self.store.close()
        self.zk.stop()
        self.zk.close()


async def connect(cfg: Config) -> Core:
    client = await asyncio.to_thread(zk.connect, cfg)
    meta = await asyncio.to_thread(cluster_meta.ensure, client, cfg)
    store = CassandraStore(cfg)
    try:
        await store.connect()
    except StoreUnavailable as exc:
        # Serve anyway: calls answer UNAVAILABLE until Cassandra is back.
        log.warning("starting without Cassandra: %s", exc)
    lifecycle = Lifecycle(store, lease_grace_ms=int(cfg.lease_grace_s * 1000), history_max_entries=cfg.history_max_entries)
    return Core(client, meta, store, lifecycle)
