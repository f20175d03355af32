"""A TaskUpdater client that finds the service in ZooKeeper and fails over.

Workers never need an address: every TaskUpdater registers itself, and the
client moves to another one when a call answers UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Callable

import grpc

from leasesched.config import Config
from leasesched.transport import SERVER_GONE_CODES, aio_channel
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class UpdaterClient:
    def __init__(self, addresses: Callable[[], list[str]], cfg: Config, default_timeout_s: float = 5.0) -> None:
        self._addresses = addresses
        self._cfg = cfg
        self._timeout = default_timeout_s
        self._address: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TaskUpdaterStub | None = None
        self._rotation = itertools.count()

    async def _connect(self) -> pb_grpc.TaskUpdaterStub:
        if self._stub is not None:
            return self._stub
        found = sorted(await asyncio.to_thread(self._addresses))
        if not found:
            raise _unavailable("no TaskUpdater is registered in ZooKeeper")
        self._address = found[next(self._rotation) % len(found)]
        self._channel = aio_channel(self._address, self._cfg)
        self._stub = pb_grpc.TaskUpdaterStub(self._channel)
        return self._stub

    async def _drop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub, self._address = None, None, None

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        stub = await self._connect()
        try:
            return await getattr(stub, method)(request, timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() in SERVER_GONE_CODES:
                await self._drop()  # try another TaskUpdater next time
            raise

    async def close(self) -> None:
        await self._drop()


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
