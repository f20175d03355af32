"""The worker's Subscribe streams, one per live trigger.

Triggers are found in ZooKeeper and followed as they come and go. Each stream
opens with a Hello (namespace, task types, free slots) and then carries the
worker's free-slot count whenever it changes; dispatches flow the other way.
A broken stream is re-opened with backoff as long as its trigger is
registered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

import grpc

from leasesched.config import Config
from leasesched.transport import aio_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

OnDispatch = Callable[[pb.Dispatch, "TriggerLink"], Awaitable[None]]


class TriggerLink:
    def __init__(self, address: str, cfg: Config, hello: Callable[[], pb.Hello], on_dispatch: OnDispatch) -> None:
        self.address = address
        self._cfg = cfg
        self._hello = hello
        self._on_dispatch = on_dispatch
        self._outbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    def send_credit(self, slots: int) -> None:
        if self.connected:
            self._outbox.put_nowait(pb.WorkerMessage(credit=pb.Credit(slots=slots)))

    def send_returned(self, task_id: str) -> None:
        self._outbox.put_nowait(pb.WorkerMessage(returned=pb.Returned(task_ids=[task_id])))

    async def _messages(self) -> AsyncIterator[pb.WorkerMessage]:
        yield pb.WorkerMessage(hello=self._hello())
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            yield message

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                async with aio_channel(self.address, self._cfg) as channel:
                    # Messages queued for an earlier stream are stale: the Hello carries the truth.
                    self._outbox = asyncio.Queue()
                    call = pb_grpc.TriggerServiceStub(channel).Subscribe(self._messages())
                    self.connected = True
                    log.info("subscribed to trigger %s", self.address)
                    delay = 0.2
                    async for dispatch in call:
                        await self._on_dispatch(dispatch, self)
            except grpc.aio.AioRpcError as err:
                log.info("stream to trigger %s ended: %s", self.address, err.code().name)
            finally:
                self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
