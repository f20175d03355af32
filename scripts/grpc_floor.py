#!/usr/bin/env python
"""The cost of a gRPC hop in Python: one no-op call, or one message on a stream (issue 17).

An immediate task crosses five hops between leasesched's processes (the
client's ScheduleTask, TaskService's due hint, the trigger's dispatch on the
worker's stream, the worker's claim and its completion); each costs both
ends CPU however small the message. This measures that cost alone: a server
process whose one unary method and one bidirectional stream do nothing but
answer, and a client in this process, both on uvloop and ``grpc.aio`` as the
services are, with 64 bytes each way. Calls are paced (``--rate``, the hops a
second at 100 tasks/s are ~100 per hop) and then sent as fast as
``--in-flight`` allows; CPU is read from /proc for both processes.
BENCHMARKS.md, "Issue 17: the floor", has the figures.

    .venv/bin/python scripts/grpc_floor.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.synchronize
import os
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import uvloop  # noqa: E402

from leasesched.loadtest.cpu import cpu_seconds  # noqa: E402

PAYLOAD = b"x" * 64


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def serve(port: int, ready: multiprocessing.synchronize.Event) -> None:
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Echo", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def server_main(port: int, ready: multiprocessing.synchronize.Event) -> None:
    uvloop.run(serve(port, ready))


def cpu_s(pid: int) -> float:
    used = cpu_seconds(pid)
    assert used is not None, f"process {pid} is gone"
    return used


async def measure(label: str, server_pid: int, calls: int, send: Callable[[int], Awaitable[None]]) -> None:
    server0, client0, wall0 = cpu_s(server_pid), cpu_s(os.getpid()), time.monotonic()
    await send(calls)
    server, client, wall = cpu_s(server_pid) - server0, cpu_s(os.getpid()) - client0, time.monotonic() - wall0
    print(f"{label:40s} {calls / wall:7.0f}/s  CPU per call: client {1000 * client / calls:.3f} ms + server "
          f"{1000 * server / calls:.3f} ms = {1000 * (client + server) / calls:.3f} ms", flush=True)  # fmt: skip



async def client(port: int, server_pid: int, calls: int, rate: float, in_flight: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call_unary = channel.unary_unary("/floor.Echo/Unary")
        call_stream = channel.stream_stream("/floor.Echo/Stream")
        bidi = call_stream()

        async def paced_unary(n: int) -> None:
            start = time.monotonic()
            for i in range(n):
                await call_unary(PAYLOAD)
                await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))

        async def paced_stream(n: int) -> None:
            start = time.monotonic()
            for i in range(n):
                await bidi.write(PAYLOAD)
                await bidi.read()
                await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))

        async def flood_unary(n: int) -> None:
            for i in range(0, n, in_flight):
                await asyncio.gather(*(call_unary(PAYLOAD) for _ in range(min(in_flight, n - i))))

        async def flood_stream(n: int) -> None:
            async def reader() -> None:
                for _ in range(n):
                    await bidi.read()

            reading = asyncio.create_task(reader())
            for _ in range(n):
                await bidi.write(PAYLOAD)
            await reading

        await flood_unary(500)  # warm-up
        await flood_stream(500)
        paced_n = max(1, int(min(calls, rate * 30)))
        await measure(f"unary call, paced at {rate:.0f}/s", server_pid, paced_n, paced_unary)
        await measure(f"stream message, paced at {rate:.0f}/s", server_pid, paced_n, paced_stream)
        await measure(f"unary call, {in_flight} in flight", server_pid, calls, flood_unary)
        await measure("stream message, back to back", server_pid, calls, flood_stream)
        await bidi.done_writing()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0, help="paced calls a second")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--port", type=int, default=39555)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no client state forked into the server
    ready = spawn.Event()
    server = spawn.Process(target=server_main, args=(args.port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            sys.exit("the echo server did not start")
        assert server.pid is not None
        uvloop.run(client(args.port, server.pid, args.calls, args.rate, args.in_flight))
    finally:
        server.terminate()
        server.join(10)


if __name__ == "__main__":
    main()
