"""The cluster's fixed shape, stored once in ZooKeeper when the cluster is created.

The number of logical shards decides which shard every task id belongs to, so
it must never change under running processes: the first process to start
writes it (a create that fails if the node exists), every later process reads
it, whatever its own configuration says.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError

from leasesched.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterMeta:
    logical_shards: int
    due_bucket_s: int
    created_at_ms: int  # triggers start reading a shard's due index here


def ensure(zk: KazooClient, cfg: Config) -> ClusterMeta:
    path = f"{cfg.zk_root}/cluster"
    wanted = {
        "logical_shards": cfg.logical_shards,
        "due_bucket_s": cfg.due_bucket_s,
        "created_at_ms": int(time.time() * 1000),
    }
    zk.ensure_path(cfg.zk_root)
    try:
        zk.create(path, json.dumps(wanted).encode())
        log.info("created cluster with %d logical shards", cfg.logical_shards)
    except NodeExistsError:
        pass
    data, _ = zk.get(path)
    stored = json.loads(data)
    meta = ClusterMeta(int(stored["logical_shards"]), int(stored["due_bucket_s"]), int(stored["created_at_ms"]))
    if meta.logical_shards != cfg.logical_shards:
        log.warning(
            "configured logical_shards=%d ignored: the cluster was created with %d",
            cfg.logical_shards,
            meta.logical_shards,
        )
    return meta
