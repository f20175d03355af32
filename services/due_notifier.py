"""Hints to the trigger that owns a shard: "this task is due now".

Without the hint an immediate task waits for the owner's next scan of the due
index; with it, the task reaches a worker in milliseconds. The hint is
best-effort by design: it is sent without waiting, and a lost hint only means
the scan finds the task a moment later.

Shard owners are read from the triggers' ZooKeeper registrations, refreshed in
the background, so a request never waits on ZooKeeper.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from kazoo.client import KazooClient

from leasesched.config import Config
from leasesched.model import Task
from leasesched.coordination import registry
from leasesched.transport import aio_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


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
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
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
            await channel.close()

    def _stub(self, address: str) -> pb_grpc.TriggerServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(address, self._cfg)  # cfg.token: the service's admin token
            self._channels[address] = channel
            stub = self._stubs[address] = pb_grpc.TriggerServiceStub(channel)
        return stub

    async def __call__(self, stored: Task) -> None:
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
        task = asyncio.create_task(self._send(address, request))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, address: str, request: pb.NotifyDueRequest) -> None:
        task_id = request.task_id
        try:
            await self._stub(address).NotifyDue(request, timeout=2)
        except grpc.RpcError as err:
            log.debug("due hint for task %s to %s failed: %s", task_id, address, err.code())
