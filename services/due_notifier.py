"""Hints to the trigger that owns a shard: "this task is due now".

Without the hint an immediate task waits for the owner's next scan of the due
index; with it, the task reaches a worker in milliseconds. The hint is
best-effort by design: it is sent without waiting, and a lost hint only means
the scan finds the task a moment later.

Shard owners are read from the triggers' ZooKeeper registrations, refreshed in
the background, so a request never waits on ZooKeeper.

Hints to one trigger are coalesced (``leasesched.batching``): a hint goes out
at once, alone, while fewer than ``HINT_CALLS_IN_FLIGHT`` calls to that
trigger are out; the ones that come meanwhile leave together in one
NotifyDueBatch call. At low load nothing waits; under load one call carries
many hints. A trigger that does not know NotifyDueBatch (an older version)
gets one NotifyDue per hint from then on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Awaitable, Callable, Sequence

import grpc
from kazoo.client import KazooClient

from leasesched import limits
from leasesched.batching import Batch, Coalescer
from leasesched.config import Config
from leasesched.model import Task
from leasesched.coordination import registry
from leasesched.transport import aio_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.convert import created_pb

log = logging.getLogger(__name__)

HINT_CALLS_IN_FLIGHT = 2  # per trigger
HINT_TIMEOUT_S = 2.0


class DueNotifier:
    def __init__(self, zk: KazooClient, cfg: Config, refresh_s: float = 1.0) -> None:
        self._zk = zk
        self._cfg = cfg
        self._root = cfg.zk_root
        self._refresh_s = refresh_s
        self._owner_of: dict[int, str] = {}
        self._stubs: dict[str, pb_grpc.TriggerServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._coalescers: dict[str, Coalescer[pb.NotifyDueRequest, None]] = {}
        self._batch_calls = True  # False once a trigger answered UNIMPLEMENTED to NotifyDueBatch

    async def start(self) -> None:
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
        for coalescer in self._coalescers.values():
            await coalescer.close()
        for channel in self._channels.values():
            await channel.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 - a stale map only delays hints
                log.debug("trigger map refresh failed: %s", exc)

    async def _refresh(self) -> None:
        members = await asyncio.to_thread(registry.members, self._zk, self._root, "trigger")
        owner_of = {}
        for address, data in members.items():
            for shard in data.get("shards", []):
                owner_of[int(shard)] = address
        self._owner_of = owner_of
        for address in set(self._channels) - set(members):
            channel = self._channels.pop(address)
            self._stubs.pop(address, None)
            self._coalescers.pop(address, None)
            await channel.close()

    def _stub(self, address: str) -> pb_grpc.TriggerServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(address, self._cfg)  # cfg.token: the service's admin token
            self._channels[address] = channel
            stub = self._stubs[address] = pb_grpc.TriggerServiceStub(channel)
        return stub

    async def __call__(self, stored: Task, write_id: uuid.UUID | None = None) -> None:
        """Hint the owner of ``stored``'s shard. ``write_id``: TaskService has
        just created it with this write id, so the hint carries its whole row
        for the worker's claim without a read (``CreatedTask``; not for a
        payload over ``limits.MAX_CREATED_PAYLOAD``, a concurrency key or a
        gate: those claims read the row)."""
        address = self._owner_of.get(stored.shard)
        if address is None:
            return
        request = pb.NotifyDueRequest(
            task_id=str(stored.task_id),
            shard=stored.shard,
            attempt=stored.attempt,
            lease_token=stored.lease_token,
            priority=stored.priority,
            type=stored.type,
            namespace=stored.namespace,
            concurrency_key=stored.concurrency_key,
            gate=stored.gate,
        )
        request.run_at.FromMilliseconds(stored.run_at)
        small = len(stored.payload) <= limits.MAX_CREATED_PAYLOAD
        if write_id is not None and small and not stored.concurrency_key and not stored.gate:
            request.created.CopyFrom(created_pb(stored, write_id))
        coalescer = self._coalescers.get(address)
        if coalescer is None:
            coalescer = self._coalescers[address] = Coalescer(
                self._sender(address), int(limits.BATCH_ITEMS.high), HINT_CALLS_IN_FLIGHT
            )
        coalescer.submit(request, HINT_TIMEOUT_S).add_done_callback(_log_lost_hint)

    def _sender(self, address: str) -> Callable[[Batch[pb.NotifyDueRequest]], Awaitable[list[None]]]:
        async def send(batch: Batch[pb.NotifyDueRequest]) -> list[None]:
            await self._send(address, batch.items, max(0.001, batch.timeout_s))
            return [None] * len(batch.items)

        return send

    async def _send(self, address: str, hints: Sequence[pb.NotifyDueRequest], timeout: float) -> None:
        """One call with every hint, or one call each to a trigger without NotifyDueBatch."""
        stub = self._stub(address)
        if len(hints) > 1 and self._batch_calls:
            try:
                await stub.NotifyDueBatch(pb.NotifyDueBatchRequest(hints=hints), timeout=timeout)
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("trigger %s does not know NotifyDueBatch: one NotifyDue per hint from now on", address)
                self._batch_calls = False
        await asyncio.gather(*(stub.NotifyDue(hint, timeout=timeout) for hint in hints))


def _log_lost_hint(future: "asyncio.Future[None]") -> None:
    """A lost hint only delays its task to the owner's next scan: debug, not warning."""
    if future.cancelled():
        return
    err = future.exception()
    if isinstance(err, grpc.RpcError):
        log.debug("due hint failed: %s", err.code())
    elif err is not None:
        log.debug("due hint failed: %s", err)
