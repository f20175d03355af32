"""TaskUpdater clients that find the service in ZooKeeper and fail over.

Workers never need an address: every TaskUpdater registers itself, and the
client moves to another one when a call answers UNAVAILABLE. ``UpdaterClient``
serves the event loop (claims, reports); ``SyncUpdaterClient`` serves the
heartbeat thread (``worker.heartbeats``), which must keep leases alive while
the loop is blocked, so it has its own blocking channel. Both pick targets the
same way (``_Targets``) and use the same TLS and token settings
(``leasesched.transport``).

Claims and completions are coalesced (``leasesched.batching``): one that
finds fewer than ``BATCH_CALLS_IN_FLIGHT`` calls of its kind out is sent at
once, alone, as the unary call it always was; those that come while they all
are out leave together in one ClaimTasks / CompleteTasks call. Each item gets
exactly its unary answer, or its error raised as the ``grpc.aio.AioRpcError``
the unary call would have raised, so the execution code cannot tell the two
apart. A TaskUpdater that does not know the batch calls (UNIMPLEMENTED: an
older version during a rolling upgrade) gets unary calls from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any, Callable

import grpc

from leasesched import limits
from leasesched.batching import Batch, Coalescer
from leasesched.config import Config
from leasesched.transport import SERVER_GONE_CODES, aio_channel, sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# How long calls in flight on a channel being left may still take (longer than
# any call's deadline: claims and reports use at most a few seconds).
DRAIN_GRACE_S = 30.0

# Batch calls of one kind (claims, completions) out at once. More in flight
# means less waiting and smaller batches; 4 keeps a claim's wait under one
# call at the loads a worker sees, while a backlog still leaves in batches.
BATCH_CALLS_IN_FLIGHT = 4

# Unary method -> (its batch method, the batch request's item field, the result's success field).
_BATCHED: dict[str, tuple[str, str, str]] = {
    "ClaimTask": ("ClaimTasks", "claims", "claimed"),
    "CompleteTask": ("CompleteTasks", "completions", "completed"),
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


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
        self._batch_calls = True  # False once a TaskUpdater answered UNIMPLEMENTED to one
        self._coalescers: dict[str, Coalescer[Any, Any]] = {
            method: Coalescer(self._batch_sender(method), int(limits.BATCH_ITEMS.high), BATCH_CALLS_IN_FLIGHT)
            for method in _BATCHED
        }

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
        coalescer = self._coalescers.get(method)
        if coalescer is not None:
            return await coalescer.submit(request, timeout or self._timeout)
        return await self._unary(method, request, timeout)

    async def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        stub = await self._connect()
        try:
            return await getattr(stub, method)(request, timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() in SERVER_GONE_CODES:
                await self._drop()  # try another TaskUpdater next time
            raise

    def _batch_sender(self, method: str) -> Callable[[Batch[Any]], Any]:
        batch_method, field, success = _BATCHED[method]

        async def send(batch: Batch[Any]) -> list[Any]:
            if len(batch.items) == 1 or not self._batch_calls:
                return list(await asyncio.gather(
                    *(self._unary(method, item, batch.timeout_s) for item in batch.items), return_exceptions=True
                ))  # fmt: skip
            request = getattr(pb, f"{batch_method}Request")(**{field: batch.items})
            try:
                reply = await self._unary(batch_method, request, max(0.001, batch.timeout_s))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("the TaskUpdater does not know %s: unary calls from now on", batch_method)
                self._batch_calls = False
                return await send(batch)
            return [getattr(r, success) if r.WhichOneof("outcome") == success else _item_error(r.error) for r in reply.results]

        return send

    async def close(self) -> None:
        """At shutdown, after the executions ended: close every channel now."""
        for coalescer in self._coalescers.values():
            await coalescer.close()
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


def _item_error(error: pb.ItemError) -> grpc.aio.AioRpcError:
    """One item's error, as the unary call would have raised it."""
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=error.message)


def _unavailable(message: str) -> grpc.RpcError:
    return _Unavailable(message)
