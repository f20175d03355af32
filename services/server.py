"""Building and running an asyncio gRPC server the same way for every process:
error mapping, health checking, server reflection, ZooKeeper registration,
and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from leasesched.auth import Authenticator
from leasesched.config import Config
from leasesched.transport import add_port
from services.auth_interceptor import AuthInterceptor
from services.error_mapping import ErrorMappingInterceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class Server:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


async def build_server(
    bind: str,
    adders: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    cfg: Config,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    authenticator: Authenticator | None = None,
) -> Server:
    """``adders``: (add_XServicer_to_server, servicer, full service name).

    Interceptors run outermost first: authentication (when ``authenticator``
    is given, i.e. auth is on), then ``interceptors``, then error mapping with
    the per-call time ceiling. ``maximum_concurrent_rpcs`` bounds the work a
    flood of clients can queue: beyond it, calls get RESOURCE_EXHAUSTED.
    """
    chain: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(authenticator)] if authenticator else []
    server = grpc.aio.server(
        interceptors=[*chain, *interceptors, ErrorMappingInterceptor(cfg.rpc_timeout_s)],
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    names = []
    for add, servicer, name in adders:
        add(servicer, server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = add_port(server, bind, cfg)
    if port == 0:
        raise RuntimeError(f"cannot bind {bind}")
    return Server(server, port, health_servicer, names)


async def wait_for_stop_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
