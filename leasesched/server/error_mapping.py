"""A server interceptor that turns domain errors into gRPC status codes.

Handlers raise ``leasesched.errors`` exceptions and stay free of status-code
plumbing; anything unexpected is logged with its traceback and answered with
INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import grpc

from leasesched import errors
from leasesched.server.unary_interceptor import Behavior, UnaryInterceptor

log = logging.getLogger(__name__)

CODES: dict[type[errors.SchedulerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def code_for(exc: errors.SchedulerError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in CODES:
            return CODES[kind]
    return grpc.StatusCode.UNKNOWN


def item_status(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status one item of a batch call gets for ``exc``: what the unary call
    would have been answered with (the interceptor below), so a batch answers
    each item exactly as one call each would have."""
    if isinstance(exc, errors.SchedulerError):
        return code_for(exc), str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "not finished within the call's time"
    log.error("unexpected error in an item of %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


class ErrorMappingInterceptor(UnaryInterceptor):
    def __init__(self, timeout_s: float = 30.0) -> None:
        super().__init__()
        # A ceiling on one unary call: a stuck dependency must not pin server
        # resources for ever, whatever deadline (or none) the client set.
        self._timeout_s = timeout_s

    def request_deserializer(self, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        return _tolerant(deserialize)

    def wrap(self, inner: Behavior, method: str) -> Behavior:

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid message: {request.reason}")
            remaining = context.time_remaining()
            if remaining is not None and remaining < 0.005:
                # It waited in the server's queue past its deadline: the client
                # has given up, so doing the work (creating a task nobody will
                # hear of) only deepens an overload.
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while the call was queued")
            try:
                return await asyncio.wait_for(inner(request, context), self._timeout_s)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"not finished within {self._timeout_s:.0f} s")
            except errors.SchedulerError as exc:
                await context.abort(code_for(exc), str(exc))
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        return wrapped


class MalformedRequest:
    """What a request that does not parse becomes: answered INVALID_ARGUMENT
    by the handler wrapper instead of INTERNAL by grpc's own deserializer."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad input
            return MalformedRequest(type(exc).__name__)

    return parse
