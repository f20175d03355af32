"""A server interceptor that times every unary gRPC call by method and status code.

It sits outermost in the chain (before authentication, rate limiting and
error mapping) so that every answer is counted with the code the client
really got: UNAUTHENTICATED, RESOURCE_EXHAUSTED and the mapped domain errors
included. Only methods the server has a handler for are recorded, so a client
calling made-up method names cannot create new label values. Streaming calls
(a worker's Subscribe lasts for hours) are not latency and are not recorded.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from prometheus_client import Histogram

from leasesched.observability import metrics
from leasesched.server.unary_interceptor import Behavior, UnaryInterceptor


class MetricsInterceptor(UnaryInterceptor):
    def __init__(self, histogram: Histogram = metrics.rpc_duration) -> None:
        super().__init__()
        self._histogram = histogram

    def wrap(self, inner: Behavior, method: str) -> Behavior:
        histogram = self._histogram

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                reply = await inner(request, context)
                code = _code_name(context.code(), "OK")
                return reply
            except grpc.aio.AbortError:
                code = _code_name(context.code(), "UNKNOWN")
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"  # the client went away or its deadline passed
                raise
            finally:
                histogram.labels(method, code).observe(time.perf_counter() - started)

        return timed


def _code_name(code: Any, default: str) -> str:
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:  # some grpc versions hand back the integer value
        return next(c.name for c in grpc.StatusCode if c.value[0] == int(code))
    except (StopIteration, TypeError, ValueError):
        return default
