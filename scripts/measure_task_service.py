#!/usr/bin/env python
"""A small throughput measurement of a running TaskService (not the full load test).

Two phases against ``--target``, each ``--duration`` seconds with
``--concurrency`` requests in flight (that many asyncio clients, each sending
its next request when the previous answered):

1. ScheduleTask of small tasks (due in an hour, so no trigger or worker work
   is mixed in), every request with its own idempotency key as a real client
   would send, unless ``--no-keys``;
2. PollTask of the task ids phase 1 created, round robin.

It prints, per phase: requests answered OK per second, latency p50/p90/p99/max
of the OK answers, and errors by gRPC status code. ``--json`` prints the same
as one JSON object (for scripts). A ``--warmup`` of a few seconds before each
phase is not counted (connections, prepared statements, JIT-less Python caches).

    .venv/bin/python scripts/measure_task_service.py --target 127.0.0.1:50051 \\
        --concurrency 64 --duration 20

Client and server share the machine, so the numbers are for this machine as
a whole (the Python client costs CPU too); compare runs only on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from leasesched.v1 import scheduler_pb2 as pb  # noqa: E402
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc  # noqa: E402


@dataclass
class PhaseResult:
    name: str
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        rank = math.ceil(q / 100.0 * len(ordered))  # nearest-rank percentile
        return ordered[min(len(ordered), max(1, rank)) - 1]

    def summary(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "seconds": round(self.seconds, 2),
            "ok": self.ok,
            "ok_per_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(self.percentile(50), 2),
            "p90_ms": round(self.percentile(90), 2),
            "p99_ms": round(self.percentile(99), 2),
            "max_ms": round(max(self.latencies_ms), 2) if self.latencies_ms else float("nan"),
            "errors": dict(self.errors),
        }


async def run_phase(
    name: str,
    call: Callable[[int], Awaitable[Any]],
    concurrency: int,
    duration: float,
    warmup: float,
    on_ok: Callable[[Any], None] | None = None,
) -> PhaseResult:
    """``concurrency`` loops calling ``call(n)`` until the time is up; only
    answers to requests sent after the warm-up and before the end count."""
    counter = itertools.count()
    started = time.monotonic()
    measure_from = started + warmup
    end = measure_from + duration
    result = PhaseResult(name, duration)

    async def client() -> None:
        while True:
            sent = time.monotonic()
            if sent >= end:
                return
            try:
                reply = await call(next(counter))
            except grpc.aio.AioRpcError as err:
                if sent >= measure_from:
                    result.errors[err.code().name] += 1
                continue
            if on_ok is not None:
                on_ok(reply)
            if sent >= measure_from:
                result.latencies_ms.append((time.monotonic() - sent) * 1000.0)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    # The last requests were sent before ``end`` and answered after it: count
    # the real span, so req/s is not inflated by that tail.
    result.seconds = time.monotonic() - measure_from
    return result


async def measure(args: argparse.Namespace) -> list[PhaseResult]:
    options = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
    channels = [grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.channels)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        stubs = [pb_grpc.TaskServiceStub(c) for c in channels]
        run_id = uuid.uuid4().hex[:8]
        namespace = args.namespace or f"bench-{run_id}"
        payload = os.urandom(args.payload_bytes)
        created: list[str] = []

        def schedule(n: int) -> Awaitable[Any]:
            spec = pb.TaskSpec(namespace=namespace, type="bench.noop", payload=payload)
            spec.delay.FromSeconds(3600)
            key = "" if args.no_keys else f"{run_id}-{n}"
            return stubs[n % len(stubs)].ScheduleTask(
                pb.ScheduleTaskRequest(task=spec, idempotency_key=key), timeout=args.timeout
            )

        results = [
            await run_phase(
                "ScheduleTask",
                schedule,
                args.concurrency,
                args.duration,
                args.warmup,
                on_ok=lambda reply: created.append(reply.task_id),
            )
        ]
        if not created:
            raise SystemExit("no task was scheduled; is the TaskService (and its Cassandra) up?")

        def poll(n: int) -> Awaitable[Any]:
            return stubs[n % len(stubs)].PollTask(
                pb.PollTaskRequest(task_id=created[n % len(created)]), timeout=args.timeout
            )

        results.append(await run_phase("PollTask", poll, args.concurrency, args.duration, args.warmup))
        return results
    finally:
        for channel in channels:
            await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="TaskService host:port")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds before each phase")
    parser.add_argument("--channels", type=int, default=1, help="gRPC channels (HTTP/2 connections) to spread over")
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--namespace", default="", help="default: a fresh bench-<id> namespace")
    parser.add_argument("--no-keys", action="store_true", help="schedule without idempotency keys (one LWT fewer)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    if args.concurrency < 1 or args.duration <= 0:
        parser.error("--concurrency must be >= 1 and --duration > 0")

    results = asyncio.run(measure(args))
    summaries = [r.summary() for r in results]
    if args.json:
        print(json.dumps({"target": args.target, "concurrency": args.concurrency, "phases": summaries}, indent=2))
        return
    print(f"target {args.target}, {args.concurrency} in flight, {args.duration:.0f} s per phase")
    print(f"{'phase':<13} {'ok':>7} {'ok/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  errors")
    for s in summaries:
        errors = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "-"
        print(
            f"{s['phase']:<13} {s['ok']:>7} {s['ok_per_s']:>8.1f} {s['p50_ms']:>8.1f} {s['p90_ms']:>8.1f} "
            f"{s['p99_ms']:>8.1f} {s['max_ms']:>8.1f}  {errors}"
        )


if __name__ == "__main__":
    main()
