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

Nothing is written on a stream before the trigger accepted it. The worker
declares its namespace in the call's metadata (``NAMESPACE_HEADER``); the
trigger checks the caller's token (role and namespace) before it answers,
and sends its initial metadata with ``ACCEPTED_HEADER`` only when the stream
is allowed; a refusal is a status without it. Only then does the Hello go
out. Writing the Hello at once raced the trigger's refusal: a write on a
stream the server had already ended fails inside gRPC with INTERNAL
("Internal error from Core", grpc/grpc#36066) instead of the real
PERMISSION_DENIED, about one refused stream in twelve across processes.

A refusal (UNAUTHENTICATED or PERMISSION_DENIED) is reported to
``on_refused`` and retried only after ``REFUSED_BACKOFF_S`` (doubling to
``REFUSED_BACKOFF_MAX_S``): credentials do not fix themselves within
milliseconds. ``worker.runner`` decides when a refusal is permanent.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import AsyncIterator, Awaitable, Callable

import grpc

from leasesched.config import Config
from leasesched.transport import SERVER_GONE_CODES, aio_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ACK_DELAY_S = 0.05

# The worker's namespace, declared when the stream opens (before any message),
# so the trigger can refuse a token of another namespace before the Hello.
NAMESPACE_HEADER = "leasesched-namespace"
# In the trigger's initial metadata: the stream is accepted, send the Hello.
ACCEPTED_HEADER = "leasesched-subscription"
# A trigger that predates ACCEPTED_HEADER sends no initial metadata before its
# first dispatch: after this long without any, the Hello is sent anyway.
HEADERS_WAIT_S = 5.0

REFUSED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
REFUSED_BACKOFF_S = 5.0  # >= the servers' default auth_cache_s: a token stored just now is seen by then
REFUSED_BACKOFF_MAX_S = 60.0

OnDispatch = Callable[[pb.Dispatch, "TriggerLink"], Awaitable[None]]
OnRefused = Callable[["TriggerLink", grpc.StatusCode, str], None]
OnAccepted = Callable[["TriggerLink"], None]

_ROLE_IN_DETAILS = re.compile(r"\ba (client|worker|admin) token\b")


def role_in_details(details: str) -> str | None:
    """The caller's role, when a refusal names it ("a client token may not call Subscribe")."""
    found = _ROLE_IN_DETAILS.search(details or "")
    return found.group(1) if found else None


class TriggerLink:
    def __init__(
        self,
        address: str,
        cfg: Config,
        hello: Callable[[], pb.Hello],
        on_dispatch: OnDispatch,
        on_refused: OnRefused | None = None,
        on_accepted: OnAccepted | None = None,
        namespace: str = "",
    ) -> None:
        self.address = address
        self._cfg = cfg
        self._hello = hello
        self._on_dispatch = on_dispatch
        self._on_refused = on_refused
        self._on_accepted = on_accepted
        self._namespace = namespace
        self.refusals = 0  # refused attempts in a row (0 once a stream was accepted)
        self._stream_accepted = False
        self._generation = 0  # one per stream: the message generator of an ended stream returns
        self._credit: int | None = None
        self._returned: list[str] = []
        self._limited: list[str] = []
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

    def return_limited(self, task_id: str) -> None:
        """Its claim was refused by a full concurrency limit: the trigger holds it back."""
        self._limited.append(task_id)
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
        self._returned, self._limited, self._claimed, self._finished = [], [], [], []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._dirty = asyncio.Event()

    async def _messages(self, generation: int, accepted: "asyncio.Future[bool]") -> AsyncIterator[pb.WorkerMessage]:
        # Ends (and so does gRPC's task that reads it) when its stream ends: a
        # generator left waiting was destroyed pending, and logged at ERROR.
        if not await accepted:
            return
        yield pb.WorkerMessage(hello=self._hello())
        while True:
            await self._dirty.wait()
            if generation != self._generation:
                return
            self._dirty.clear()
            if self._returned or self._limited:
                returned, limited, self._returned, self._limited = self._returned, self._limited, [], []
                yield pb.WorkerMessage(returned=pb.Returned(task_ids=returned, limited_task_ids=limited))
            if self._claimed or self._finished:
                if self._ack_timer is not None:
                    self._ack_timer.cancel()
                    self._ack_timer = None
                claimed, finished, self._claimed, self._finished = self._claimed, self._finished, [], []
                yield pb.WorkerMessage(settled=pb.Settled(claimed=claimed, finished=finished))
            if self._credit is not None:
                credit, self._credit = self._credit, None
                yield pb.WorkerMessage(credit=pb.Credit(slots=credit))

    async def subscribe_once(self) -> None:
        """One stream: open it, wait until the trigger accepts it, send the
        Hello, take dispatches until it ends. Raises ``grpc.aio.AioRpcError``
        with the stream's status (the status of a refusal, never INTERNAL)."""
        loop = asyncio.get_running_loop()
        async with aio_channel(self.address, self._cfg) as channel:
            # Messages pending for an earlier stream are stale: the Hello carries the truth.
            self._reset()
            self._generation += 1
            generation = self._generation
            accepted: asyncio.Future[bool] = loop.create_future()
            metadata = ((NAMESPACE_HEADER, self._namespace),) if self._namespace else None
            call = pb_grpc.TriggerServiceStub(channel).Subscribe(self._messages(generation, accepted), metadata=metadata)
            headers_task = asyncio.ensure_future(call.initial_metadata())
            try:
                done, _ = await asyncio.wait({headers_task}, timeout=HEADERS_WAIT_S)
                headers: dict[str, object] | None = None
                if done:
                    try:
                        headers = dict(headers_task.result() or ())
                    except Exception:  # noqa: BLE001 - the stream failed: its status follows
                        headers = {}
                # Refused: the status came without our header. No header in time:
                # an older trigger that answers only with its first dispatch.
                ok = headers is None or ACCEPTED_HEADER in headers
                accepted.set_result(ok)
                if ok:
                    self.connected = True
                    self._stream_accepted = True
                    self.refusals = 0
                    log.info("subscribed to trigger %s", self.address)
                    if self._on_accepted is not None:
                        self._on_accepted(self)
                async for dispatch in call:
                    await self._on_dispatch(dispatch, self)
            finally:
                self.connected = False
                self._generation += 1
                self._dirty.set()  # wakes the generator of this stream, which returns
                if not accepted.done():
                    accepted.set_result(False)
                headers_task.cancel()
                call.cancel()

    async def _run(self) -> None:
        delay = 0.2
        while True:
            self._stream_accepted = False
            refused = False
            try:
                await self.subscribe_once()
            except grpc.aio.AioRpcError as err:
                if err.code() in REFUSED_CODES:
                    refused = True
                    self.refusals += 1
                    log.debug("stream to trigger %s refused: %s %s", self.address, err.code().name, err.details())
                    if self._on_refused is not None:
                        self._on_refused(self, err.code(), err.details() or "")
                elif err.code() in SERVER_GONE_CODES:
                    # A trigger stopping or restarting, a connection closed (GOAWAY):
                    # known and harmless, the stream is opened again.
                    log.info("stream to trigger %s ended: %s (%s); re-subscribing", self.address, err.code().name, err.details())
                else:
                    log.warning("stream to trigger %s ended: %s (%s); re-subscribing", self.address, err.code().name, err.details())
            if self._stream_accepted:
                delay = 0.2  # it worked: come back soon
            if refused:
                await asyncio.sleep(min(REFUSED_BACKOFF_S * 2 ** (self.refusals - 1), REFUSED_BACKOFF_MAX_S))
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
