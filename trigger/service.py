"""The TriggerService gRPC API: worker subscriptions and due hints.

Every field a worker or a hint carries is checked against ``leasesched.limits``
before it has any effect; a refusal is INVALID_ARGUMENT whose details name the
field, the value and the limit.

Subscribe. The first message must be a ``Hello``: worker_id of
``limits.WORKER_ID_RE`` (it is published in the trigger's ZooKeeper
registration, so it must stay a short printable name), a valid namespace,
``limits.SUBSCRIBE_TASK_TYPES`` task types each of ``limits.TYPE_RE``, and a
capacity within ``limits.WORKER_SLOTS``. Later messages: ``Credit.slots``
within ``limits.WORKER_SLOTS``; ``Returned.task_ids`` and each of
``Settled.claimed``/``Settled.finished`` at most
``limits.TASK_IDS_PER_MESSAGE`` entries, every id a UUID, every attempt within
``limits.CLAIM_ATTEMPT`` and every lease token non-negative; a second Hello is
refused. A message with no kind set (empty, or of a kind added to the
protocol later) is ignored: fields are only ever added.

Decision: a bad message in an established stream ends the stream with
INVALID_ARGUMENT — it is not logged and skipped. A worker that sends one is
buggy or hostile; skipping would hide the bug (a credit of -1 silently starves
the worker, a malformed ack silently costs a read per task) and let a hostile
client make the trigger walk huge lists. Each message is checked whole before
any of it is applied, so a refused message changes nothing; the worker may
reconnect with a fresh Hello, and dispatches it had not claimed are offered
again as for any stream that ends. Bytes that are not a ``WorkerMessage`` at
all end the stream the same way.

Refusals. A worker declares its namespace in the call's metadata
(``worker.subscriptions.NAMESPACE_HEADER``); a token that may not act in it
is refused PERMISSION_DENIED before anything is read, and an accepted stream
gets initial metadata with ``ACCEPTED_HEADER`` at once, before the Hello: the
worker writes nothing on a stream until then (a write racing the refusal
turned it into INTERNAL on the worker's side). A token of the wrong role or
an unknown token is refused by the auth interceptor before Subscribe runs.
Every refused stream is logged by ``RefusalLog`` in one WARNING line naming
the token's role and namespace (when the token is known), the namespace
asked for and the peer.

NotifyDue. A hint is checked whole (task_id a UUID; shard within the
cluster's shards; attempt within ``limits.CLAIM_ATTEMPT``; lease_token ≥ 0;
priority within ``limits.PRIORITY``; type of ``limits.TYPE_RE``, required with
an attempt; namespace valid when given; run_at a valid timestamp no later than
``limits.MAX_STORED_TIME_MS`` and not before the epoch) before the trigger acts
on it: a malformed hint used to reach the dispatcher and fail there (INTERNAL),
or worse, inside another worker's stream when it was dispatched.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from leasesched import limits
from leasesched.auth import Authenticator, current_principal, require_namespace
from leasesched.errors import InvalidArgument, PermissionDenied, SchedulerError
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from leasesched.server.error_mapping import code_for
from leasesched.server.validation import check_concurrency_key, check_namespace, check_task_id, check_type, check_worker_id
from trigger.dispatcher import Dispatcher, WorkerLink

log = logging.getLogger(__name__)

# Shared with the worker (worker/subscriptions.py); kept here too so the trigger does not import the worker.
NAMESPACE_HEADER = "leasesched-namespace"
ACCEPTED_HEADER = "leasesched-subscription"
REFUSED_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _uuid(value: str, field: str) -> uuid.UUID:
    try:
        return check_task_id(value)
    except InvalidArgument:
        raise InvalidArgument(f"{field} {value[:80]!r} is not a UUID") from None


def _id_count(values: Sequence[object], field: str) -> None:
    limits.TASK_IDS_PER_MESSAGE.check(len(values), field)


def check_hello(hello: pb.Hello) -> tuple[str, frozenset[str]]:
    """The namespace and task types of a valid Hello; raises InvalidArgument otherwise."""
    check_worker_id(hello.worker_id, "Hello.worker_id")
    namespace = check_namespace(hello.namespace, "Hello.namespace")
    limits.SUBSCRIBE_TASK_TYPES.check(len(hello.task_types), "Hello.task_types")
    for name in hello.task_types:
        check_type(name, "Hello.task_types entry")
    limits.WORKER_SLOTS.check(hello.capacity, "Hello.capacity")
    return namespace, frozenset(hello.task_types)


def _check_ref(ref: pb.TaskRef, field: str) -> uuid.UUID:
    task_id = _uuid(ref.task_id, f"{field}.task_id")
    limits.CLAIM_ATTEMPT.check(ref.attempt, f"{field}.attempt")
    if ref.lease_token < 0:
        raise InvalidArgument(f"{field}.lease_token {ref.lease_token} is out of range 0..{limits.INT64_MAX}")
    return task_id


def check_notify_due(request: pb.NotifyDueRequest, shards: int | None) -> None:
    """A due hint is well-formed, or InvalidArgument naming the first bad field."""
    _uuid(request.task_id, "task_id")
    high = (shards - 1) if shards else limits.INT32_MAX
    if not 0 <= request.shard <= high:
        raise InvalidArgument(f"shard {request.shard} is out of range 0..{high}")
    limits.CLAIM_ATTEMPT.check(request.attempt, "attempt")
    if request.lease_token < 0:
        raise InvalidArgument(f"lease_token {request.lease_token} is out of range 0..{limits.INT64_MAX}")
    limits.PRIORITY.check(request.priority, "priority")
    if request.type or request.attempt > 0:  # required with an attempt
        check_type(request.type)
    if request.namespace:
        check_namespace(request.namespace)
    check_concurrency_key(request.concurrency_key)
    if request.HasField("created") and len(request.created.payload) > limits.MAX_CREATED_PAYLOAD:
        raise InvalidArgument(
            f"created.payload is {len(request.created.payload)} bytes, over the {limits.MAX_CREATED_PAYLOAD} a hint may carry"
        )
    if request.HasField("run_at"):
        run_at = request.run_at
        if not 0 <= run_at.nanos < 1_000_000_000:
            raise InvalidArgument(f"run_at.nanos {run_at.nanos} is out of range 0..999999999")
        if not 0 <= run_at.seconds * 1000 <= limits.MAX_STORED_TIME_MS:
            raise InvalidArgument(
                f"run_at {run_at.seconds} s is out of range 0..{limits.MAX_STORED_TIME_MS // 1000} s (1970 to 9999-12-31)"
            )


def _require_subscribe_namespace(namespace: str) -> None:
    """``require_namespace`` with a message that names the token's role and namespace."""
    try:
        require_namespace(namespace)
    except PermissionDenied:
        principal = current_principal.get()
        assert principal is not None  # require_namespace refuses only an authenticated caller
        raise PermissionDenied(
            f"a {principal.role} token of namespace {principal.namespace!r} may not subscribe for namespace {namespace!r}"
        ) from None


def _code(code: Any) -> grpc.StatusCode | None:
    if isinstance(code, grpc.StatusCode) or code is None:
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)  # some versions give the integer


class RefusalLog(grpc.aio.ServerInterceptor):
    """One WARNING line per refused Subscribe stream (UNAUTHENTICATED or
    PERMISSION_DENIED, from the auth interceptor or from Subscribe itself):
    which token (id, role, namespace, when it is a known token), which
    namespace it asked for, from where. It sits outside the auth interceptor
    (``build_server(outer_interceptors=...)``); it looks the token up again
    through the same ``Authenticator``, whose cache makes that free."""

    def __init__(self, authenticator: Authenticator | None) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.stream_stream is None or not details.method.endswith("/Subscribe"):
            return handler
        inner = handler.stream_stream
        metadata = dict(details.invocation_metadata or ())

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for reply in inner(request_iterator, context):
                    yield reply
            except grpc.aio.AbortError:
                code = _code(context.code())
                if code in REFUSED_CODES:
                    await self._log(code, metadata, context)
                raise

        return grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    async def _log(self, code: grpc.StatusCode, metadata: dict[str, Any], context: grpc.aio.ServicerContext) -> None:
        who = "no known token"
        authorization = metadata.get("authorization")
        if self._authenticator is not None and isinstance(authorization, str):
            try:
                principal = await self._authenticator.authenticate(authorization)
                who = f"token {principal.token_id} of role {principal.role!r}, namespace {principal.namespace!r}"
            except SchedulerError:
                pass
        asked = metadata.get(NAMESPACE_HEADER)
        log.warning(
            "Subscribe refused %s: %s (%s; asked for namespace %s; peer %s)",
            code.name, context.details(), who, repr(asked) if asked else "(not declared)", context.peer(),
        )  # fmt: skip


class TriggerService(pb_grpc.TriggerServiceServicer):
    def __init__(
        self,
        dispatcher: Dispatcher,
        on_due_hint: Callable[[pb.NotifyDueRequest], None],
        max_streams_per_worker: int = 4,
        logical_shards: int | None = None,
    ) -> None:
        """``logical_shards``: the cluster's shard count, so a hint for a shard
        it does not have is refused; None checks only that it is not negative."""
        self._dispatcher = dispatcher
        self._on_due_hint = on_due_hint
        self._max_streams = max_streams_per_worker
        self._shards = logical_shards
        self._streams: Counter[str] = Counter()
        self._readers: set[asyncio.Task[None]] = set()

    async def Subscribe(
        self, request_iterator: AsyncIterator[pb.WorkerMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Dispatch]:
        declared = dict(context.invocation_metadata() or ()).get(NAMESPACE_HEADER)
        if isinstance(declared, str):
            try:
                check_namespace(declared, f"metadata {NAMESPACE_HEADER}")
                _require_subscribe_namespace(declared)
            except (InvalidArgument, PermissionDenied) as exc:
                await context.abort(code_for(exc), str(exc))
                return
        # Accepted: tell the worker before reading anything, so it sends its Hello now.
        await context.send_initial_metadata(((ACCEPTED_HEADER, "accepted"),))
        try:
            first = await anext(aiter(request_iterator), None)
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message of Subscribe must be a Hello; it is not a valid WorkerMessage"
            )
            return
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of Subscribe must be a Hello")
            return  # abort raised already; this tells the type checker
        hello = first.hello
        try:
            namespace, types = check_hello(hello)
            if isinstance(declared, str) and namespace != declared:
                raise InvalidArgument(f"Hello.namespace {namespace!r} differs from metadata {NAMESPACE_HEADER} {declared!r}")
            _require_subscribe_namespace(namespace)
        except (InvalidArgument, PermissionDenied) as exc:
            await context.abort(code_for(exc), str(exc))
            return
        principal = current_principal.get()
        identity = f"{principal.token_id if principal else '-'}/{hello.worker_id}"
        if self._streams[identity] >= self._max_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker {hello.worker_id!r} already has {self._max_streams} streams"
            )
        self._streams[identity] += 1
        link = self._dispatcher.connect(hello.worker_id, namespace, types, hello.capacity)
        reader = asyncio.create_task(self._read(request_iterator, link))
        self._readers.add(reader)
        refused: BaseException | None = None
        getter: asyncio.Future[pb.Dispatch] | None = None
        try:
            while not reader.done():
                getter = asyncio.ensure_future(link.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    dispatch = getter.result()
                    # Diagnostic (benchmarks): the moment it goes onto the stream, after the outbox.
                    dispatch.dispatched_at.FromNanoseconds(time.time_ns())
                    yield dispatch
                else:
                    getter.cancel()
            if not reader.cancelled():
                refused = reader.exception()
        finally:
            # A stream cancelled while waiting (the worker went away) leaves the
            # pending get behind: cancel it, or asyncio logs it destroyed at ERROR.
            if getter is not None:
                getter.cancel()
            reader.cancel()
            self._readers.discard(reader)
            self._dispatcher.disconnect(link)
            self._streams[identity] -= 1
            if self._streams[identity] <= 0:
                del self._streams[identity]
        if isinstance(refused, InvalidArgument):
            log.warning("worker %s sent a bad message, stream ended: %s", hello.worker_id, refused)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refused))
        elif refused is not None:
            # A bug here, not the worker's fault: say so instead of ending the stream OK.
            log.error("stream of worker %s failed", hello.worker_id, exc_info=refused)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the trigger log")

    def close(self) -> None:
        """Shutdown: end every Subscribe stream now (status OK), so workers
        stop streaming to this trigger instead of waiting for the server's grace."""
        for reader in list(self._readers):
            reader.cancel()

    async def _read(self, request_iterator: AsyncIterator[pb.WorkerMessage], link: WorkerLink) -> None:
        """Apply the worker's messages in order; raises InvalidArgument on the
        first bad one (checked whole first, so it changes nothing)."""
        count = 1
        try:
            async for message in request_iterator:
                count += 1
                self._apply(message, link)
        except DecodeError:
            raise InvalidArgument(f"message {count + 1} of the stream is not a valid WorkerMessage") from None

    def _apply(self, message: pb.WorkerMessage, link: WorkerLink) -> None:
        kind = message.WhichOneof("kind")
        if kind == "credit":
            self._dispatcher.set_credits(link, int(limits.WORKER_SLOTS.check(message.credit.slots, "Credit.slots")))
        elif kind == "returned":
            ids, limited = message.returned.task_ids, message.returned.limited_task_ids
            _id_count(ids, "Returned.task_ids")
            _id_count(limited, "Returned.limited_task_ids")
            returned = {_uuid(task_id, "Returned.task_ids entry") for task_id in ids}
            held = {_uuid(task_id, "Returned.limited_task_ids entry") for task_id in limited}
            self._dispatcher.returned_all(returned)
            self._dispatcher.limited_all(held)
        elif kind == "settled":
            settled = message.settled
            _id_count(settled.claimed, "Settled.claimed")
            _id_count(settled.finished, "Settled.finished")
            claimed = [(_check_ref(ref, "Settled.claimed"), ref) for ref in settled.claimed]
            finished = [(_check_ref(ref, "Settled.finished"), ref) for ref in settled.finished]
            for task_id, ref in claimed:
                self._dispatcher.claimed(link, task_id, ref.attempt, ref.lease_token)
            for task_id, ref in finished:
                self._dispatcher.finished(link, task_id, ref.lease_token)
        elif kind == "hello":
            raise InvalidArgument("a Hello may only be the first message of a Subscribe stream")

    async def NotifyDue(self, request: pb.NotifyDueRequest, context: grpc.aio.ServicerContext) -> pb.NotifyDueResponse:
        check_notify_due(request, self._shards)
        self._on_due_hint(request)
        return pb.NotifyDueResponse()

    async def NotifyDueBatch(
        self, request: pb.NotifyDueBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.NotifyDueResponse:
        """Hints TaskService had pending for this trigger. All are checked
        before any is acted on: one malformed hint refuses the call whole."""
        limits.BATCH_ITEMS.check(len(request.hints), "hints")
        for i, hint in enumerate(request.hints):
            try:
                check_notify_due(hint, self._shards)
            except InvalidArgument as exc:
                raise InvalidArgument(f"hints[{i}]: {exc}") from None
        for hint in request.hints:
            self._on_due_hint(hint)
        return pb.NotifyDueResponse()
