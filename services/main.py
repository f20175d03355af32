"""Process entry points for the two API services: ``leasesched task-service``
and ``leasesched task-updater``. Both connect to ZooKeeper (cluster shape,
registration) and Cassandra, serve until SIGTERM, then stop gracefully:
health turns NOT_SERVING, the registration disappears, calls are still
answered for a drain period (clients that follow health or the registry move
away meanwhile), then the server stops and in-flight calls get a grace period
to finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from leasesched.config import Config
from leasesched.coordination import registry
from leasesched.server import bootstrap
from leasesched.server.auth_setup import make_authenticator
from leasesched.server.grpc_server import build_server, stop_signal, wait_for_stop_signal
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.due_notifier import DueNotifier
from services.rate_limit import QuotaInterceptor, Quotas, transport_cap
from services.gate_service import GateBook, GateService
from services.limit_sampler import LimitSampler
from services.limit_service import LimitService
from services.operator_service import OperatorService
from services.schedule_service import ScheduleService
from services.slot_use import SlotUse
from services.task_service import TaskService
from services.task_updater import TaskUpdater
from services.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)


async def serve(cfg: Config, role: str, port: int) -> None:
    """Run ``role`` ("task-service" or "task-updater") until a stop signal.

    Each start-up step pushes its undo onto one exit stack: a failure at any
    step releases what was started before it, and a stop runs the same undos
    in reverse (not serving, deregistered, drained, stopped, closed)."""
    stop = stop_signal()  # a SIGTERM during start-up also stops gracefully
    if role not in ("task-service", "task-updater"):
        raise ValueError(f"unknown role {role!r}")
    async with contextlib.AsyncExitStack() as stack:
        core = await bootstrap.connect(cfg)
        stack.push_async_callback(core.close)
        client, meta, store, lifecycle = core.zk, core.meta, core.store, core.lifecycle
        adders: list[tuple[Any, Any, str]]
        interceptors: list[Any] = []
        limit = cfg.max_concurrent_rpcs
        if role == "task-service":
            # The quota interceptor enforces task_service_max_concurrent_rpcs after each
            # namespace's own limits; gRPC's cap (counted before) is only the backstop.
            limit = transport_cap(cfg)
            notifier = DueNotifier(client, cfg)
            await notifier.start()
            stack.push_async_callback(notifier.stop)
            workers = WorkerDirectory(client, cfg.zk_root)
            await workers.start()
            stack.push_async_callback(workers.stop)
            # One cache of gates and one of slot counts for the process's services.
            gates, slots = GateBook(store), SlotUse(store)
            sampler = LimitSampler(store, lifecycle.admission.table, slots)
            await sampler.start()
            stack.push_async_callback(sampler.stop)
            service: Any = TaskService(
                cfg, lifecycle, meta.logical_shards, notify_due=notifier, workers=workers, gates=gates, slots=slots,
                on_key=sampler.note_key,
            )
            schedules = ScheduleService(cfg, lifecycle, meta.logical_shards, notify_due=notifier, gates=gates)
            adders = [
                (pb_grpc.add_TaskServiceServicer_to_server, service, "leasesched.v1.TaskService"),
                (pb_grpc.add_ScheduleServiceServicer_to_server, schedules, "leasesched.v1.ScheduleService"),
                (pb_grpc.add_GateServiceServicer_to_server, GateService(store), "leasesched.v1.GateService"),
                (pb_grpc.add_LimitServiceServicer_to_server, LimitService(store, slots=slots), "leasesched.v1.LimitService"),
            ]
            # Operator actions: the same process, interceptors and lifecycle; a
            # retried task's cached final answer is forgotten at once.
            operators = OperatorService(cfg, lifecycle, notify_due=notifier, on_changed=service.forget_finished)
            adders.append((pb_grpc.add_OperatorServiceServicer_to_server, operators, "leasesched.v1.OperatorService"))
            # After authentication (build_server's order): quotas are per caller namespace.
            interceptors.append(QuotaInterceptor(Quotas.from_config(cfg)))
        else:
            adders = [(pb_grpc.add_TaskUpdaterServicer_to_server, TaskUpdater(cfg, lifecycle), "leasesched.v1.TaskUpdater")]
        server = await build_server(
            f"{cfg.bind_host}:{port}", adders, cfg, interceptors, authenticator=make_authenticator(cfg, store),
            max_concurrent_rpcs=limit,
        )  # fmt: skip
        await server.server.start()
        stack.push_async_callback(server.server.stop, cfg.shutdown_grace_s)
        # gRPC answers CANCELLED to calls that reach a stopping server before a
        # handler takes them (grpc/grpc#41785). Keep serving while clients learn
        # from health checks or ZooKeeper that this instance is leaving.
        stack.push_async_callback(asyncio.sleep, cfg.shutdown_drain_s)
        address = f"{cfg.bind_host}:{server.port}"
        registration = registry.Registration(client, cfg.zk_root, role, address)
        await asyncio.to_thread(registration.start)
        stack.push_async_callback(asyncio.to_thread, registration.close)
        await server.set_serving(True)
        stack.push_async_callback(server.set_serving, False)  # the first undo: health says NOT_SERVING
        stack.callback(
            log.info, "%s stopping: draining %.1f s, then in-flight calls get %.0f s", role, cfg.shutdown_drain_s, cfg.shutdown_grace_s
        )
        log.info("%s serving on %s", role, address)
        await wait_for_stop_signal(stop)
    log.info("%s stopped", role)
