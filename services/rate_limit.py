"""Per-namespace rate limits on ScheduleTask, as a server interceptor.

A token bucket per namespace: ``rate`` tokens a second, up to ``burst``
saved. A call that finds the bucket empty is refused with RESOURCE_EXHAUSTED
and told how long to wait (in the message and in the ``retry-after-ms``
trailing metadata), before anything is written. Buckets are per server
process: with N TaskService replicas the cluster-wide ceiling is N × rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from services.unary_interceptor import Behavior, UnaryInterceptor

SCHEDULE_METHOD = "/leasesched.v1.TaskService/ScheduleTask"
MAX_BUCKETS = 100_000


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = max(1.0, burst)
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def wait_needed(self, key: str) -> float:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()  # bounded memory; a reset only ever lets more through
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, self._burst, now)
        return bucket.take(now)


class RateLimitInterceptor(UnaryInterceptor):
    def __init__(self, limiter: RateLimiter) -> None:
        super().__init__()
        self._limiter = limiter

    def applies_to(self, method: str) -> bool:
        return method == SCHEDULE_METHOD

    def wrap(self, inner: Behavior, method: str) -> Behavior:
        limiter = self._limiter

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            namespace = getattr(getattr(request, "task", None), "namespace", "")  # may be a malformed request
            wait = limiter.wait_needed(namespace)
            if wait > 0:
                retry_ms = max(1, math.ceil(wait * 1000))
                context.set_trailing_metadata((("retry-after-ms", str(retry_ms)),))
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"namespace {namespace!r} is over its ScheduleTask rate limit; retry after {retry_ms} ms",
                )
            return await inner(request, context)

        return limited
