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
from leasesched.transport import add_port, server_options
from leasesched.server.auth_interceptor import AuthInterceptor
from leasesched.server.error_mapping import ErrorMappingInterceptor
from leasesched.server.metrics_interceptor import MetricsInterceptor

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
    max_concurrent_rpcs: int | None = None,
    outer_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> Server:
    """``adders``: (add_XServicer_to_server, servicer, full service name).

    Interceptors run outermost first: metrics (latency by method and code of
    every answer), authentication (when ``authenticator``
    is given, i.e. auth is on), then ``interceptors`` — after authentication,
    so they see the caller in ``current_principal`` (the per-namespace quotas
    of services/rate_limit.py depend on that) — then error mapping with
    the per-call time ceiling. ``max_concurrent_rpcs`` (default
    ``cfg.max_concurrent_rpcs``) bounds the work a flood of clients can queue:
    beyond it, calls get RESOURCE_EXHAUSTED before any work is done.
    ``outer_interceptors`` run between metrics and authentication: they see
    what authentication refused (the trigger logs refused streams so).
    """
    chain: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(), *outer_interceptors]
    if authenticator:
        chain.append(AuthInterceptor(authenticator))
    server = grpc.aio.server(
        interceptors=[*chain, *interceptors, ErrorMappingInterceptor(cfg.rpc_timeout_s)],
        maximum_concurrent_rpcs=max_concurrent_rpcs or cfg.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # Accept the clients' keepalive pings (leasesched/transport.py): the
            # default policy answered them with GOAWAY "too_many_pings".
            *server_options(cfg),
        ],
    )
    names = []
    for add, servicer, name in adders:
        add(servicer, server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = add_port(server, bind, cfg)
    except RuntimeError as exc:  # grpcio >= 1.60 raises where older versions returned 0
        raise RuntimeError(f"cannot bind {bind}: {exc}") from exc
    if port == 0:
        raise RuntimeError(f"cannot bind {bind}")
    return Server(server, port, health_servicer, names)


def stop_signal() -> asyncio.Event:
    """Handle SIGTERM/SIGINT from now on: the returned event is set by the first one.

    Call it first thing in a process's ``serve``: a signal that arrives while
    the process is still starting then leads to the same graceful stop (and
    exit 0) instead of the default action, death by signal.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_stop_signal(stop: asyncio.Event | None = None) -> None:
    await (stop if stop is not None else stop_signal()).wait()
