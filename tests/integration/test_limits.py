"""Limits that keep one client from taking a server down: Subscribe streams
per worker identity on a real trigger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.processes import ProcessGroup


async def _open(stub: pb_grpc.TriggerServiceStub, worker_id: str, stop: asyncio.Event) -> grpc.aio.StreamStreamCall:
    async def messages():  # type: ignore[no-untyped-def]
        yield pb.WorkerMessage(hello=pb.Hello(worker_id=worker_id, namespace="default", task_types=["x"], capacity=1))
        await stop.wait()

    return stub.Subscribe(messages())


_readers: dict[int, asyncio.Task[object]] = {}


async def _refused(call: grpc.aio.StreamStreamCall, within: float) -> grpc.StatusCode | None:
    """The status the server ended the stream with, or None if it kept it open.

    The read runs in its own task that is never cancelled here: cancelling a
    read cancels the whole stream."""
    reader = _readers.setdefault(id(call), asyncio.ensure_future(call.read()))
    done, _ = await asyncio.wait({reader}, timeout=within)
    if not done:
        return None
    try:
        reader.result()
    except grpc.aio.AioRpcError as err:
        return err.code()
    return None


def test_subscribe_streams_per_worker_are_bounded(module_config: Config, tmp_path: Path) -> None:
    cfg = module_config.with_overrides(max_streams_per_worker=2)
    group = ProcessGroup(log_dir=tmp_path)
    try:
        trigger = group.start_serving("trigger", cfg)

        async def scenario() -> None:
            assert trigger.target
            async with grpc.aio.insecure_channel(trigger.target) as channel:
                stub = pb_grpc.TriggerServiceStub(channel)
                stop = asyncio.Event()
                held = [await _open(stub, "greedy", stop) for _ in range(2)]
                for call in held:
                    assert await _refused(call, 0.5) is None  # accepted, waiting for work
                extra = await _open(stub, "greedy", stop)
                assert await _refused(extra, 5) == grpc.StatusCode.RESOURCE_EXHAUSTED
                other = await _open(stub, "modest", stop)  # another identity has its own allowance
                assert await _refused(other, 0.5) is None
                held[0].cancel()  # one stream closes: the worker may open another
                again = await _open(stub, "greedy", stop)
                deadline = asyncio.get_running_loop().time() + 10
                while await _refused(again, 0.5) == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert asyncio.get_running_loop().time() < deadline, "the closed stream was never released"
                    again = await _open(stub, "greedy", stop)
                stop.set()

        asyncio.run(scenario())
    finally:
        group.stop_all()
