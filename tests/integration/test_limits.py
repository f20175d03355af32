"""Limits that keep one client from taking a server down: Subscribe streams
per worker identity on a real trigger; TaskService quotas per connection when
auth is off (per namespace with auth on: test_auth.py, test_noisy_neighbour.py)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.processes import SessionGroup


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
    group = SessionGroup(log_dir=tmp_path)
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


def test_task_service_quotas_without_auth_follow_the_connection(module_config: Config, tmp_path: Path) -> None:
    """Auth off: the quota key is the peer. ListTasks costs by page size, CancelTask uses the write bucket."""
    cfg = module_config.with_overrides(
        auth="off", poll_rate_per_namespace=0.01, poll_burst=25.0, schedule_rate_per_namespace=0.01, schedule_burst=2.0
    )  # refill ~never: what passes is exactly the burst
    group = SessionGroup(log_dir=tmp_path)
    try:
        service = group.start_serving("task-service", cfg)
        assert service.target
        # Its own subchannel pool: a second TCP connection, so a second peer address.
        one = grpc.insecure_channel(service.target, options=[("grpc.use_local_subchannel_pool", 1)])
        two = grpc.insecure_channel(service.target, options=[("grpc.use_local_subchannel_pool", 1)])
        first, second = pb_grpc.TaskServiceStub(one), pb_grpc.TaskServiceStub(two)
        listing = pb.ListTasksRequest(namespace="default")  # the default page (100 rows): 10 tokens
        first.ListTasks(listing, timeout=10)
        first.ListTasks(listing, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            first.ListTasks(listing, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details() or ""
        assert details.startswith("peer 'ipv4:127.0.0.1:") and "read rate limit" in details, details
        assert "burst 25; this ListTasks costs 10" in details, details
        assert int(dict(refused.value.trailing_metadata() or ())["retry-after-ms"]) > 0
        first.ListTasks(pb.ListTasksRequest(namespace="default", page_size=5), timeout=10)  # 1 token: still fits
        second.ListTasks(listing, timeout=10)  # another connection, another bucket

        spec = pb.TaskSpec(namespace="default", type="quota.test", payload=b"x", delay=timedelta(hours=1))
        task_id = first.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10).task_id
        first.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            first.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "write rate limit (ScheduleTask/CancelTask" in (refused.value.details() or "")
        # The cancel went through once: the task is cancelled (reads of the other connection still fit).
        assert second.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10).task.status == pb.CANCELLED
        one.close()
        two.close()
    finally:
        group.stop_all()
