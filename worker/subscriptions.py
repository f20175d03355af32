"""The worker's Subscribe streams, one per live trigger.

Triggers are found in ZooKeeper and followed as they come and go. Each stream
opens with a Hello (namespace, task types, free slots) and then carries the
worker's free-slot count whenever it changes, dispatches it could not take,
and acks of what became of the ones it took; dispatches flow the other way.
What piles up while a message is being sent goes out together: the latest
credit only, the returned tasks and the acks each in one message. Acks are
not urgent (the trigger's checks they replace come seconds later), so they
wait up to ``ACK_DELAY_S`` to travel in bulk, or leave with the next credit. A broken
stream is re-opened with backoff as long as its trigger is registered; what
was pending for the old stream is dropped (the Hello carries the truth, and
a lost ack only costs the trigger a read).
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

ACK_DELAY_S = 0.05

OnDispatch = Callable[[pb.Dispatch, "TriggerLink"], Awaitable[None]]


class TriggerLink:
    def __init__(self, address: str, cfg: Config, hello: Callable[[], pb.Hello], on_dispatch: OnDispatch) -> None:
        self.address = address
        self._cfg = cfg
        self._hello = hello
        self._on_dispatch = on_dispatch
        self._credit: int | None = None
        self._returned: list[str] = []
        self._claimed: list[pb.TaskRef] = []
        self._finished: list[pb.TaskRef] = []
        self._dirty = asyncio.Event()
        self._ack_timer: asyncio.TimerHandle | None = None
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
            self._credit = slots
            self._dirty.set()

    def send_returned(self, task_id: str) -> None:
        self._returned.append(task_id)
        self._dirty.set()

    def ack_claimed(self, dispatch: pb.Dispatch) -> None:
        """ClaimTask succeeded for this dispatch (it came on this stream)."""
        if self.connected:
            self._claimed.append(pb.TaskRef(task_id=dispatch.task_id, attempt=dispatch.attempt, lease_token=dispatch.lease_token))
            self._acks_pending()

    def ack_finished(self, task_id: str, attempt: int, lease_token: int) -> None:
        """A report under ``lease_token`` was accepted: the lease is over."""
        if self.connected:
            self._finished.append(pb.TaskRef(task_id=task_id, attempt=attempt, lease_token=lease_token))
            self._acks_pending()

    def _acks_pending(self) -> None:
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._dirty.set)

    def _reset(self) -> None:
        self._credit = None
        self._returned, self._claimed, self._finished = [], [], []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._dirty = asyncio.Event()

    async def _messages(self) -> AsyncIterator[pb.WorkerMessage]:
        yield pb.WorkerMessage(hello=self._hello())
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._returned:
                returned, self._returned = self._returned, []
                yield pb.WorkerMessage(returned=pb.Returned(task_ids=returned))
            if self._claimed or self._finished:
                if self._ack_timer is not None:
                    self._ack_timer.cancel()
                    self._ack_timer = None
                claimed, finished, self._claimed, self._finished = self._claimed, self._finished, [], []
                yield pb.WorkerMessage(settled=pb.Settled(claimed=claimed, finished=finished))
            if self._credit is not None:
                credit, self._credit = self._credit, None
                yield pb.WorkerMessage(credit=pb.Credit(slots=credit))

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                async with aio_channel(self.address, self._cfg) as channel:
                    # Messages pending for an earlier stream are stale: the Hello carries the truth.
                    self._reset()
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
