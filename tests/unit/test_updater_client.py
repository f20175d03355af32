"""The worker's TaskUpdater client over a real gRPC server in this process:
leaving a TaskUpdater after an UNAVAILABLE answer must not cancel the other
calls still in flight on its channel (a claim that landed would be neither run
nor given back, its task left waiting for its lease to expire)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from worker.updater_client import UpdaterClient


class _Updater(pb_grpc.TaskUpdaterServicer):
    async def ClaimTask(self, request: pb.ClaimTaskRequest, context: grpc.aio.ServicerContext) -> pb.ClaimTaskResponse:
        if request.task_id == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "store unavailable")
        await asyncio.sleep(0.5)  # a slow claim, still in flight when the other call fails
        return pb.ClaimTaskResponse(task_id=request.task_id, lease_token=7)


async def test_an_unavailable_answer_does_not_cancel_the_calls_in_flight() -> None:
    server = grpc.aio.server()
    pb_grpc.add_TaskUpdaterServicer_to_server(_Updater(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = UpdaterClient(lambda: [f"127.0.0.1:{port}"], Config(auth="off"))
    try:
        slow = asyncio.create_task(client.call("ClaimTask", pb.ClaimTaskRequest(task_id="slow"), timeout=5))
        await asyncio.sleep(0.1)  # the slow claim is on the channel
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.call("ClaimTask", pb.ClaimTaskRequest(task_id="unavailable"), timeout=5)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # and the client left that channel
        reply = await slow  # was: asyncio.CancelledError, the channel closed under it
        assert reply.lease_token == 7
        again = await client.call("ClaimTask", pb.ClaimTaskRequest(task_id="next"), timeout=5)  # a fresh channel
        assert again.task_id == "next"
    finally:
        await client.close()
        await server.stop(0)
