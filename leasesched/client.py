"""The Python client for TaskService: schedule, poll, wait for, cancel and list tasks.

Two classes with the same methods: ``Client`` (blocking) and ``AsyncClient``
(asyncio). Both take their target, token and TLS settings from the same
``Config`` the CLI uses (``Config.from_env()``: ``LEASESCHED_TOKEN``,
``LEASESCHED_TLS_CA``, ...), and build their channel with
``leasesched.transport``, so a setting that works for ``leasesched task`` works
here too::

    from datetime import timedelta
    from leasesched.client import Client, RetryPolicy

    with Client() as client:
        task_id = client.schedule("report.build", b"2026-12", delay=timedelta(seconds=5),
                                  retry_policy=RetryPolicy(maximum_attempts=5))
        task = client.wait(task_id, timeout=timedelta(minutes=1))

What the client does for you, and why:

* **Calls that meet a server going away are retried.** UNAVAILABLE,
  CANCELLED (what a stopping gRPC server answers, see
  ``transport.SERVER_GONE_CODES``) and RESOURCE_EXHAUSTED (a TaskService
  sheds load instead of queueing it) are retried with exponential backoff
  and full jitter (the ``backoff`` library), within ``CallRetry``'s budget.
  Every other answer raises a ``ClientError`` subclass carrying the gRPC code
  and the server's details.
* **A retried ScheduleTask never makes two tasks.** Every schedule carries an
  idempotency key; when you give none, one is generated (a random UUID) and
  the *same request object*, key included, is sent on every retry, so the
  server answers with the task the first attempt may already have created.
  The cost: a keyed schedule is one more conditional write on the server.
  Keys are scoped to a namespace. To survive your own process restarting, pass
  a key you can derive again (an order id, say).
* **There is no watch RPC**, so ``wait`` polls: 50 ms after the first look,
  doubling to at most 1 s between polls, never past its timeout, then
  ``WaitTimeoutError`` (a ``TimeoutError``) with the last state seen.
* **Listing hides pages**: ``list`` follows the opaque page token to the end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import backoff
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from leasesched.config import Config
from leasesched.states import TaskStatus
from leasesched.transport import SERVER_GONE_CODES, aio_channel, sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "CallRetry",
    "Client",
    "ClientError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Progress",
    "RetryPolicy",
    "TaskStatus",
    "TaskView",
    "Timeouts",
    "UnauthenticatedError",
    "UnavailableError",
    "WaitTimeoutError",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Answers after which a call may simply go again: the server is gone or going
# (SERVER_GONE_CODES) or shed the call before doing any work (RESOURCE_EXHAUSTED).
RETRYABLE_CODES = SERVER_GONE_CODES | {grpc.StatusCode.RESOURCE_EXHAUSTED}

DEFAULT_NAMESPACE = "default"
# wait(): the first poll at once, then 50 ms, doubling, at most 1 s apart.
WAIT_FIRST_INTERVAL_S = 0.05
WAIT_MAX_INTERVAL_S = 1.0
# The smallest per-attempt deadline a call is given near the end of a wait.
_MIN_ATTEMPT_S = 0.05


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class RetryPolicy:
    """How the *server* retries a failed task (Temporal's vocabulary; proto ``RetryPolicy``).

    ``None`` leaves a field to the server's default: initial interval 1 s,
    coefficient 2.0, maximum interval 100 x initial, attempts from the
    server's configuration (3 by default). ``maximum_attempts=1`` means no retry.
    A handler error whose type is in ``non_retryable_error_types`` fails the
    task at once.
    """

    initial_interval: dt.timedelta | None = None
    backoff_coefficient: float | None = None
    maximum_interval: dt.timedelta | None = None
    maximum_attempts: int | None = None
    non_retryable_error_types: Sequence[str] = ()

    def to_pb(self) -> pb.RetryPolicy:
        policy = pb.RetryPolicy(
            backoff_coefficient=self.backoff_coefficient or 0.0,
            maximum_attempts=self.maximum_attempts or 0,
            non_retryable_error_types=list(self.non_retryable_error_types),
        )
        if self.initial_interval is not None:
            policy.initial_interval.FromTimedelta(self.initial_interval)
        if self.maximum_interval is not None:
            policy.maximum_interval.FromTimedelta(self.maximum_interval)
        return policy


@dataclass(frozen=True)
class Timeouts:
    """The task's timeouts (proto ``Timeouts``); ``None`` means no limit.

    * ``schedule_to_start``: longest the task may wait between becoming due and being started;
    * ``start_to_close``: longest one attempt may run;
    * ``schedule_to_close``: longest from being due to a final state, over all attempts.
    """

    schedule_to_start: dt.timedelta | None = None
    start_to_close: dt.timedelta | None = None
    schedule_to_close: dt.timedelta | None = None

    def to_pb(self) -> pb.Timeouts:
        timeouts = pb.Timeouts()
        for name in ("schedule_to_start", "start_to_close", "schedule_to_close"):
            value: dt.timedelta | None = getattr(self, name)
            if value is not None:
                getattr(timeouts, name).FromTimedelta(value)
        return timeouts


@dataclass(frozen=True)
class CallRetry:
    """How the *client* retries one RPC that met a server going away (not the task's retries).

    Delays grow from ``initial_backoff`` by 2x up to ``max_backoff`` with full
    jitter (a random delay between 0 and the step, so many clients that lost
    the same server do not come back in step); no attempt starts after
    ``max_elapsed``. Each attempt has its own gRPC deadline, ``attempt_timeout``.
    """

    initial_backoff: dt.timedelta = dt.timedelta(milliseconds=100)
    max_backoff: dt.timedelta = dt.timedelta(seconds=5)
    max_elapsed: dt.timedelta = dt.timedelta(seconds=30)
    attempt_timeout: dt.timedelta = dt.timedelta(seconds=10)
    codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES

    def gives_up_on(self, error: Exception) -> bool:
        return _code_of(error) not in self.codes

    def budget_s(self, deadline: float | None) -> float:
        """Seconds left for retries: ``max_elapsed``, cut short by a caller's monotonic deadline."""
        budget = self.max_elapsed.total_seconds()
        if deadline is not None:
            budget = min(budget, deadline - time.monotonic())
        return max(budget, 0.0)

    def attempt_timeout_s(self, deadline: float | None) -> float:
        timeout = self.attempt_timeout.total_seconds()
        if deadline is not None:
            timeout = min(timeout, max(deadline - time.monotonic(), _MIN_ATTEMPT_S))
        return timeout


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Progress:
    percent: float = 0.0  # 0..100, as the handler last reported it
    message: str = ""


@dataclass(frozen=True)
class TaskView:
    """A task as PollTask, CancelTask and ListTasks show it (proto ``TaskView``).

    Times are timezone-aware UTC datetimes, ``None`` when not (yet) set.
    ``result`` is what the handler returned (SUCCEEDED); ``error`` and
    ``error_type`` say why the latest attempt failed. ``payload`` is empty
    unless the server sends it (PollTask does not).
    """

    task_id: str
    namespace: str
    type: str
    status: TaskStatus
    attempt: int
    max_attempts: int
    priority: int
    progress: Progress
    result: bytes
    error: str
    error_type: str
    cancel_requested: bool
    created_at: dt.datetime | None
    run_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    lease_owner: str
    lease_expires_at: dt.datetime | None
    lease_token: int
    payload: bytes = b""
    # SCHEDULED and no live worker serves its namespace and type right now (a hint).
    no_worker_for_type: bool = False

    @property
    def terminal(self) -> bool:
        """SUCCEEDED, FAILED or CANCELLED: the task will not change any more."""
        return self.status.terminal

    @classmethod
    def from_pb(cls, view: pb.TaskView) -> "TaskView":
        return cls(
            task_id=view.task_id,
            namespace=view.namespace,
            type=view.type,
            status=_status_from_pb(view.status),
            attempt=view.attempt,
            max_attempts=view.max_attempts,
            priority=view.priority,
            progress=Progress(percent=view.progress.percent, message=view.progress.message),
            result=bytes(view.result),
            error=view.error,
            error_type=view.error_type,
            cancel_requested=view.cancel_requested,
            created_at=_datetime(view, "created_at"),
            run_at=_datetime(view, "run_at"),
            started_at=_datetime(view, "started_at"),
            finished_at=_datetime(view, "finished_at"),
            lease_owner=view.lease_owner,
            lease_expires_at=_datetime(view, "lease_expires_at"),
            lease_token=view.lease_token,
            payload=bytes(view.payload),
            no_worker_for_type=view.no_worker_for_type,
        )


def _status_from_pb(value: int) -> TaskStatus:
    if value == pb.TASK_STATUS_UNSPECIFIED:
        raise ValueError("the server sent a task without a status")
    return TaskStatus(pb.TaskStatus.Name(value))


def _datetime(message: Any, name: str) -> dt.datetime | None:
    """An unset time (the server leaves it out) is None, never 1970-01-01."""
    if not message.HasField(name):
        return None
    stamp: Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------- errors


class ClientError(Exception):
    """TaskService refused a call (or could not be reached within the retry budget).

    ``code`` is the gRPC status code, ``details`` the server's message;
    docs/limits.md says what each code means for each call.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(ClientError):
    """The request broke a bound; ``details`` names the field and the limit."""


class NotFoundError(ClientError):
    """No such task (or one of another namespace, which looks the same)."""


class AlreadyExistsError(ClientError):
    """The idempotency key was already used for a different request in this namespace."""


class FailedPreconditionError(ClientError):
    """The task's state does not allow the call (e.g. cancelling a finished task)."""


class PermissionDeniedError(ClientError):
    """The token may not act on this namespace."""


class UnauthenticatedError(ClientError):
    """No token, or one the server does not accept (see ``LEASESCHED_TOKEN``)."""


class UnavailableError(ClientError):
    """The server stayed unreachable (or overloaded) for the whole retry budget."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: UnavailableError,
    grpc.StatusCode.CANCELLED: UnavailableError,
}


def _code_of(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def error_from_rpc(error: grpc.RpcError) -> ClientError:
    """The typed exception for a failed call."""
    code = _code_of(error) or grpc.StatusCode.UNKNOWN
    details_fn = getattr(error, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    return _ERROR_CLASSES.get(code, ClientError)(code, details)


class WaitTimeoutError(TimeoutError):
    """``wait`` gave up before the task reached a final state; the task itself goes on."""

    def __init__(self, task_id: str, timeout_s: float, last: TaskView) -> None:
        super().__init__(f"task {task_id} is still {last.status.value} after {timeout_s:g} s")
        self.task_id = task_id
        self.last = last


# ---------------------------------------------------------------- requests


def new_idempotency_key() -> str:
    """The key a schedule gets when the caller gives none: random, so it only
    de-duplicates the retries of this one call."""
    return str(uuid.uuid4())


def schedule_request(
    type: str,
    payload: bytes = b"",
    *,
    namespace: str,
    run_at: dt.datetime | None = None,
    delay: dt.timedelta | None = None,
    priority: int | None = None,
    retry_policy: RetryPolicy | None = None,
    timeouts: Timeouts | None = None,
    lease_duration: dt.timedelta | None = None,
    idempotency_key: str | None = None,
) -> pb.ScheduleTaskRequest:
    """The ScheduleTaskRequest for these options, built once so every retry sends the same bytes.

    The server recognises a retry by key *and* by the request's content, so a
    relative ``delay`` is sent as given (not turned into a time here, which
    would differ between attempts). Local mistakes raise ``ValueError``
    before any call; bounds are the server's to check (``InvalidArgumentError``).
    """
    if run_at is not None and delay is not None:
        raise ValueError("give run_at or delay, not both")
    spec = pb.TaskSpec(namespace=namespace, type=type, payload=payload)
    if run_at is not None:
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            # A naive datetime is read as local time by some code and UTC by other: refuse to guess.
            raise ValueError("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        spec.run_at.FromDatetime(run_at)
    elif delay is not None:
        spec.delay.FromTimedelta(delay)
    if priority is not None:
        spec.priority, spec.has_priority = priority, True
    if retry_policy is not None:
        spec.retry_policy.CopyFrom(retry_policy.to_pb())
    if timeouts is not None:
        spec.timeouts.CopyFrom(timeouts.to_pb())
    if lease_duration is not None:
        spec.lease_duration.FromTimedelta(lease_duration)
    key = new_idempotency_key() if idempotency_key is None else idempotency_key
    return pb.ScheduleTaskRequest(task=spec, idempotency_key=key)


def list_request(namespace: str, status: TaskStatus | None, page_size: int, page_token: str) -> pb.ListTasksRequest:
    return pb.ListTasksRequest(
        namespace=namespace,
        status=pb.TaskStatus.Value(status.value) if status is not None else pb.TASK_STATUS_UNSPECIFIED,
        page_size=page_size,
        page_token=page_token,
    )


def _seconds(value: float | dt.timedelta | None) -> float | None:
    return value.total_seconds() if isinstance(value, dt.timedelta) else value


def _wait_intervals() -> Iterator[float]:
    """50 ms, 100 ms, 200 ms, ... at most 1 s: quick answers for short tasks, few polls for long ones."""
    intervals = backoff.expo(base=2, factor=WAIT_FIRST_INTERVAL_S, max_value=WAIT_MAX_INTERVAL_S)
    next(intervals)  # backoff's generators start with a bare yield (primed by .send)
    return intervals


def _log_retry(details: Any) -> None:
    error = details.get("exception")
    log.info("retrying %s after %s (try %d, waiting %.2f s)", details["target"].__name__,
             _code_of(error) if error else "?", details["tries"], details["wait"])  # fmt: skip


@dataclass
class _Tries:
    """How many attempts a call made (a cancel needs to know whether it was retried)."""

    count: int = 0


def _resolve(target: str | None, token: str | None, config: Config | None) -> tuple[str, Config, str | None]:
    cfg = Config.from_env() if config is None else config
    return target or cfg.task_service_target, cfg, token


# ---------------------------------------------------------------- blocking client


class Client:
    """A blocking TaskService client. Thread-safe (gRPC channels are); close it, or use ``with``.

    ``target`` (host:port), ``token`` and TLS come from ``config``
    (default ``Config.from_env()``, as the CLI), ``target``/``token`` override it.
    ``namespace`` is the default for ``schedule`` and ``list``.
    ``channel`` is for callers that build their own (it is then not closed by ``close``).
    """

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        config: Config | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        call_retry: CallRetry = CallRetry(),
        channel: grpc.Channel | None = None,
    ) -> None:
        target, cfg, token = _resolve(target, token, config)
        self.target = target
        self.namespace = namespace
        self.call_retry = call_retry
        self._owns_channel = channel is None
        self._channel = sync_channel(target, cfg, token=token) if channel is None else channel
        self._stub = pb_grpc.TaskServiceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, deadline: float | None = None, tries: _Tries | None = None) -> T:
        """``method(request)`` with the retries of ``call_retry``, none past the monotonic
        ``deadline``; a refusal becomes a ``ClientError``. ``tries`` counts the attempts."""
        retry = self.call_retry
        tries = _Tries() if tries is None else tries

        def attempt() -> T:
            tries.count += 1
            return method(request, timeout=retry.attempt_timeout_s(deadline))

        attempt.__name__ = type(request).__name__.removesuffix("Request")
        retrying = backoff.on_exception(
            backoff.expo, grpc.RpcError, giveup=retry.gives_up_on, max_time=retry.budget_s(deadline),
            factor=retry.initial_backoff.total_seconds(), max_value=retry.max_backoff.total_seconds(),
            jitter=backoff.full_jitter, on_backoff=_log_retry, logger=None,
        )(attempt)  # fmt: skip
        try:
            return retrying()
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def schedule(
        self,
        type: str,
        payload: bytes = b"",
        *,
        namespace: str | None = None,
        run_at: dt.datetime | None = None,
        delay: dt.timedelta | None = None,
        priority: int | None = None,
        retry_policy: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        lease_duration: dt.timedelta | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Schedule a task of ``type``; returns its id.

        Runs now unless ``run_at`` (timezone-aware) or ``delay`` says later.
        ``priority`` 0..9, higher first (server default 5). ``lease_duration``:
        how long a worker holds it between heartbeats (server default 30 s).
        Without ``idempotency_key`` a random one is generated for this call;
        the same key with the same request returns the same id, with another
        request raises ``AlreadyExistsError``.
        """
        request = schedule_request(
            type, payload, namespace=namespace or self.namespace, run_at=run_at, delay=delay, priority=priority,
            retry_policy=retry_policy, timeouts=timeouts, lease_duration=lease_duration, idempotency_key=idempotency_key,
        )  # fmt: skip
        reply: pb.ScheduleTaskResponse = self._call(self._stub.ScheduleTask, request)
        return str(reply.task_id)

    def poll(self, task_id: str) -> TaskView:
        """The task's current state (status, attempt, progress, result, error, ...)."""
        reply: pb.PollTaskResponse = self._call(self._stub.PollTask, pb.PollTaskRequest(task_id=task_id))
        return TaskView.from_pb(reply.task)

    def _poll_before(self, task_id: str, deadline: float | None) -> TaskView:
        reply: pb.PollTaskResponse = self._call(self._stub.PollTask, pb.PollTaskRequest(task_id=task_id), deadline)
        return TaskView.from_pb(reply.task)

    def wait(self, task_id: str, timeout: float | dt.timedelta | None = None) -> TaskView:
        """Poll until the task is SUCCEEDED, FAILED or CANCELLED and return that final state.

        There is no watch RPC: this polls at once, then after 50 ms, doubling
        to at most 1 s between polls. ``timeout`` (seconds or a timedelta;
        ``None`` waits as long as it takes) bounds the whole wait, retries
        included; past it ``WaitTimeoutError`` (a ``TimeoutError``) carries
        the last state seen. A FAILED or CANCELLED task is returned, not raised:
        look at ``status``.
        """
        timeout_s = _seconds(timeout)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        intervals = _wait_intervals()
        while True:
            view = self._poll_before(task_id, deadline)
            if view.terminal:
                return view
            pause = next(intervals)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeoutError(task_id, timeout_s or 0.0, view)
                pause = min(pause, remaining)
            time.sleep(pause)

    def cancel(self, task_id: str) -> TaskView:
        """Cancel the task: CANCELLED at once when it was not running; a running
        one comes back RUNNING with ``cancel_requested`` until its worker stops it
        (``wait`` for the final state). A finished task raises ``FailedPreconditionError``.

        A retried cancel whose first attempt took effect but whose answer was
        lost finds the task already CANCELLED: that is returned, not raised.
        """
        tries = _Tries()
        try:
            reply: pb.CancelTaskResponse = self._call(self._stub.CancelTask, pb.CancelTaskRequest(task_id=task_id), tries=tries)
        except FailedPreconditionError:
            if tries.count > 1 and (view := self.poll(task_id)).status is TaskStatus.CANCELLED:
                return view
            raise
        return TaskView.from_pb(reply.task)

    def list(self, namespace: str | None = None, status: TaskStatus | None = None, page_size: int = 100) -> Iterator[TaskView]:
        """Every task of ``namespace`` (default: the client's), newest first,
        optionally only those in ``status``; pages are fetched as you iterate."""
        token = ""
        while True:
            request = list_request(namespace or self.namespace, status, page_size, token)
            reply: pb.ListTasksResponse = self._call(self._stub.ListTasks, request)
            for view in reply.tasks:
                yield TaskView.from_pb(view)
            token = reply.next_page_token
            if not token:
                return


# ---------------------------------------------------------------- asyncio client


class AsyncClient:
    """The asyncio twin of ``Client``: same arguments, same methods, awaited.

    Create it inside a running event loop (gRPC's aio channel belongs to the
    loop); ``async with AsyncClient() as client:`` closes the channel.
    """

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        config: Config | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        call_retry: CallRetry = CallRetry(),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        target, cfg, token = _resolve(target, token, config)
        self.target = target
        self.namespace = namespace
        self.call_retry = call_retry
        self._owns_channel = channel is None
        self._channel = aio_channel(target, cfg, token=token) if channel is None else channel
        self._stub = pb_grpc.TaskServiceStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, deadline: float | None = None, tries: _Tries | None = None
    ) -> T:
        retry = self.call_retry
        tries = _Tries() if tries is None else tries

        async def attempt() -> T:
            tries.count += 1
            return await method(request, timeout=retry.attempt_timeout_s(deadline))

        attempt.__name__ = type(request).__name__.removesuffix("Request")
        retrying = backoff.on_exception(
            backoff.expo, grpc.RpcError, giveup=retry.gives_up_on, max_time=retry.budget_s(deadline),
            factor=retry.initial_backoff.total_seconds(), max_value=retry.max_backoff.total_seconds(),
            jitter=backoff.full_jitter, on_backoff=_log_retry, logger=None,
        )(attempt)  # fmt: skip
        try:
            return await retrying()
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    async def schedule(
        self,
        type: str,
        payload: bytes = b"",
        *,
        namespace: str | None = None,
        run_at: dt.datetime | None = None,
        delay: dt.timedelta | None = None,
        priority: int | None = None,
        retry_policy: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        lease_duration: dt.timedelta | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """See ``Client.schedule``."""
        request = schedule_request(
            type, payload, namespace=namespace or self.namespace, run_at=run_at, delay=delay, priority=priority,
            retry_policy=retry_policy, timeouts=timeouts, lease_duration=lease_duration, idempotency_key=idempotency_key,
        )  # fmt: skip
        reply: pb.ScheduleTaskResponse = await self._call(self._stub.ScheduleTask, request)
        return str(reply.task_id)

    async def poll(self, task_id: str) -> TaskView:
        """See ``Client.poll``."""
        return await self._poll_before(task_id, None)

    async def _poll_before(self, task_id: str, deadline: float | None) -> TaskView:
        reply: pb.PollTaskResponse = await self._call(self._stub.PollTask, pb.PollTaskRequest(task_id=task_id), deadline)
        return TaskView.from_pb(reply.task)

    async def wait(self, task_id: str, timeout: float | dt.timedelta | None = None) -> TaskView:
        """See ``Client.wait`` (the same polling schedule, with ``asyncio.sleep``)."""
        timeout_s = _seconds(timeout)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        intervals = _wait_intervals()
        while True:
            view = await self._poll_before(task_id, deadline)
            if view.terminal:
                return view
            pause = next(intervals)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeoutError(task_id, timeout_s or 0.0, view)
                pause = min(pause, remaining)
            await asyncio.sleep(pause)

    async def cancel(self, task_id: str) -> TaskView:
        """See ``Client.cancel``."""
        tries = _Tries()
        try:
            reply: pb.CancelTaskResponse = await self._call(
                self._stub.CancelTask, pb.CancelTaskRequest(task_id=task_id), tries=tries
            )
        except FailedPreconditionError:
            if tries.count > 1 and (view := await self.poll(task_id)).status is TaskStatus.CANCELLED:
                return view
            raise
        return TaskView.from_pb(reply.task)

    async def list(
        self, namespace: str | None = None, status: TaskStatus | None = None, page_size: int = 100
    ) -> AsyncIterator[TaskView]:
        """See ``Client.list``: ``async for task in client.list(...)``."""
        token = ""
        while True:
            request = list_request(namespace or self.namespace, status, page_size, token)
            reply: pb.ListTasksResponse = await self._call(self._stub.ListTasks, request)
            for view in reply.tasks:
                yield TaskView.from_pb(view)
            token = reply.next_page_token
            if not token:
                return
