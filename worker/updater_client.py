"""TaskUpdater clients that find the service in ZooKeeper and fail over.

Workers never need an address: every TaskUpdater registers itself, and the
client moves to another one when a call answers UNAVAILABLE. ``UpdaterClient``
serves the event loop (claims, reports); ``SyncUpdaterClient`` serves the
heartbeat thread (``worker.heartbeats``), which must keep leases alive while
the loop is blocked, so it has its own blocking channel. Both pick targets the
same way (``_Targets``) and use the same TLS and token settings
(``leasesched.transport``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any, Callable

import grpc

from leasesched.config import Config
from leasesched.transport import SERVER_GONE_CODES, aio_channel, sync_channel
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# How long calls in flight on a channel being left may still take (longer than
# any call's deadline: claims and reports use at most a few seconds).
DRAIN_GRACE_S = 30.0


class _Targets:
    """The registered TaskUpdaters, taken in turn (a failed one is left for the next)."""

    def __init__(self, addresses: Callable[[], list[str]]) -> None:
        self._addresses = addresses
        self._rotation = itertools.count()

    def pick(self) -> str:
        found = sorted(self._addresses())
        if not found:
            raise _unavailable("no TaskUpdater is registered in ZooKeeper")
        return found[next(self._rotation) % len(found)]


class UpdaterClient:
    def __init__(self, addresses: Callable[[], list[str]], cfg: Config, default_timeout_s: float = 5.0) -> None:
        self._targets = _Targets(addresses)
        self._cfg = cfg
        self._timeout = default_timeout_s
        self._address: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TaskUpdaterStub | None = None
        self._closing: set[asyncio.Task[None]] = set()  # old channels draining (``_drop``)

    async def _connect(self) -> pb_grpc.TaskUpdaterStub:
        if self._stub is not None:
            return self._stub
        self._address = await asyncio.to_thread(self._targets.pick)
        self._channel = aio_channel(self._address, self._cfg)
        self._stub = pb_grpc.TaskUpdaterStub(self._channel)
        return self._stub

    async def _drop(self) -> None:
        """Leave this TaskUpdater: new calls go to a fresh channel at once, and
        the old one closes only after the calls still in flight on it ended.
        Closing it at once cancelled them (as ``CancelledError``, past every
        ``except RpcError``): a claim that had landed was neither run nor given
        back, and its task waited for its lease to expire, one attempt spent."""
        channel, self._channel, self._stub, self._address = self._channel, None, None, None
        if channel is not None:
            closing = asyncio.create_task(channel.close(grace=DRAIN_GRACE_S))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        stub = await self._connect()
        try:
            return await getattr(stub, method)(request, timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() in SERVER_GONE_CODES:
                await self._drop()  # try another TaskUpdater next time
            raise

    async def close(self) -> None:
        """At shutdown, after the executions ended: close every channel now."""
        channel, self._channel, self._stub, self._address = self._channel, None, None, None
        if channel is not None:
            await channel.close()
        for closing in list(self._closing):
            closing.cancel()


class SyncUpdaterClient:
    """The blocking twin of ``UpdaterClient``, safe to call from several threads."""

    def __init__(self, addresses: Callable[[], list[str]], cfg: Config, default_timeout_s: float = 5.0) -> None:
        self._targets = _Targets(addresses)
        self._cfg = cfg
        self._timeout = default_timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.TaskUpdaterStub | None = None

    def _connect(self) -> tuple[grpc.Channel, pb_grpc.TaskUpdaterStub]:
        with self._lock:
            if self._channel is None or self._stub is None:
                self._channel = sync_channel(self._targets.pick(), self._cfg)
                self._stub = pb_grpc.TaskUpdaterStub(self._channel)
            return self._channel, self._stub

    def _drop(self, channel: grpc.Channel) -> None:
        with self._lock:
            current = self._channel
            if current is None or id(current) != id(channel):
                return  # another thread replaced it already
            self._channel, self._stub = None, None
        current.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        channel, stub = self._connect()
        try:
            return getattr(stub, method)(request, timeout=timeout or self._timeout)
        except grpc.RpcError as err:
            if err.code() in SERVER_GONE_CODES:
                self._drop(channel)
            raise

    def close(self) -> None:
        with self._lock:
            channel: grpc.Channel | None = self._channel
            self._channel, self._stub = None, None
        if channel is not None:
            channel.close()


class _Unavailable(grpc.RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message


def _unavailable(message: str) -> grpc.RpcError:
    return _Unavailable(message)
