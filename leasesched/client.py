"""The Python client for TaskService and ScheduleService: schedule, poll, wait for,
cancel and list tasks, and manage periodic schedules that create tasks.

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
* **Schedules** (``create_schedule`` ... ``backfill_schedule``, served at the
  TaskService address) are retried the same way, except ``trigger_schedule``:
  every trigger is a new run, so it is retried only after an answer that
  proves it did nothing (see its docstring).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import backoff
import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from leasesched import limits
from leasesched.concurrency import LimitScope
from leasesched.config import Config
from leasesched.history import AttemptOutcome, HistoryKind, Operation
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
    "LimitInfo",
    "LimitScope",
    "NewTask",
    "NotFoundError",
    "Overlap",
    "PermissionDeniedError",
    "Progress",
    "RetryPolicy",
    "ScheduleDefinition",
    "ScheduleResult",
    "ScheduleRun",
    "ScheduleView",
    "SkippedSlots",
    "TaskStatus",
    "TaskView",
    "Timeouts",
    "TriggerResult",
    "UnauthenticatedError",
    "UnavailableError",
    "WaitTimeoutError",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Answers after which a call may simply go again: the server is gone or going
# (SERVER_GONE_CODES) or shed the call before doing any work (RESOURCE_EXHAUSTED).
RETRYABLE_CODES = SERVER_GONE_CODES | {grpc.StatusCode.RESOURCE_EXHAUSTED}
# Answers that prove the call did nothing: the server shed it before any work.
SHED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})

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
    # Its fair-share group ("" = none): see ``Client.schedule``.
    concurrency_key: str = ""
    gate: str = ""  # the gate it waits for before each start ("" = none; docs/gates.md)
    # SCHEDULED and held: why. Its gate (paused, closed until ..., no such gate) and, once due,
    # a full concurrency limit ("concurrency limit ns/key=k is full (5 of 5 running)"); "" otherwise.
    waiting_reason: str = ""
    # How many of its leases expired unreported; stuck: at least the server's stuck_lease_losses (default 3).
    lease_losses: int = 0
    stuck: bool = False
    # Changes with every change of the task's state, never with a heartbeat; the
    # operator actions (``Client.retry_task``, ...) are conditional on it.
    version: str = ""

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
            concurrency_key=view.concurrency_key,
            gate=view.gate,
            waiting_reason=view.waiting_reason,
            lease_losses=view.lease_losses,
            stuck=view.stuck,
            version=view.version,
        )


@dataclass(frozen=True)
class HistoryLine:
    """One entry of a task's history (GetTaskHistory; ``leasesched.history``).

    An ATTEMPT (``kind``) has ``attempt``, ``lease_token``, ``worker_id``,
    ``started_at`` (its claim), ``ended_at`` (None while it runs),
    ``outcome``, ``error_type`` / ``error`` and its last ``progress``. An
    OPERATION has ``operation``, ``operator``, ``reason`` and ``started_at``
    (when it was done)."""

    kind: HistoryKind
    started_at: dt.datetime | None
    attempt: int = 0
    lease_token: int = 0
    worker_id: str = ""
    ended_at: dt.datetime | None = None
    outcome: AttemptOutcome | None = None
    error_type: str = ""
    error: str = ""
    progress: Progress = Progress()
    operation: Operation | None = None
    operator: str = ""
    reason: str = ""

    @classmethod
    def from_pb(cls, entry: pb.TaskHistoryEntry) -> "HistoryLine":
        outcome = None if entry.outcome == pb.HISTORY_OUTCOME_UNSPECIFIED else AttemptOutcome(
            pb.HistoryOutcome.Name(entry.outcome).removeprefix("HISTORY_OUTCOME_"))
        operation = None if entry.operation == pb.HISTORY_OPERATION_UNSPECIFIED else Operation(
            pb.HistoryOperation.Name(entry.operation).removeprefix("HISTORY_OPERATION_"))
        kind = HistoryKind.OPERATION if entry.kind == pb.HISTORY_ENTRY_KIND_OPERATION else HistoryKind.ATTEMPT
        return cls(
            kind=kind, started_at=_datetime(entry, "started_at"), attempt=entry.attempt,
            lease_token=entry.lease_token, worker_id=entry.worker_id, ended_at=_datetime(entry, "ended_at"),
            outcome=outcome, error_type=entry.error_type, error=entry.error,
            progress=Progress(percent=entry.progress.percent, message=entry.progress.message),
            operation=operation, operator=entry.operator, reason=entry.reason,
        )  # fmt: skip


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


# ---------------------------------------------------------------- periodic schedules


class Overlap(str, enum.Enum):
    """What a slot does while the schedule's previous run is still going (proto ``OverlapPolicy``).

    The values are the CLI's spellings (``--overlap buffer-one``), so a
    script and a program name a policy the same way.
    """

    SKIP = "skip"  # the slot is skipped and recorded (the default)
    BUFFER_ONE = "buffer-one"  # kept, run when the previous run ends; at most one kept
    BUFFER_ALL = "buffer-all"  # every slot kept, run one after another
    CANCEL_OTHER = "cancel-other"  # the running one is cancelled; the slot runs once it has ended
    ALLOW_ALL = "allow-all"  # the slot runs at once, beside the running one

    def to_pb(self) -> pb.OverlapPolicy:
        value: pb.OverlapPolicy = getattr(pb, f"OVERLAP_{self.name}")
        return value

    @classmethod
    def from_pb(cls, value: int) -> "Overlap":
        """UNSPECIFIED is the schedule's default, SKIP (as the proto says)."""
        if value == pb.OVERLAP_POLICY_UNSPECIFIED:
            return cls.SKIP
        return cls[pb.OverlapPolicy.Name(value).removeprefix("OVERLAP_")]


Seconds = float | dt.timedelta
"""A duration: seconds (a float keeps nanoseconds) or a timedelta."""


@dataclass(frozen=True)
class ScheduleDefinition:
    """Everything a schedule is made of (proto ``Schedule`` without its name): when it
    fires (``cron`` or ``every``), the task each slot creates, and the policy.

    ``None`` and empty values leave a field to the server's default (UTC, no
    start or end, no jitter, overlap SKIP, catch-up window 1 h, no action
    limit). Setting both ``cron`` and ``every`` is the server's to refuse.
    ``paused`` and ``note`` are used by ``create_schedule`` only: an update
    keeps the schedule's pause state (``pause_schedule``/``unpause_schedule``).
    ``remaining_actions`` limits the schedule to that many more tasks
    (manual triggers count too); ``None`` is no limit. ``concurrency_key``
    and ``gate`` go on every task of the schedule, as for ``Client.schedule``
    (a gate that does not exist is refused: ``FailedPreconditionError``).
    """

    type: str
    payload: bytes = b""
    cron: Sequence[str] = ()  # 5 fields, or 6 with seconds first; a lone string is one expression
    every: Seconds | None = None
    offset: Seconds | None = None
    time_zone: str = ""  # IANA name, e.g. "Europe/Berlin"; the server's default is UTC
    start_at: dt.datetime | None = None  # timezone-aware
    end_at: dt.datetime | None = None  # timezone-aware
    jitter: Seconds | None = None
    overlap: Overlap | None = None
    catchup_window: Seconds | None = None
    pause_on_failure: bool = False
    paused: bool = False
    note: str = ""
    remaining_actions: int | None = None
    priority: int | None = None
    retry_policy: RetryPolicy | None = None
    timeouts: Timeouts | None = None
    lease_duration: dt.timedelta | None = None
    concurrency_key: str = ""
    gate: str = ""

    def to_pb(self, namespace: str, schedule_id: str) -> pb.Schedule:
        """The proto ``Schedule``; a naive ``start_at``/``end_at`` raises ``ValueError`` before any call."""
        cron = [self.cron] if isinstance(self.cron, str) else list(self.cron)
        spec = pb.ScheduleSpec(cron=cron, time_zone=self.time_zone)
        for name in ("every", "offset", "jitter"):
            value: Seconds | None = getattr(self, name)
            if value is not None:
                getattr(spec, name).CopyFrom(duration_pb(value))
        for name in ("start_at", "end_at"):
            when: dt.datetime | None = getattr(self, name)
            if when is not None:
                getattr(spec, name).FromDatetime(_aware(name, when))
        policy = pb.SchedulePolicy(pause_on_failure=self.pause_on_failure)
        if self.overlap is not None:
            policy.overlap = self.overlap.to_pb()
        if self.catchup_window is not None:
            policy.catchup_window.CopyFrom(duration_pb(self.catchup_window))
        action = task_spec(self.type, self.payload, namespace=namespace, priority=self.priority,
                           retry_policy=self.retry_policy, timeouts=self.timeouts,
                           lease_duration=self.lease_duration, gate=self.gate)  # fmt: skip
        action.concurrency_key = self.concurrency_key
        return pb.Schedule(
            namespace=namespace, schedule_id=schedule_id, spec=spec, action=action, policy=policy,
            paused=self.paused, note=self.note, limited_actions=self.remaining_actions is not None,
            remaining_actions=self.remaining_actions or 0,
        )  # fmt: skip


@dataclass(frozen=True)
class GateView:
    """A gate as GateService shows it (proto ``GateView``; docs/gates.md)."""

    namespace: str
    name: str
    rate: float
    burst: int
    warmup: dt.timedelta
    paused: bool
    state: str  # open, paused or closed
    closed_until: dt.datetime | None  # set while a handler's RateLimited holds it
    tokens_available: float
    version: int
    max_in_flight: int = 0  # its tasks running at once at most; 0 = no cap

    @classmethod
    def from_pb(cls, view: pb.GateView) -> "GateView":
        return cls(
            namespace=view.namespace, name=view.name, rate=view.definition.rate, burst=view.definition.burst,
            warmup=view.definition.warmup.ToTimedelta(), paused=view.paused, state=view.state,
            closed_until=_datetime(view, "closed_until"), tokens_available=view.tokens_available, version=view.version,
            max_in_flight=view.definition.max_in_flight,
        )  # fmt: skip


def gate_ref(namespace: str, name: str) -> pb.GateRef:
    return pb.GateRef(namespace=namespace, name=name)


def gate_request(
    namespace: str, name: str, rate: float, burst: int, warmup: dt.timedelta | None = None, expected_version: int = 0,
    create_or_update: bool = True, max_in_flight: int = 0,
) -> pb.SetGateRequest:
    """The SetGateRequest for these options (the CLI builds the same)."""
    definition = pb.GateDefinition(rate=rate, burst=burst, max_in_flight=max_in_flight)
    if warmup is not None:
        definition.warmup.FromTimedelta(warmup)
    return pb.SetGateRequest(
        gate=gate_ref(namespace, name), definition=definition, expected_version=expected_version,
        create_or_update=create_or_update and expected_version == 0,
    )  # fmt: skip


# ---------------------------------------------------------------- concurrency limits

_SCOPE_TO_PB = {
    LimitScope.NAMESPACE: pb.LIMIT_SCOPE_NAMESPACE,
    LimitScope.TYPE: pb.LIMIT_SCOPE_TYPE,
    LimitScope.KEY: pb.LIMIT_SCOPE_KEY,
}
_SCOPE_FROM_PB = {v: k for k, v in _SCOPE_TO_PB.items()}


@dataclass(frozen=True)
class LimitInfo:
    """A concurrency limit as LimitService shows it (proto ``LimitView``;
    docs/concurrency.md): at most ``max_running`` tasks of the group run at once.
    ``name`` is "" for a namespace limit, the task type for a type limit, the
    concurrency key (or "*", every key without its own) for a key limit."""

    namespace: str
    scope: LimitScope
    name: str
    max_running: int
    version: int
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    # Slots of the group taken now, at most 1 s old (0 from set_limit, and for the default key "*").
    running: int

    @classmethod
    def from_pb(cls, view: pb.LimitView) -> "LimitInfo":
        return cls(
            namespace=view.limit.namespace, scope=_SCOPE_FROM_PB[view.limit.scope], name=view.limit.name,
            max_running=view.max_running, version=view.version, created_at=_datetime(view, "created_at"),
            updated_at=_datetime(view, "updated_at"), running=view.running,
        )  # fmt: skip

    def label(self) -> str:
        """'ns', 'ns/type=export', 'ns/key=*': how the CLI and errors name it."""
        return self.namespace if self.scope == LimitScope.NAMESPACE else f"{self.namespace}/{self.scope.value}={self.name}"


def limit_ref(namespace: str, scope: LimitScope, name: str = "") -> pb.LimitRef:
    if scope not in _SCOPE_TO_PB:
        raise ValueError(f"scope {scope.value!r} is not a limit's (a gate's cap is its definition's max_in_flight)")
    return pb.LimitRef(namespace=namespace, scope=_SCOPE_TO_PB[scope], name=name)


def limit_request(
    namespace: str, scope: LimitScope, name: str, max_running: int, expected_version: int = 0, create_or_update: bool = True
) -> pb.SetLimitRequest:
    """The SetLimitRequest for these options (the CLI builds the same)."""
    return pb.SetLimitRequest(
        limit=limit_ref(namespace, scope, name), max_running=max_running, expected_version=expected_version,
        create_or_update=create_or_update and expected_version == 0,
    )  # fmt: skip


def schedule_ref(namespace: str, schedule_id: str) -> pb.ScheduleRef:
    return pb.ScheduleRef(namespace=namespace, schedule_id=schedule_id)


def format_duration(value: Seconds) -> str:
    """A duration the way the CLI reads one (``1h30m``, ``500ms``, ``2d``), for describe and list.

    Below a millisecond (which no CLI unit spells) it is a bare number of seconds.
    """
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else value
    millis = round(seconds * 1000)
    if seconds == 0:
        return "0s"
    if seconds < 0 or millis == 0 or abs(millis - seconds * 1000) > 1e-6:
        return f"{seconds:g}"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _iso(when: dt.datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def describe_spec(spec: pb.ScheduleSpec) -> str:
    """One line saying when a schedule fires: "cron '30 2 * * *' in Europe/Berlin, jitter 30s"."""
    parts = []
    if spec.cron:
        parts.append(f"cron {', '.join(repr(c) for c in spec.cron)} in {spec.time_zone or 'UTC'}")
    if spec.HasField("every"):
        every = f"every {format_duration(spec.every.ToTimedelta())}"
        if spec.HasField("offset") and spec.offset.ToNanoseconds():
            every += f" offset {format_duration(spec.offset.ToTimedelta())}"
        parts.append(every)
    text = " and ".join(parts) or "no times"
    for label, name in (("from", "start_at"), ("until", "end_at")):
        when = _datetime(spec, name)
        if when is not None:
            text += f", {label} {_iso(when)}"
    if spec.HasField("jitter") and spec.jitter.ToNanoseconds():
        text += f", jitter {format_duration(spec.jitter.ToTimedelta())}"
    return text


def _timedelta(message: Any, name: str) -> dt.timedelta | None:
    return getattr(message, name).ToTimedelta() if message.HasField(name) else None


def _datetimes(stamps: Any) -> tuple[dt.datetime, ...]:
    return tuple(stamp.ToDatetime(tzinfo=dt.timezone.utc) for stamp in stamps)


@dataclass(frozen=True)
class ScheduleRun:
    """One task a schedule created: for slot ``nominal_time``, because of ``cause``
    ("schedule", "catchup", "trigger", "backfill", "buffer"). ``status`` is as
    read when described, ``None`` when the server could not tell."""

    nominal_time: dt.datetime | None
    task_id: str
    status: TaskStatus | None
    fired_at: dt.datetime | None
    cause: str

    @classmethod
    def from_pb(cls, run: pb.ScheduleRun) -> "ScheduleRun":
        status = None if run.status == pb.TASK_STATUS_UNSPECIFIED else _status_from_pb(run.status)
        return cls(_datetime(run, "nominal_time"), run.task_id, status, _datetime(run, "fired_at"), run.cause)


@dataclass(frozen=True)
class SkippedSlots:
    """``count`` slots from ``first`` to ``last`` that created no task, and why
    ("overlap", "buffer_full", "catchup_window", "paused", "no_actions_left")."""

    first: dt.datetime | None
    last: dt.datetime | None
    count: int
    reason: str
    recorded_at: dt.datetime | None

    @classmethod
    def from_pb(cls, skipped: pb.SkippedSlots) -> "SkippedSlots":
        return cls(_datetime(skipped, "first"), _datetime(skipped, "last"), skipped.count, skipped.reason,
                   _datetime(skipped, "recorded_at"))  # fmt: skip


@dataclass(frozen=True)
class ScheduleView:
    """A schedule as DescribeSchedule (and the other schedule calls) show it (proto ``ScheduleDescription``).

    ``spec`` is one readable line (``describe_spec``); the spec's parts are
    fields too. Times are UTC-aware datetimes (``None`` when not set);
    ``remaining_actions`` is ``None`` for a schedule without an action limit.
    ``version`` is what ``update_schedule``/``delete_schedule`` may expect.
    ``recent_runs`` and ``skipped`` are newest first (at most 10 each; ListSchedules
    sends no runs); ``next_fire_times`` are the next 5 slots, none while paused.
    """

    namespace: str
    schedule_id: str
    spec: str
    cron: tuple[str, ...]
    every: dt.timedelta | None
    offset: dt.timedelta | None
    time_zone: str
    start_at: dt.datetime | None
    end_at: dt.datetime | None
    jitter: dt.timedelta | None
    type: str
    priority: int | None
    payload: bytes
    overlap: Overlap
    catchup_window: dt.timedelta | None
    pause_on_failure: bool
    paused: bool
    note: str
    remaining_actions: int | None
    version: int
    next_fire_times: tuple[dt.datetime, ...]
    recent_runs: tuple[ScheduleRun, ...]
    skipped: tuple[SkippedSlots, ...]
    buffered: tuple[dt.datetime, ...]
    fired_total: int
    skipped_total: int
    backfills_pending: int
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    concurrency_key: str = ""  # every run's ("" = none)
    gate: str = ""  # every run's ("" = none)

    @classmethod
    def from_pb(cls, description: pb.ScheduleDescription) -> "ScheduleView":
        schedule, spec, action = description.schedule, description.schedule.spec, description.schedule.action
        return cls(
            namespace=schedule.namespace,
            schedule_id=schedule.schedule_id,
            spec=describe_spec(spec),
            cron=tuple(spec.cron),
            every=_timedelta(spec, "every"),
            offset=_timedelta(spec, "offset"),
            time_zone=spec.time_zone or "UTC",
            start_at=_datetime(spec, "start_at"),
            end_at=_datetime(spec, "end_at"),
            jitter=_timedelta(spec, "jitter"),
            type=action.type,
            priority=action.priority if action.has_priority else None,
            payload=bytes(action.payload),
            overlap=Overlap.from_pb(schedule.policy.overlap),
            catchup_window=_timedelta(schedule.policy, "catchup_window"),
            pause_on_failure=schedule.policy.pause_on_failure,
            paused=schedule.paused,
            note=schedule.note,
            remaining_actions=schedule.remaining_actions if schedule.limited_actions else None,
            version=description.version,
            next_fire_times=_datetimes(description.next_fire_times),
            recent_runs=tuple(ScheduleRun.from_pb(run) for run in description.recent_runs),
            skipped=tuple(SkippedSlots.from_pb(s) for s in description.skipped),
            buffered=_datetimes(description.buffered),
            fired_total=description.fired_total,
            skipped_total=description.skipped_total,
            backfills_pending=description.backfills_pending,
            created_at=_datetime(description, "created_at"),
            updated_at=_datetime(description, "updated_at"),
            concurrency_key=action.concurrency_key,
            gate=action.gate,
        )


@dataclass(frozen=True)
class TriggerResult:
    """What ``trigger_schedule`` did: ``task_id`` of the run it started, or empty
    when the overlap policy buffered or skipped it (``outcome`` says which:
    "started", "buffered", "skipped: overlap", ...). ``nominal_time`` is the slot (now)."""

    task_id: str
    outcome: str
    nominal_time: dt.datetime | None

    @property
    def started(self) -> bool:
        return bool(self.task_id)


# ---------------------------------------------------------------- errors


class BulkOperation(str, enum.Enum):
    """An operator action applied by filter (``Client.bulk_operate``)."""

    RETRY = "retry"
    RESUME = "resume"
    MARK_FAILED = "mark-failed"
    TERMINATE = "terminate"

    def to_pb(self) -> pb.BulkOperation:
        return {
            BulkOperation.RETRY: pb.BULK_RETRY,
            BulkOperation.RESUME: pb.BULK_RESUME,
            BulkOperation.MARK_FAILED: pb.BULK_MARK_FAILED,
            BulkOperation.TERMINATE: pb.BULK_TERMINATE,
        }[self]


@dataclass(frozen=True)
class BulkResult:
    """What a bulk operation did: ``matched`` tasks (up to max_count), of which
    ``applied`` changed, ``conflicts`` had changed since they were listed (left
    alone), ``failed`` met another error; ``applied_task_ids``: the first 1000."""

    matched: int
    applied: int
    conflicts: int
    failed: int
    applied_task_ids: tuple[str, ...]
    stopped_at_time_limit: bool = False  # the call's time ran out first: call again for the rest


@dataclass(frozen=True)
class NewTask:
    """One task of ``schedule_many``: the arguments of ``schedule``, as a value.

    ``namespace`` None: the client's. ``idempotency_key`` None: a random one,
    drawn once, so a resent call finds the tasks its first attempt created."""

    type: str
    payload: bytes = b""
    namespace: str | None = None
    run_at: dt.datetime | None = None
    delay: dt.timedelta | None = None
    priority: int | None = None
    retry_policy: RetryPolicy | None = None
    timeouts: Timeouts | None = None
    lease_duration: dt.timedelta | None = None
    idempotency_key: str | None = None
    concurrency_key: str = ""
    gate: str = ""

    def to_pb(self, namespace: str) -> pb.ScheduleTaskRequest:
        """The request for this task (``namespace``: the client's, unless the task names one)."""
        return schedule_request(
            self.type, self.payload, namespace=self.namespace or namespace, run_at=self.run_at, delay=self.delay,
            priority=self.priority, retry_policy=self.retry_policy, timeouts=self.timeouts,
            lease_duration=self.lease_duration, idempotency_key=self.idempotency_key,
            concurrency_key=self.concurrency_key, gate=self.gate,
        )  # fmt: skip


@dataclass(frozen=True)
class ScheduleResult:
    """One task's answer from ``schedule_many``: its id (``created`` False when
    its idempotency key found an existing task), or the status ``code`` and
    ``message`` ScheduleTask would have refused it with (the message names the
    task's place in its call and the field: "tasks[3]: type '' is ...")."""

    task_id: str = ""
    created: bool = False
    run_at: dt.datetime | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def error(self) -> ClientError | None:
        """The typed exception ``schedule`` would have raised for this task; None when scheduled."""
        return None if self.ok else _ERROR_CLASSES.get(self.code, ClientError)(self.code, self.message)

    @classmethod
    def from_pb(cls, result: pb.ScheduleTaskResult) -> "ScheduleResult":
        if result.WhichOneof("result") == "scheduled":
            reply = result.scheduled
            return cls(reply.task_id, reply.created, _datetime(reply, "run_at"))
        code = _STATUS_BY_NUMBER.get(result.error.code, grpc.StatusCode.UNKNOWN)
        return cls(code=code, message=result.error.message)


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _batches(indexes: Sequence[int]) -> Iterator[Sequence[int]]:
    """``indexes`` in calls of at most the server's ScheduleTasks limit (500)."""
    size = int(limits.SCHEDULE_BATCH.high)
    for start in range(0, len(indexes), size):
        yield indexes[start : start + size]


def _retry_pauses(retry: CallRetry) -> Iterator[float]:
    """The pauses before sending again the tasks of ``schedule_many`` that met
    a retryable answer (their quota, an outage): as ``CallRetry`` paces a call."""
    step, cap = retry.initial_backoff.total_seconds(), retry.max_backoff.total_seconds()
    while True:
        yield random.uniform(0, step)
        step = min(step * 2, cap)


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
    """No such task or schedule (or one of another namespace, which looks the same)."""


class AlreadyExistsError(ClientError):
    """The idempotency key was already used for a different request in this namespace,
    or a schedule with this id exists."""


class FailedPreconditionError(ClientError):
    """The task's state does not allow the call (e.g. cancelling a finished task), or a
    schedule is no longer at the ``expected_version`` an update or delete named."""


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


def duration_pb(value: float | dt.timedelta) -> Duration:
    """A proto Duration from seconds or a timedelta: seconds keep nanosecond precision
    (a float through timedelta would be cut to microseconds)."""
    duration = Duration()
    if isinstance(value, dt.timedelta):
        duration.FromTimedelta(value)
    else:
        duration.FromNanoseconds(round(value * 1e9))
    return duration


def _aware(name: str, when: dt.datetime) -> dt.datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        # A naive datetime is read as local time by some code and UTC by other: refuse to guess.
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return when


def task_spec(
    type: str,
    payload: bytes = b"",
    *,
    namespace: str,
    priority: int | None = None,
    retry_policy: RetryPolicy | None = None,
    timeouts: Timeouts | None = None,
    lease_duration: dt.timedelta | None = None,
    gate: str = "",
) -> pb.TaskSpec:
    """The TaskSpec of a task without its time: what a task and a schedule's action share."""
    spec = pb.TaskSpec(namespace=namespace, type=type, payload=payload, gate=gate)
    if priority is not None:
        spec.priority, spec.has_priority = priority, True
    if retry_policy is not None:
        spec.retry_policy.CopyFrom(retry_policy.to_pb())
    if timeouts is not None:
        spec.timeouts.CopyFrom(timeouts.to_pb())
    if lease_duration is not None:
        spec.lease_duration.FromTimedelta(lease_duration)
    return spec


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
    concurrency_key: str = "",
    gate: str = "",
) -> pb.ScheduleTaskRequest:
    """The ScheduleTaskRequest for these options, built once so every retry sends the same bytes.

    The server recognises a retry by key *and* by the request's content, so a
    relative ``delay`` is sent as given (not turned into a time here, which
    would differ between attempts). Local mistakes raise ``ValueError``
    before any call; bounds are the server's to check (``InvalidArgumentError``).
    """
    if run_at is not None and delay is not None:
        raise ValueError("give run_at or delay, not both")
    spec = task_spec(type, payload, namespace=namespace, priority=priority, retry_policy=retry_policy,
                     timeouts=timeouts, lease_duration=lease_duration, gate=gate)  # fmt: skip
    spec.concurrency_key = concurrency_key
    if run_at is not None:
        spec.run_at.FromDatetime(_aware("run_at", run_at))
    elif delay is not None:
        spec.delay.FromTimedelta(delay)
    key = new_idempotency_key() if idempotency_key is None else idempotency_key
    return pb.ScheduleTaskRequest(task=spec, idempotency_key=key)


def list_request(
    namespace: str,
    status: TaskStatus | None,
    page_size: int,
    page_token: str,
    type: str | None = None,
    created_after: dt.datetime | None = None,
    created_before: dt.datetime | None = None,
) -> pb.ListTasksRequest:
    request = pb.ListTasksRequest(
        namespace=namespace,
        status=pb.TaskStatus.Value(status.value) if status is not None else pb.TASK_STATUS_UNSPECIFIED,
        page_size=page_size,
        page_token=page_token,
        type=type or "",
    )
    if created_after is not None:
        request.created_after.FromDatetime(_aware("created_after", created_after))
    if created_before is not None:
        request.created_before.FromDatetime(_aware("created_before", created_before))
    return request


def count_request(namespace: str, status: TaskStatus | None, type: str | None) -> pb.CountTasksRequest:
    return pb.CountTasksRequest(
        namespace=namespace,
        status=pb.TaskStatus.Value(status.value) if status is not None else pb.TASK_STATUS_UNSPECIFIED,
        type=type or "",
    )


@dataclass(frozen=True)
class TaskCount:
    """One row of ``Client.count``: how many tasks of ``type`` are in ``status``."""

    type: str
    status: TaskStatus
    count: int


@dataclass(frozen=True)
class TaskCounts:
    """What ``Client.count`` answers (proto ``CountTasksResponse``).

    ``exact``: every count is complete for what ``method`` covers; False: the
    server's bound of rows read was reached and they are lower bounds.
    ``method``: "FAILED_INDEX" (FAILED only: every FAILED task, from the
    dead-letter index) or "RECENT_SCAN" (other statuses: the tasks of the last
    ``list_days`` days, scanned newest first)."""

    rows: tuple[TaskCount, ...]
    exact: bool
    method: str
    scanned: int

    @classmethod
    def from_pb(cls, reply: pb.CountTasksResponse) -> "TaskCounts":
        return cls(
            rows=tuple(TaskCount(r.type, TaskStatus(pb.TaskStatus.Name(r.status)), r.count) for r in reply.rows),
            exact=reply.exact,
            method=pb.CountMethod.Name(reply.method),
            scanned=reply.scanned,
        )

    def by_type(self) -> dict[str, int]:
        """Count per type (summed over statuses)."""
        totals: dict[str, int] = {}
        for row in self.rows:
            totals[row.type] = totals.get(row.type, 0) + row.count
        return totals


def trigger_request(namespace: str, schedule_id: str, overlap: Overlap | None = None) -> pb.TriggerScheduleRequest:
    request = pb.TriggerScheduleRequest(ref=schedule_ref(namespace, schedule_id))
    if overlap is not None:
        request.overlap = overlap.to_pb()
    return request


def backfill_request(
    namespace: str, schedule_id: str, start_at: dt.datetime, end_at: dt.datetime, overlap: Overlap | None = None
) -> pb.BackfillScheduleRequest:
    """The slots of the schedule's spec in [start_at, end_at] (both timezone-aware)."""
    request = pb.BackfillScheduleRequest(ref=schedule_ref(namespace, schedule_id))
    request.start_at.FromDatetime(_aware("start_at", start_at))
    request.end_at.FromDatetime(_aware("end_at", end_at))
    if overlap is not None:
        request.overlap = overlap.to_pb()
    return request


def list_schedules_request(namespace: str, page_size: int, page_token: str) -> pb.ListSchedulesRequest:
    return pb.ListSchedulesRequest(namespace=namespace, page_size=page_size, page_token=page_token)


def _same_definition(current: pb.Schedule, sent: pb.Schedule) -> bool:
    """Whether the schedule the server has is the one an update sent (what the update replaces)."""
    fields = ("spec", "action", "policy", "limited_actions", "remaining_actions")
    return all(getattr(current, name) == getattr(sent, name) for name in fields)


def _trigger_retry(retry: CallRetry) -> CallRetry:
    """A trigger goes again only after an answer that proves it did nothing (a shed call).

    Every trigger is a new run whose slot is *now*, so a second attempt after
    one whose outcome is unknown (UNAVAILABLE or CANCELLED from a server going
    away mid-call, DEADLINE_EXCEEDED) could start a second run.
    """
    return dataclasses.replace(retry, codes=retry.codes & SHED_CODES)


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
        self._schedules = pb_grpc.ScheduleServiceStub(self._channel)  # served at the same address
        self._gates = pb_grpc.GateServiceStub(self._channel)  # served at the same address
        self._limits = pb_grpc.LimitServiceStub(self._channel)  # served at the same address
        self._operators = pb_grpc.OperatorServiceStub(self._channel)  # served at the same address

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        deadline: float | None = None,
        tries: _Tries | None = None,
        retry: CallRetry | None = None,
    ) -> T:
        """``method(request)`` with the retries of ``retry`` (default ``call_retry``), none past
        the monotonic ``deadline``; a refusal becomes a ``ClientError``. ``tries`` counts the attempts."""
        retry = self.call_retry if retry is None else retry
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
        concurrency_key: str = "",
        gate: str | None = None,
    ) -> str:
        """Schedule a task of ``type``; returns its id.

        Runs now unless ``run_at`` (timezone-aware) or ``delay`` says later.
        ``priority`` 0..9, higher first (server default 5). ``lease_duration``:
        how long a worker holds it between heartbeats (server default 30 s).
        Without ``idempotency_key`` a random one is generated for this call;
        the same key with the same request returns the same id, with another
        request raises ``AlreadyExistsError``. ``concurrency_key`` (e.g. a
        partner id; empty = none) puts the task in a fair-share group: due
        tasks of one priority are handed out round robin across groups, so a
        flood under one key does not delay the others.
        """
        request = schedule_request(
            type, payload, namespace=namespace or self.namespace, run_at=run_at, delay=delay, priority=priority,
            retry_policy=retry_policy, timeouts=timeouts, lease_duration=lease_duration, idempotency_key=idempotency_key,
            concurrency_key=concurrency_key,
            gate=gate or "",
        )  # fmt: skip
        reply: pb.ScheduleTaskResponse = self._call(self._stub.ScheduleTask, request)
        return str(reply.task_id)

    def schedule_many(self, tasks: Sequence[NewTask]) -> list[ScheduleResult]:
        """Schedule many tasks in few calls (ScheduleTasks, up to 500 tasks a
        call); one result per task, in order: its id, or why it was refused.

        Each task is independent, as if scheduled alone: a refused task does
        not stop the others, and nothing is raised for it (look at ``ok``,
        ``code``, ``message``, or raise ``error``). Every task carries an
        idempotency key (drawn once when ``NewTask`` has none), so whole calls
        that meet a server going away are sent again, and so are the tasks
        that got a retryable answer (over the namespace's quota, UNAVAILABLE),
        within ``call_retry``'s budget; a task's last answer is its result. A
        call refused whole (bad token, a store that stays down) raises its
        ``ClientError``."""
        requests = [task.to_pb(self.namespace) for task in tasks]
        results = [ScheduleResult(code=grpc.StatusCode.UNKNOWN)] * len(requests)
        pending: Sequence[int] = range(len(requests))
        deadline, pauses = time.monotonic() + self.call_retry.max_elapsed.total_seconds(), _retry_pauses(self.call_retry)
        while True:
            for batch in _batches(pending):
                call = pb.ScheduleTasksRequest(tasks=[requests[i] for i in batch])
                reply: pb.ScheduleTasksResponse = self._call(self._stub.ScheduleTasks, call, deadline)
                for index, result in zip(batch, reply.results):
                    results[index] = ScheduleResult.from_pb(result)
            pending = [i for i in pending if results[i].code in self.call_retry.codes]
            pause = next(pauses)
            if not pending or time.monotonic() + pause >= deadline:
                return results
            time.sleep(pause)

    def poll(self, task_id: str, *, include_payload: bool = False) -> TaskView:
        """The task's current state (status, attempt, progress, result, error, ...);
        ``include_payload``: its payload too (client and admin tokens only)."""
        request = pb.PollTaskRequest(task_id=task_id, include_payload=include_payload)
        reply: pb.PollTaskResponse = self._call(self._stub.PollTask, request)
        return TaskView.from_pb(reply.task)

    def history(self, task_id: str, limit: int = 0) -> list[HistoryLine]:
        """The task's history, newest first: one line per attempt (worker,
        lease token, claim and end, outcome, error, last progress) and per
        operator action. At most ``limit`` lines, and never more than the
        server's ``history_max_entries`` (0: that bound)."""
        request = pb.GetTaskHistoryRequest(task_id=task_id, limit=limit)
        reply: pb.GetTaskHistoryResponse = self._call(self._stub.GetTaskHistory, request)
        return [HistoryLine.from_pb(e) for e in reply.entries]

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

    def list(
        self,
        namespace: str | None = None,
        status: TaskStatus | None = None,
        page_size: int = 100,
        *,
        type: str | None = None,
        created_after: dt.datetime | None = None,
        created_before: dt.datetime | None = None,
    ) -> Iterator[TaskView]:
        """Every task of ``namespace`` (default: the client's), newest first,
        optionally only those in ``status``, of ``type``, created in
        [``created_after``, ``created_before``) (aware datetimes); pages are
        fetched as you iterate (with a status or type filter a page may be
        short or empty: the server bounds the rows one call examines)."""
        token = ""
        while True:
            request = list_request(namespace or self.namespace, status, page_size, token, type, created_after, created_before)
            reply: pb.ListTasksResponse = self._call(self._stub.ListTasks, request)
            for view in reply.tasks:
                yield TaskView.from_pb(view)
            token = reply.next_page_token
            if not token:
                return

    def list_page(
        self,
        namespace: str | None = None,
        status: TaskStatus | None = None,
        page_size: int = 100,
        page_token: str = "",
        *,
        type: str | None = None,
        created_after: dt.datetime | None = None,
    ) -> tuple[tuple[TaskView, ...], str]:
        """One page of ``list`` (same filters): the tasks and the token of the next page
        ("" after the last). For callers that page for a person (the dashboard's Next link)."""
        request = list_request(namespace or self.namespace, status, page_size, page_token, type, created_after)
        reply: pb.ListTasksResponse = self._call(self._stub.ListTasks, request)
        return tuple(TaskView.from_pb(view) for view in reply.tasks), reply.next_page_token

    def count(
        self, status: TaskStatus | None = None, type: str | None = None, *, namespace: str | None = None
    ) -> TaskCounts:
        """Tasks per (type, status): ``count(TaskStatus.FAILED)`` counts the
        dead letters per type, exactly (see ``TaskCounts``)."""
        reply: pb.CountTasksResponse = self._call(self._stub.CountTasks, count_request(namespace or self.namespace, status, type))
        return TaskCounts.from_pb(reply)


    # ------------------------------------------------------------ operator actions (docs/operations.md)
    #
    # Each needs an operator (or admin) token and the task's current version
    # (``TaskView.version``, as ``poll`` shows it): a stale one raises
    # ``FailedPreconditionError`` naming the current version, with nothing
    # changed. ``reason`` (1..500 characters) goes to the task's history. A
    # call retried after a lost answer whose first attempt applied also gets
    # ``FailedPreconditionError`` (the version moved): ``poll`` to see.

    def retry_task(
        self,
        task_id: str,
        expected_version: str,
        reason: str,
        *,
        run_at: dt.datetime | None = None,
        payload: bytes | None = None,
    ) -> TaskView:
        """A FAILED or CANCELLED task runs again from attempt 1 (its own retry
        budget afresh), at ``run_at`` (timezone-aware; default now), with
        ``payload`` instead of its own when given."""
        request = pb.RetryTaskRequest(task_id=task_id, expected_version=expected_version, reason=reason)
        if run_at is not None:
            request.run_at.FromDatetime(_aware("run_at", run_at))
        if payload is not None:
            request.payload, request.has_payload = payload, True
        reply: pb.RetryTaskResponse = self._call(self._operators.RetryTask, request)
        return TaskView.from_pb(reply.task)

    def resume_task(self, task_id: str, expected_version: str, reason: str) -> TaskView:
        """A task waiting for its retry backoff is due now (the same attempt)."""
        request = pb.ResumeTaskRequest(task_id=task_id, expected_version=expected_version, reason=reason)
        reply: pb.ResumeTaskResponse = self._call(self._operators.ResumeTask, request)
        return TaskView.from_pb(reply.task)

    def mark_task_failed(self, task_id: str, expected_version: str, reason: str) -> TaskView:
        """A SCHEDULED task (one waiting to be retried, typically) stops: FAILED, error type "MarkedFailed"."""
        request = pb.MarkTaskFailedRequest(task_id=task_id, expected_version=expected_version, reason=reason)
        reply: pb.MarkTaskFailedResponse = self._call(self._operators.MarkTaskFailed, request)
        return TaskView.from_pb(reply.task)

    def terminate_task(self, task_id: str, expected_version: str, reason: str) -> TaskView:
        """A RUNNING task's lease is revoked now: FAILED ("Terminated"); its worker
        learns it at its next heartbeat and stops the handler (no cooperation needed)."""
        request = pb.TerminateTaskRequest(task_id=task_id, expected_version=expected_version, reason=reason)
        reply: pb.TerminateTaskResponse = self._call(self._operators.TerminateTask, request)
        return TaskView.from_pb(reply.task)

    def bulk_operate(
        self,
        operation: BulkOperation,
        reason: str,
        *,
        max_count: int,
        namespace: str | None = None,
        type: str = "",
        status: TaskStatus | None = None,
        created_after: dt.datetime | None = None,
        created_before: dt.datetime | None = None,
        rate_per_second: float = 0.0,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> BulkResult:
        """``operation`` on every task of ``namespace`` the filter matches, at most
        ``max_count`` (1..10000), at ``rate_per_second`` (0: the server's 50; at
        most 1000). Each task's own current version is its write's condition: a
        task that changed since it was listed is a conflict, left alone. The
        server works within one call and stops before its ``rpc_timeout_s``
        (30 s) or ``timeout``: then ``stopped_at_time_limit`` is set, call again
        for the rest. Not retried (a repeat would act on what the first left)."""
        request = pb.BulkOperateRequest(
            operation=operation.to_pb(), namespace=namespace or self.namespace, type=type, max_count=max_count,
            rate_per_second=rate_per_second, reason=reason, dry_run=dry_run,
        )  # fmt: skip
        if status is not None:
            request.status = pb.TaskStatus.Value(status.value)
        if created_after is not None:
            request.created_after.FromDatetime(_aware("created_after", created_after))
        if created_before is not None:
            request.created_before.FromDatetime(_aware("created_before", created_before))
        seconds = timeout if timeout is not None else 60.0  # past the server's own ceiling: it answers first
        try:
            reply: pb.BulkOperateResponse = self._operators.BulkOperate(request, timeout=seconds)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return BulkResult(reply.matched, reply.applied, reply.conflicts, reply.failed, tuple(reply.applied_task_ids),
                          reply.stopped_at_time_limit)  # fmt: skip

    # ------------------------------------------------------------ gates (docs/gates.md)

    def set_gate(
        self,
        name: str,
        rate: float,
        burst: int,
        *,
        warmup: dt.timedelta | None = None,
        namespace: str | None = None,
        expected_version: int = 0,
        create_or_update: bool = True,
        max_in_flight: int = 0,
    ) -> GateView:
        """Create or change gate ``name``: ``rate`` tasks a second, ``burst`` at once,
        a ramp over ``warmup`` after an unpause or a long idle, at most
        ``max_in_flight`` running at once (0: no cap). Admin token.
        ``expected_version`` (from ``get_gate``): change only that version
        (``FailedPreconditionError`` otherwise); 0 with ``create_or_update``: either.
        Setting the same definition twice is harmless, so the call is retried."""
        request = gate_request(
            namespace or self.namespace, name, rate, burst, warmup, expected_version, create_or_update, max_in_flight
        )
        reply: pb.SetGateResponse = self._call(self._gates.SetGate, request)
        return GateView.from_pb(reply.gate)

    def get_gate(self, name: str, *, namespace: str | None = None) -> GateView:
        """The gate: definition, state (open/paused/closed), tokens available now, version."""
        reply: pb.GetGateResponse = self._call(self._gates.GetGate, pb.GetGateRequest(gate=gate_ref(namespace or self.namespace, name)))
        return GateView.from_pb(reply.gate)

    def list_gates(self, namespace: str | None = None, page_size: int = 100) -> Iterator[GateView]:
        """Every gate of ``namespace`` (default: the client's), by name; pages fetched as you iterate."""
        token = ""
        while True:
            request = pb.ListGatesRequest(namespace=namespace or self.namespace, page_size=page_size, page_token=token)
            reply: pb.ListGatesResponse = self._call(self._gates.ListGates, request)
            for view in reply.gates:
                yield GateView.from_pb(view)
            token = reply.next_page_token
            if not token:
                return

    def pause_gate(self, name: str, *, namespace: str | None = None) -> GateView:
        """No task of the gate starts until ``unpause_gate`` (admin). Idempotent."""
        reply: pb.PauseGateResponse = self._call(self._gates.PauseGate, pb.PauseGateRequest(gate=gate_ref(namespace or self.namespace, name)))
        return GateView.from_pb(reply.gate)

    def unpause_gate(self, name: str, *, namespace: str | None = None) -> GateView:
        """Open the gate again (also one a handler closed), at the warm-up's ramp (admin). Idempotent."""
        reply: pb.UnpauseGateResponse = self._call(self._gates.UnpauseGate, pb.UnpauseGateRequest(gate=gate_ref(namespace or self.namespace, name)))
        return GateView.from_pb(reply.gate)

    def delete_gate(self, name: str, *, namespace: str | None = None, expected_version: int = 0) -> None:
        """Delete the gate (admin); its waiting tasks wait until a gate of that name exists again.
        A retried delete whose first attempt applied finds no gate: that is success."""
        tries = _Tries()
        request = pb.DeleteGateRequest(gate=gate_ref(namespace or self.namespace, name), expected_version=expected_version)
        try:
            self._call(self._gates.DeleteGate, request, tries=tries)
        except NotFoundError:
            if tries.count == 1:
                raise

    # ------------------------------------------------------------ concurrency limits (docs/concurrency.md)

    def set_limit(
        self,
        scope: LimitScope,
        name: str,
        max_running: int,
        *,
        namespace: str | None = None,
        expected_version: int = 0,
        create_or_update: bool = True,
    ) -> LimitInfo:
        """Create or change a limit (admin token): at most ``max_running`` tasks
        of the group run at once. ``name``: "" for ``LimitScope.NAMESPACE``, the
        task type for ``TYPE``, the concurrency key or "*" (every key) for ``KEY``.
        ``expected_version`` (from ``get_limit``): change only that version
        (``FailedPreconditionError`` otherwise); 0 with ``create_or_update``: either.
        Setting the same value twice is harmless, so the call is retried."""
        request = limit_request(namespace or self.namespace, scope, name, max_running, expected_version, create_or_update)
        reply: pb.SetLimitResponse = self._call(self._limits.SetLimit, request)
        return LimitInfo.from_pb(reply.limit)

    def get_limit(self, scope: LimitScope, name: str = "", *, namespace: str | None = None) -> LimitInfo:
        """The limit; ``NotFoundError`` when the group has none."""
        request = pb.GetLimitRequest(limit=limit_ref(namespace or self.namespace, scope, name))
        reply: pb.GetLimitResponse = self._call(self._limits.GetLimit, request)
        return LimitInfo.from_pb(reply.limit)

    def list_limits(self, namespace: str | None = None, *, every_namespace: bool = False, page_size: int = 100) -> Iterator[LimitInfo]:
        """The limits of ``namespace`` (default: the client's), or with
        ``every_namespace`` of all namespaces (admin token); by namespace,
        scope, name; pages fetched as you iterate."""
        listed = "" if every_namespace else namespace or self.namespace
        token = ""
        while True:
            request = pb.ListLimitsRequest(namespace=listed, page_size=page_size, page_token=token)
            reply: pb.ListLimitsResponse = self._call(self._limits.ListLimits, request)
            for view in reply.limits:
                yield LimitInfo.from_pb(view)
            token = reply.next_page_token
            if not token:
                return

    def delete_limit(self, scope: LimitScope, name: str = "", *, namespace: str | None = None, expected_version: int = 0) -> None:
        """Delete the limit (admin): the group's tasks are no longer held by it.
        A retried delete whose first attempt applied finds none: that is success."""
        tries = _Tries()
        request = pb.DeleteLimitRequest(limit=limit_ref(namespace or self.namespace, scope, name), expected_version=expected_version)
        try:
            self._call(self._limits.DeleteLimit, request, tries=tries)
        except NotFoundError:
            if tries.count == 1:
                raise

    # ------------------------------------------------------------ periodic schedules

    def create_schedule(self, schedule_id: str, definition: ScheduleDefinition, *, namespace: str | None = None) -> ScheduleView:
        """Create schedule ``schedule_id`` in ``namespace`` (default: the client's); returns
        its description, next fire times included.

        Retried like every call when the server goes away: a schedule id is
        unique, so a retry can never make a second schedule. If the lost
        attempt did create it, how the retry is answered (the schedule, or
        ``AlreadyExistsError``) is the server's choice; ALREADY_EXISTS and
        FAILED_PRECONDITION are never retried.
        """
        request = pb.CreateScheduleRequest(schedule=definition.to_pb(namespace or self.namespace, schedule_id))
        reply: pb.CreateScheduleResponse = self._call(self._schedules.CreateSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    def update_schedule(
        self, schedule_id: str, definition: ScheduleDefinition, *, namespace: str | None = None, expected_version: int = 0
    ) -> ScheduleView:
        """Replace the schedule's whole definition (spec, action, policy, action limit):
        a field left at its default goes back to the server's default, it is
        not kept. Its pause state and note are kept (``definition.paused`` and
        ``note`` are not sent): use ``pause_schedule``/``unpause_schedule``.

        ``expected_version`` (from ``describe_schedule``; 0 = any): a schedule
        changed since raises ``FailedPreconditionError`` and is not touched.
        A retried update whose first attempt applied meets that refusal (the
        version moved); the client then describes the schedule and returns it
        when it holds exactly what was sent.
        """
        sent = definition.to_pb(namespace or self.namespace, schedule_id)
        request = pb.UpdateScheduleRequest(schedule=sent, expected_version=expected_version)
        tries = _Tries()
        try:
            reply: pb.UpdateScheduleResponse = self._call(self._schedules.UpdateSchedule, request, tries=tries)
        except FailedPreconditionError:
            if tries.count > 1:
                current: pb.DescribeScheduleResponse = self._call(
                    self._schedules.DescribeSchedule, pb.DescribeScheduleRequest(ref=schedule_ref(sent.namespace, schedule_id))
                )
                if _same_definition(current.schedule.schedule, sent):
                    return ScheduleView.from_pb(current.schedule)
            raise
        return ScheduleView.from_pb(reply.schedule)

    def delete_schedule(self, schedule_id: str, *, namespace: str | None = None, expected_version: int = 0) -> None:
        """Delete the schedule (tasks it already created are not touched); ``expected_version``
        as for ``update_schedule``. A retried delete whose first attempt applied finds
        no schedule: that is success, not ``NotFoundError``."""
        ref = schedule_ref(namespace or self.namespace, schedule_id)
        tries = _Tries()
        try:
            self._call(self._schedules.DeleteSchedule, pb.DeleteScheduleRequest(ref=ref, expected_version=expected_version), tries=tries)
        except NotFoundError:
            if tries.count == 1:
                raise

    def describe_schedule(self, schedule_id: str, *, namespace: str | None = None) -> ScheduleView:
        """The schedule with its state, next fire times, recent runs and skipped slots."""
        request = pb.DescribeScheduleRequest(ref=schedule_ref(namespace or self.namespace, schedule_id))
        reply: pb.DescribeScheduleResponse = self._call(self._schedules.DescribeSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    def list_schedules(self, namespace: str | None = None, page_size: int = 100) -> Iterator[ScheduleView]:
        """Every schedule of ``namespace`` (default: the client's); pages are fetched as
        you iterate. The views carry no recent runs (``describe_schedule`` has them)."""
        token = ""
        while True:
            request = list_schedules_request(namespace or self.namespace, page_size, token)
            reply: pb.ListSchedulesResponse = self._call(self._schedules.ListSchedules, request)
            for description in reply.schedules:
                yield ScheduleView.from_pb(description)
            token = reply.next_page_token
            if not token:
                return

    def pause_schedule(self, schedule_id: str, note: str = "", *, namespace: str | None = None) -> ScheduleView:
        """Stop firing (slots while paused are recorded as skipped, reason "paused"); ``note`` says why.
        Pausing a paused schedule is no error, so the call is retried like any other."""
        request = pb.PauseScheduleRequest(ref=schedule_ref(namespace or self.namespace, schedule_id), note=note)
        reply: pb.PauseScheduleResponse = self._call(self._schedules.PauseSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    def unpause_schedule(self, schedule_id: str, note: str = "", *, namespace: str | None = None) -> ScheduleView:
        """Fire again from the next slot on; slots missed while paused are not caught up."""
        request = pb.UnpauseScheduleRequest(ref=schedule_ref(namespace or self.namespace, schedule_id), note=note)
        reply: pb.UnpauseScheduleResponse = self._call(self._schedules.UnpauseSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    def trigger_schedule(self, schedule_id: str, *, namespace: str | None = None, overlap: Overlap | None = None) -> TriggerResult:
        """Run the schedule's action now (a slot at the current time), under its overlap
        policy or ``overlap``; ``TriggerResult.task_id`` is empty when the run was skipped or buffered.

        **Not retried after an unknown outcome.** Each trigger is a new slot
        (now), so a retry after an attempt that may have reached the server
        (UNAVAILABLE or CANCELLED from a server going away, a deadline) could
        start a second run. Only RESOURCE_EXHAUSTED (shed before any work) is
        retried; any other failure raises, and ``describe_schedule`` shows
        whether a run with cause "trigger" was started.
        """
        request = trigger_request(namespace or self.namespace, schedule_id, overlap)
        reply: pb.TriggerScheduleResponse = self._call(self._schedules.TriggerSchedule, request, retry=_trigger_retry(self.call_retry))
        return TriggerResult(reply.task_id, reply.outcome, _datetime(reply, "nominal_time"))

    def backfill_schedule(
        self, schedule_id: str, start_at: dt.datetime, end_at: dt.datetime, *, namespace: str | None = None,
        overlap: Overlap | None = None,
    ) -> int:
        """Run the spec's slots in [start_at, end_at] (timezone-aware), oldest first and paced,
        under the overlap policy or ``overlap``; returns how many slots the range has.
        A slot that already has its task is not run again, so a retried backfill runs nothing twice.
        """  # fmt: skip
        request = backfill_request(namespace or self.namespace, schedule_id, start_at, end_at, overlap)
        reply: pb.BackfillScheduleResponse = self._call(self._schedules.BackfillSchedule, request)
        return int(reply.slots)


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
        self._schedules = pb_grpc.ScheduleServiceStub(self._channel)  # served at the same address

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        deadline: float | None = None,
        tries: _Tries | None = None,
        retry: CallRetry | None = None,
    ) -> T:
        retry = self.call_retry if retry is None else retry
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
        concurrency_key: str = "",
    ) -> str:
        """See ``Client.schedule``."""
        request = schedule_request(
            type, payload, namespace=namespace or self.namespace, run_at=run_at, delay=delay, priority=priority,
            retry_policy=retry_policy, timeouts=timeouts, lease_duration=lease_duration, idempotency_key=idempotency_key,
            concurrency_key=concurrency_key,
        )  # fmt: skip
        reply: pb.ScheduleTaskResponse = await self._call(self._stub.ScheduleTask, request)
        return str(reply.task_id)

    async def schedule_many(self, tasks: Sequence[NewTask]) -> list[ScheduleResult]:
        """See ``Client.schedule_many``."""
        requests = [task.to_pb(self.namespace) for task in tasks]
        results = [ScheduleResult(code=grpc.StatusCode.UNKNOWN)] * len(requests)
        pending: Sequence[int] = range(len(requests))
        deadline, pauses = time.monotonic() + self.call_retry.max_elapsed.total_seconds(), _retry_pauses(self.call_retry)
        while True:
            for batch in _batches(pending):
                call = pb.ScheduleTasksRequest(tasks=[requests[i] for i in batch])
                reply: pb.ScheduleTasksResponse = await self._call(self._stub.ScheduleTasks, call, deadline)
                for index, result in zip(batch, reply.results):
                    results[index] = ScheduleResult.from_pb(result)
            pending = [i for i in pending if results[i].code in self.call_retry.codes]
            pause = next(pauses)
            if not pending or time.monotonic() + pause >= deadline:
                return results
            await asyncio.sleep(pause)

    async def poll(self, task_id: str) -> TaskView:
        """See ``Client.poll``."""
        return await self._poll_before(task_id, None)

    async def history(self, task_id: str, limit: int = 0) -> list[HistoryLine]:
        """See ``Client.history``."""
        request = pb.GetTaskHistoryRequest(task_id=task_id, limit=limit)
        reply: pb.GetTaskHistoryResponse = await self._call(self._stub.GetTaskHistory, request)
        return [HistoryLine.from_pb(e) for e in reply.entries]

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
        self,
        namespace: str | None = None,
        status: TaskStatus | None = None,
        page_size: int = 100,
        *,
        type: str | None = None,
        created_after: dt.datetime | None = None,
        created_before: dt.datetime | None = None,
    ) -> AsyncIterator[TaskView]:
        """See ``Client.list``: ``async for task in client.list(...)``."""
        token = ""
        while True:
            request = list_request(namespace or self.namespace, status, page_size, token, type, created_after, created_before)
            reply: pb.ListTasksResponse = await self._call(self._stub.ListTasks, request)
            for view in reply.tasks:
                yield TaskView.from_pb(view)
            token = reply.next_page_token
            if not token:
                return

    async def count(
        self, status: TaskStatus | None = None, type: str | None = None, *, namespace: str | None = None
    ) -> TaskCounts:
        """See ``Client.count``."""
        request = count_request(namespace or self.namespace, status, type)
        reply: pb.CountTasksResponse = await self._call(self._stub.CountTasks, request)
        return TaskCounts.from_pb(reply)

    # ------------------------------------------------------------ periodic schedules

    async def create_schedule(
        self, schedule_id: str, definition: ScheduleDefinition, *, namespace: str | None = None
    ) -> ScheduleView:
        """See ``Client.create_schedule``."""
        request = pb.CreateScheduleRequest(schedule=definition.to_pb(namespace or self.namespace, schedule_id))
        reply: pb.CreateScheduleResponse = await self._call(self._schedules.CreateSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    async def update_schedule(
        self, schedule_id: str, definition: ScheduleDefinition, *, namespace: str | None = None, expected_version: int = 0
    ) -> ScheduleView:
        """See ``Client.update_schedule`` (replaces the whole definition)."""
        sent = definition.to_pb(namespace or self.namespace, schedule_id)
        request = pb.UpdateScheduleRequest(schedule=sent, expected_version=expected_version)
        tries = _Tries()
        try:
            reply: pb.UpdateScheduleResponse = await self._call(self._schedules.UpdateSchedule, request, tries=tries)
        except FailedPreconditionError:
            if tries.count > 1:
                current: pb.DescribeScheduleResponse = await self._call(
                    self._schedules.DescribeSchedule, pb.DescribeScheduleRequest(ref=schedule_ref(sent.namespace, schedule_id))
                )
                if _same_definition(current.schedule.schedule, sent):
                    return ScheduleView.from_pb(current.schedule)
            raise
        return ScheduleView.from_pb(reply.schedule)

    async def delete_schedule(self, schedule_id: str, *, namespace: str | None = None, expected_version: int = 0) -> None:
        """See ``Client.delete_schedule``."""
        ref = schedule_ref(namespace or self.namespace, schedule_id)
        tries = _Tries()
        try:
            await self._call(
                self._schedules.DeleteSchedule, pb.DeleteScheduleRequest(ref=ref, expected_version=expected_version), tries=tries
            )
        except NotFoundError:
            if tries.count == 1:
                raise

    async def describe_schedule(self, schedule_id: str, *, namespace: str | None = None) -> ScheduleView:
        """See ``Client.describe_schedule``."""
        request = pb.DescribeScheduleRequest(ref=schedule_ref(namespace or self.namespace, schedule_id))
        reply: pb.DescribeScheduleResponse = await self._call(self._schedules.DescribeSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    async def list_schedules(self, namespace: str | None = None, page_size: int = 100) -> AsyncIterator[ScheduleView]:
        """See ``Client.list_schedules``: ``async for view in client.list_schedules()``."""
        token = ""
        while True:
            request = list_schedules_request(namespace or self.namespace, page_size, token)
            reply: pb.ListSchedulesResponse = await self._call(self._schedules.ListSchedules, request)
            for description in reply.schedules:
                yield ScheduleView.from_pb(description)
            token = reply.next_page_token
            if not token:
                return

    async def pause_schedule(self, schedule_id: str, note: str = "", *, namespace: str | None = None) -> ScheduleView:
        """See ``Client.pause_schedule``."""
        request = pb.PauseScheduleRequest(ref=schedule_ref(namespace or self.namespace, schedule_id), note=note)
        reply: pb.PauseScheduleResponse = await self._call(self._schedules.PauseSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    async def unpause_schedule(self, schedule_id: str, note: str = "", *, namespace: str | None = None) -> ScheduleView:
        """See ``Client.unpause_schedule``."""
        request = pb.UnpauseScheduleRequest(ref=schedule_ref(namespace or self.namespace, schedule_id), note=note)
        reply: pb.UnpauseScheduleResponse = await self._call(self._schedules.UnpauseSchedule, request)
        return ScheduleView.from_pb(reply.schedule)

    async def trigger_schedule(
        self, schedule_id: str, *, namespace: str | None = None, overlap: Overlap | None = None
    ) -> TriggerResult:
        """See ``Client.trigger_schedule``: not retried after an unknown outcome (a retry could start a second run)."""
        request = trigger_request(namespace or self.namespace, schedule_id, overlap)
        reply: pb.TriggerScheduleResponse = await self._call(
            self._schedules.TriggerSchedule, request, retry=_trigger_retry(self.call_retry)
        )
        return TriggerResult(reply.task_id, reply.outcome, _datetime(reply, "nominal_time"))

    async def backfill_schedule(
        self, schedule_id: str, start_at: dt.datetime, end_at: dt.datetime, *, namespace: str | None = None,
        overlap: Overlap | None = None,
    ) -> int:
        """See ``Client.backfill_schedule``."""  # fmt: skip
        request = backfill_request(namespace or self.namespace, schedule_id, start_at, end_at, overlap)
        reply: pb.BackfillScheduleResponse = await self._call(self._schedules.BackfillSchedule, request)
        return int(reply.slots)
