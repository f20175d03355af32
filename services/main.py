"""Process entry points for the two API services: ``leasesched task-service``
and ``leasesched task-updater``. Both connect to ZooKeeper (cluster shape,
registration) and Cassandra, serve until SIGTERM, then stop gracefully:
health turns NOT_SERVING, the registration disappears, calls are still
answered for a drain period (clients that follow health or the registry move
away meanwhile), then the server stops and in-flight calls get a grace period
to finish."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from leasesched.config import Config
from leasesched.coordination import registry
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from leasesched.server import bootstrap
from leasesched.server.auth_setup import make_authenticator
from services.due_notifier import DueNotifier
from services.rate_limit import QuotaInterceptor, Quotas, transport_cap
from leasesched.server.grpc_server import build_server, stop_signal, wait_for_stop_signal
from services.task_service import TaskService
from services.task_updater import TaskUpdater
from services.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)


async def serve(cfg: Config, role: str, port: int) -> None:
    """Run ``role`` ("task-service" or "task-updater") until a stop signal."""
    stop = stop_signal()  # a SIGTERM during start-up also stops gracefully
    core = await bootstrap.connect(cfg)
    client, meta, store, lifecycle = core.zk, core.meta, core.store, core.lifecycle
    notifier: DueNotifier | None = None
    workers: WorkerDirectory | None = None
    adders: list[tuple[Any, Any, str]]
    interceptors: list[Any] = []
    limit = cfg.max_concurrent_rpcs
    if role == "task-service":
        # The quota interceptor enforces task_service_max_concurrent_rpcs after each
        # namespace's own limits; gRPC's cap (counted before) is only the backstop.
        limit = transport_cap(cfg)
        notifier = DueNotifier(client, cfg)
        await notifier.start()
        workers = WorkerDirectory(client, cfg.zk_root)
        await workers.start()
        service: Any = TaskService(cfg, lifecycle, meta.logical_shards, notify_due=notifier, workers=workers)
        adders = [(pb_grpc.add_TaskServiceServicer_to_server, service, "leasesched.v1.TaskService")]
        # After authentication (build_server's order): quotas are per caller namespace.
        interceptors.append(QuotaInterceptor(Quotas.from_config(cfg)))
    elif role == "task-updater":
        adders = [(pb_grpc.add_TaskUpdaterServicer_to_server, TaskUpdater(cfg, lifecycle), "leasesched.v1.TaskUpdater")]
    else:
        raise ValueError(f"unknown role {role!r}")
    server = await build_server(
        f"{cfg.bind_host}:{port}", adders, cfg, interceptors, authenticator=make_authenticator(cfg, store),
        max_concurrent_rpcs=limit,
    )  # fmt: skip
    await server.server.start()
    await server.set_serving(True)
    address = f"{cfg.bind_host}:{server.port}"
    registration = registry.Registration(client, cfg.zk_root, role, address)
    await asyncio.to_thread(registration.start)
    log.info("%s serving on %s", role, address)
    try:
        await wait_for_stop_signal(stop)
    finally:
        log.info("%s stopping: draining %.1f s, then in-flight calls get %.0f s", role, cfg.shutdown_drain_s, cfg.shutdown_grace_s)
        await server.set_serving(False)
        await asyncio.to_thread(registration.close)
        # gRPC answers CANCELLED to calls that reach a stopping server before a
        # handler takes them (grpc/grpc#41785). Keep serving while clients learn
        # from health checks or ZooKeeper that this instance is leaving.
        await asyncio.sleep(cfg.shutdown_drain_s)
        await server.server.stop(grace=cfg.shutdown_grace_s)
        if notifier:
            await notifier.stop()
        if workers:
            await workers.stop()
        await core.close()
        log.info("%s stopped", role)
