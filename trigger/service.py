"""The TriggerService gRPC API: worker subscriptions and due hints."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import AsyncIterator, Callable

import grpc

from leasesched.auth import current_principal, require_namespace
from leasesched.errors import InvalidArgument, PermissionDenied
from services.error_mapping import code_for
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.validation import check_namespace, check_task_id
from trigger.dispatcher import Dispatcher, WorkerLink

log = logging.getLogger(__name__)

MAX_TYPES = 256


class TriggerService(pb_grpc.TriggerServiceServicer):
    def __init__(
        self, dispatcher: Dispatcher, on_due_hint: Callable[[pb.NotifyDueRequest], None], max_streams_per_worker: int = 4
    ) -> None:
        self._dispatcher = dispatcher
        self._on_due_hint = on_due_hint
        self._max_streams = max_streams_per_worker
        self._streams: Counter[str] = Counter()
        self._readers: set[asyncio.Task[None]] = set()

    async def Subscribe(
        self, request_iterator: AsyncIterator[pb.WorkerMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Dispatch]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of Subscribe must be a Hello")
            return  # abort raised already; this tells the type checker
        hello = first.hello
        if not hello.worker_id or not hello.task_types or len(hello.task_types) > MAX_TYPES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Hello needs a worker_id and 1-{MAX_TYPES} task_types")
        try:
            namespace = check_namespace(hello.namespace)
            require_namespace(namespace)
        except (InvalidArgument, PermissionDenied) as exc:
            await context.abort(code_for(exc), str(exc))
        principal = current_principal.get()
        identity = f"{principal.token_id if principal else '-'}/{hello.worker_id}"
        if self._streams[identity] >= self._max_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker {hello.worker_id!r} already has {self._max_streams} streams"
            )
        self._streams[identity] += 1
        link = self._dispatcher.connect(hello.worker_id, namespace, frozenset(hello.task_types), hello.capacity)
        reader = asyncio.create_task(self._read(request_iterator, link))
        self._readers.add(reader)
        try:
            while not reader.done():
                getter = asyncio.ensure_future(link.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
        finally:
            reader.cancel()
            self._readers.discard(reader)
            self._dispatcher.disconnect(link)
            self._streams[identity] -= 1
            if self._streams[identity] <= 0:
                del self._streams[identity]

    def close(self) -> None:
        """Shutdown: end every Subscribe stream now (status OK), so workers
        stop streaming to this trigger instead of waiting for the server's grace."""
        for reader in list(self._readers):
            reader.cancel()

    async def _read(self, request_iterator: AsyncIterator[pb.WorkerMessage], link: WorkerLink) -> None:
        async for message in request_iterator:
            kind = message.WhichOneof("kind")
            if kind == "credit":
                self._dispatcher.set_credits(link, message.credit.slots)
            elif kind == "returned":
                for task_id in message.returned.task_ids:
                    try:
                        self._dispatcher.returned(check_task_id(task_id))
                    except InvalidArgument:
                        log.warning("worker %s returned a malformed task id", link.worker_id)
            elif kind == "settled":
                try:
                    for ref in message.settled.claimed:
                        self._dispatcher.claimed(link, check_task_id(ref.task_id), ref.attempt, ref.lease_token)
                    for ref in message.settled.finished:
                        self._dispatcher.finished(link, check_task_id(ref.task_id), ref.lease_token)
                except InvalidArgument:
                    log.warning("worker %s acked a malformed task id", link.worker_id)

    async def NotifyDue(self, request: pb.NotifyDueRequest, context: grpc.aio.ServicerContext) -> pb.NotifyDueResponse:
        check_task_id(request.task_id)
        self._on_due_hint(request)
        return pb.NotifyDueResponse()
