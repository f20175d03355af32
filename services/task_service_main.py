"""The TaskService process: ``leasesched task-service``."""

from __future__ import annotations

import asyncio
import logging

from leasesched.config import Config
from leasesched.coordination import cluster_meta, registry, zk
from leasesched.lifecycle import Lifecycle
from leasesched.store.base import StoreUnavailable
from leasesched.store.cassandra import CassandraStore
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.server import build_server, wait_for_stop_signal
from services.task_service import TaskService

log = logging.getLogger(__name__)


async def serve(cfg: Config, port: int | None = None) -> None:
    client = await asyncio.to_thread(zk.connect, cfg)
    meta = await asyncio.to_thread(cluster_meta.ensure, client, cfg)
    store = CassandraStore(cfg)
    try:
        await store.connect()
    except StoreUnavailable as exc:
        # Serve anyway: requests answer UNAVAILABLE until Cassandra is back.
        log.warning("starting without Cassandra: %s", exc)
    service = TaskService(cfg, Lifecycle(store), meta.logical_shards)
    bind_port = cfg.task_service_port if port is None else port
    server = await build_server(
        f"{cfg.bind_host}:{bind_port}",
        [(pb_grpc.add_TaskServiceServicer_to_server, service, "leasesched.v1.TaskService")],
    )
    await server.server.start()
    await server.set_serving(True)
    address = f"{cfg.bind_host}:{server.port}"
    await asyncio.to_thread(registry.register, client, cfg.zk_root, "task-service", address)
    log.info("TaskService serving on %s", address)
    try:
        await wait_for_stop_signal()
    finally:
        log.info("TaskService stopping")
        await server.set_serving(False)
        await server.server.stop(grace=5)
        await store.close()
        client.stop()
        client.close()
