"""Authentication and the role check, as a server interceptor.

Every call except health checks and reflection must carry a valid bearer
token; the role decides which services it may call; the authenticated
principal is put in ``leasesched.auth.current_principal`` for the handlers'
namespace checks. The token itself never reaches a log line.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import grpc

from leasesched.auth import Authenticator, Principal, current_principal
from leasesched.errors import PermissionDenied, Unauthenticated, Unavailable
from leasesched.server.error_mapping import code_for

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Method-name prefix → roles allowed to call it. The first match wins.
ROLES_BY_METHOD: tuple[tuple[str, frozenset[str]], ...] = (
    # An operator reads its namespace's tasks (and acts on them through OperatorService).
    ("/leasesched.v1.TaskService/PollTask", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.TaskService/ListTasks", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.TaskService/CountTasks", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.TaskService/GetTaskHistory", frozenset({"client", "operator", "admin"})),
    # Scheduling, one task or many (ScheduleTasks: each task's namespace is checked as ScheduleTask's).
    ("/leasesched.v1.TaskService/ScheduleTasks", frozenset({"client", "admin"})),
    ("/leasesched.v1.TaskService/", frozenset({"client", "admin"})),
    ("/leasesched.v1.OperatorService/", frozenset({"operator", "admin"})),
    # An operator sees its namespace's schedules, gates and limits (the dashboard shows them).
    ("/leasesched.v1.ScheduleService/DescribeSchedule", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.ScheduleService/ListSchedules", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.ScheduleService/", frozenset({"client", "admin"})),
    # Gates: a client may look at its namespace's gates; every change is admin only.
    ("/leasesched.v1.GateService/GetGate", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.GateService/ListGates", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.GateService/", frozenset({"admin"})),
    # Concurrency limits: the same (a client sees its namespace's limits).
    ("/leasesched.v1.LimitService/GetLimit", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.LimitService/ListLimits", frozenset({"client", "operator", "admin"})),
    ("/leasesched.v1.LimitService/", frozenset({"admin"})),
    ("/leasesched.v1.TaskUpdater/", frozenset({"worker", "admin"})),
    ("/leasesched.v1.TriggerService/Subscribe", frozenset({"worker", "admin"})),
    ("/leasesched.v1.TriggerService/NotifyDue", frozenset({"admin"})),
)


def roles_for(method: str) -> frozenset[str]:
    for prefix, roles in ROLES_BY_METHOD:
        if method.startswith(prefix):
            return roles
    return frozenset({"admin"})


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        authorization = metadata.get("authorization")
        roles = roles_for(method)

        async def authenticate(context: grpc.aio.ServicerContext) -> Principal:
            try:
                principal = await self._authenticator.authenticate(authorization)
                if principal.role not in roles:
                    raise PermissionDenied(f"a {principal.role} token may not call {method.rsplit('/', 1)[-1]}")
            except (Unauthenticated, PermissionDenied, Unavailable) as exc:
                await context.abort(code_for(exc), str(exc))
            return principal

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                current_principal.set(await authenticate(context))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                current_principal.set(await authenticate(context))
                async for reply in inner_stream(request_iterator, context):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        return handler
