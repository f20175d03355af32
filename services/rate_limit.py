"""Per-namespace quotas on every TaskService method, as a server interceptor.

Why: the TaskService's concurrency cap (``task_service_max_concurrent_rpcs``)
is shared by everyone. Without per-namespace quotas one namespace's flood
fills it and every other namespace gets RESOURCE_EXHAUSTED. So each caller
(see ``caller_of``) gets, per server process:

* a **write** token bucket (ScheduleTask, CancelTask: 1 token each;
  ScheduleTasks: 1 token per task, see below; ``schedule_rate_per_namespace``
  / ``schedule_burst``);
* a **read** token bucket (PollTask: 1 token; ListTasks: 1 token per
  ``LIST_ROWS_PER_TOKEN`` rows of the page it asks for;
  ``poll_rate_per_namespace`` / ``poll_burst``);
* a **share of the concurrency cap**: at most ``namespace_max_concurrent_rpcs``
  of its calls in a handler at once, out of ``task_service_max_concurrent_rpcs``
  for everyone (counted here too, so that refused calls hold no slot).

A ScheduleTasks call (issue 17) is counted by its work, as that many
ScheduleTask calls would be: it takes one write token per task, in request
order, and the tasks past what the bucket holds get RESOURCE_EXHAUSTED in
their own results (the call is refused whole only when not even its first
task fits); it holds ``batch_weight`` slots of the concurrency share and cap,
as many as it has tasks in progress at once (at most ``BATCH_IN_FLIGHT``),
so a batch can neither slip past the cap nor be refused for ever by a share
smaller than its weight (the weight is cut to the share).

A call over any of them is refused at once with RESOURCE_EXHAUSTED, before
anything is read or written; the message names the caller, the method group
and the limit, and the ``retry-after-ms`` trailing metadata says how long to
wait. Buckets are per process: with N TaskService replicas the cluster-wide
ceiling is N × rate.

The interceptor must run after authentication (``leasesched.server.grpc_server.build_server``
puts it there): the caller is the principal the auth interceptor stored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

import grpc

from leasesched import limits
from leasesched.auth import current_principal
from leasesched.config import Config
from leasesched.token_bucket import TokenBucket
from leasesched.server.unary_interceptor import Behavior, UnaryInterceptor
from leasesched.v1 import scheduler_pb2 as pb

SERVICE_PREFIX = "/leasesched.v1.TaskService/"
SCHEDULE_METHOD = SERVICE_PREFIX + "ScheduleTask"
BATCH_METHOD = SERVICE_PREFIX + "ScheduleTasks"
# Tasks of one ScheduleTasks call in progress at once (services/task_service.py):
# enough to overlap Cassandra round trips, few enough that one call does not
# flood it; the call holds as many concurrency slots.
BATCH_IN_FLIGHT = 16
CANCEL_METHOD = SERVICE_PREFIX + "CancelTask"
POLL_METHOD = SERVICE_PREFIX + "PollTask"
LIST_METHOD = SERVICE_PREFIX + "ListTasks"
COUNT_METHOD = SERVICE_PREFIX + "CountTasks"

WRITE = "write"
READ = "read"
SCHEDULES_PREFIX = "/leasesched.v1.ScheduleService/"
GATES_PREFIX = "/leasesched.v1.GateService/"
LIMITS_PREFIX = "/leasesched.v1.LimitService/"
GROUP_OF_METHOD: dict[str, str] = {
    SCHEDULE_METHOD: WRITE,
    BATCH_METHOD: WRITE,  # one token per task (``admit_tasks``)
    CANCEL_METHOD: WRITE,
    POLL_METHOD: READ,
    LIST_METHOD: READ,
    COUNT_METHOD: READ,
    SERVICE_PREFIX + "GetTaskHistory": READ,  # one partition, at most history_max_entries rows: one token like a poll
    # Periodic schedules share the namespace's buckets: a flood of schedule
    # changes is a flood of writes like any other.
    **{SCHEDULES_PREFIX + m: WRITE for m in ("CreateSchedule", "UpdateSchedule", "DeleteSchedule", "PauseSchedule",
                                             "UnpauseSchedule", "TriggerSchedule", "BackfillSchedule")},
    SCHEDULES_PREFIX + "DescribeSchedule": READ,
    SCHEDULES_PREFIX + "ListSchedules": READ,
    # Gates: changes are admin only, reads may come from clients.
    **{GATES_PREFIX + m: WRITE for m in ("SetGate", "PauseGate", "UnpauseGate", "DeleteGate")},
    GATES_PREFIX + "GetGate": READ,
    GATES_PREFIX + "ListGates": READ,
    # Concurrency limits: the same.
    **{LIMITS_PREFIX + m: WRITE for m in ("SetLimit", "DeleteLimit")},
    LIMITS_PREFIX + "GetLimit": READ,
    LIMITS_PREFIX + "ListLimits": READ,
}
# A page of n rows costs by its size (``list_cost``): each row is a read.
# CountTasks has no page size: it costs what a default page (100 rows) does.
LIST_METHODS = (LIST_METHOD, COUNT_METHOD, SCHEDULES_PREFIX + "ListSchedules", GATES_PREFIX + "ListGates", LIMITS_PREFIX + "ListLimits")
GROUP_METHODS = {WRITE: "ScheduleTask/CancelTask/schedule changes", READ: "PollTask/ListTasks/schedule reads"}

MAX_BUCKETS = 100_000
# A ListTasks page of n rows costs ceil(n / 10) read tokens (a poll reads one
# row, a page of 100 — the default — reads 100, possibly over several day partitions).
LIST_ROWS_PER_TOKEN = 10
LIST_DEFAULT_PAGE = 100  # what TaskService uses for page_size 0
# The retry hint of a call refused for the concurrency share: no bucket says
# when a slot frees; about one Cassandra round trip under load.
CONCURRENCY_RETRY_MS = 50
SHARE = "share"
PROCESS = "process"
# gRPC's own cap on calls a TaskService has accepted (before any interceptor):
# this many times task_service_max_concurrent_rpcs, a backstop for floods of
# outstanding calls; the real cap is counted after the quotas (ConcurrencyShare).
TRANSPORT_CAP_FACTOR = 4


class RateLimiter:
    """One token bucket per key, bounded in number (see ``MAX_BUCKETS``)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def wait_needed(self, key: str, cost: float = 1.0) -> float:
        """0.0 when the call may go ahead (and is charged), else the seconds to wait.

        A cost above the burst is charged as the whole burst: otherwise such a
        call could never pass, however long the caller waited."""
        cost = min(cost, self.burst)
        now = self._clock()
        return self._bucket(key, now).take(now, cost)

    def take_up_to(self, key: str, count: int) -> tuple[int, float]:
        """Up to ``count`` charges of 1 token, in order: how many were taken and,
        when fewer than ``count``, the seconds until the next token (else 0.0)."""
        now = self._clock()
        bucket = self._bucket(key, now)
        taken = bucket.take_up_to(now, count)
        return taken, (0.0 if taken == count else bucket.take(now, 1.0))

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()  # bounded memory; a reset only ever lets more through
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


class ConcurrencyShare:
    """Calls in a handler: at most ``per_key`` per caller and ``total`` in all (0: no bound).

    Only keys with calls in progress are kept, so the table is never larger
    than ``total``. The process-wide ``total`` is counted here, after the
    caller's own limits, rather than only by gRPC's ``maximum_concurrent_rpcs``
    (which counts every call the moment it arrives, before any interceptor):
    that way the calls a flooding namespace gets refused never hold a slot
    another namespace needs. gRPC's cap stays, higher, as the backstop
    (``transport_cap``)."""

    def __init__(self, per_key: int, total: int = 0) -> None:
        self.per_key = per_key
        self.total = total
        self._held: dict[str, int] = {}
        self._in_progress = 0

    def weight(self, key: str | None, slots: int) -> int:
        """``slots`` cut to what this key could ever hold (its share, the total):
        a call heavier than a whole share must still pass when the share is free."""
        for bound in (self.per_key if key is not None else 0, self.total):
            if bound:
                slots = min(slots, bound)
        return max(1, slots)

    def try_acquire(self, key: str | None, weight: int = 1) -> str | None:
        """None when ``weight`` slots (see ``weight``) were taken, else which
        limit is full: ``SHARE`` or ``PROCESS``.

        ``key`` None (an admin) is bound only by the total."""
        held = self._held.get(key, 0) if key is not None else 0
        if key is not None and self.per_key and held + weight > self.per_key:
            return SHARE
        if self.total and self._in_progress + weight > self.total:
            return PROCESS
        if key is not None:
            self._held[key] = held + weight
        self._in_progress += weight
        return None

    def release(self, key: str | None, weight: int = 1) -> None:
        self._in_progress -= weight
        if key is None:
            return
        held = self._held.get(key, 0) - weight
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    @property
    def in_progress(self) -> int:
        return self._in_progress

    def __len__(self) -> int:
        return len(self._held)


@dataclass(frozen=True)
class Caller:
    """Whose quota a call uses: ``key`` indexes the buckets, ``label`` is for messages,
    ``fair_share``: whether the per-caller concurrency share applies."""

    key: str
    label: str
    fair_share: bool = True


def caller_of(context: grpc.aio.ServicerContext) -> Caller | None:
    """The quota a call is charged to; None for admins, who have none.

    * auth on, client token: the token's namespace — the only namespace it may
      act in, so a PollTask/CancelTask (which name only a task id) belongs to
      it too, and a request naming a foreign namespace is charged to the
      caller, not to the namespace it tried to reach;
    * auth on, admin token: no quota (operators and the services themselves,
      bounded only by the process-wide cap);
    * auth off (local development): the peer address (``ip:port``, so one
      connection): nothing else identifies the caller. Only the rate buckets
      apply then, not the concurrency share: without tenants there is nobody to
      be fair between, and gRPC clients carry all their channels to one target
      over one connection (the load harness's four arrive as one peer), so a
      share would cap the only client at a fraction of the process.
    """
    principal = current_principal.get()
    if principal is None:
        peer = context.peer()
        return Caller(f"peer:{peer}", f"peer {peer!r}", fair_share=False)
    if principal.admin:
        return None
    return Caller(f"namespace:{principal.namespace}", f"namespace {principal.namespace!r}")


def batch_size(request: Any) -> int:
    """The tasks of a ScheduleTasks request; 0 for one that did not parse."""
    tasks = getattr(request, "tasks", None)
    return len(tasks) if tasks is not None else 0


def batch_weight(request: Any) -> int:
    """Concurrency slots a call holds: 1, or for ScheduleTasks the tasks it has in progress at once."""
    return max(1, min(batch_size(request), BATCH_IN_FLIGHT))


def over_quota_results(reply: pb.ScheduleTasksResponse, first: int, count: int, message: str) -> pb.ScheduleTasksResponse:
    """``reply`` (the answers to tasks ``[0, first)``) with RESOURCE_EXHAUSTED
    results for tasks ``first .. count - 1``, which were not admitted."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    for index in range(first, count):
        reply.results.add().error.CopyFrom(pb.ItemError(code=code, message=f"tasks[{index}]: {message}"))
    return reply


def list_cost(request: Any, page_max: int) -> float:
    """Read tokens a ListTasks or ListSchedules request costs: by the page size it asks for."""
    size = getattr(request, "page_size", 0)
    rows = LIST_DEFAULT_PAGE if size == 0 else min(max(size, 1), page_max)
    return float(max(1, math.ceil(rows / LIST_ROWS_PER_TOKEN)))


@dataclass(frozen=True)
class Quotas:
    """The limits, from ``Config``; a rate of 0 or a share of 0 switches that limit off."""

    write_rate: float
    write_burst: float
    read_rate: float
    read_burst: float
    max_concurrent_per_caller: int
    process_max_concurrent: int
    list_page_max: int = 1000

    @classmethod
    def from_config(cls, cfg: Config) -> "Quotas":
        return cls(
            write_rate=cfg.schedule_rate_per_namespace,
            write_burst=cfg.schedule_burst,
            read_rate=cfg.poll_rate_per_namespace,
            read_burst=cfg.poll_burst,
            max_concurrent_per_caller=cfg.namespace_max_concurrent_rpcs,
            process_max_concurrent=cfg.task_service_max_concurrent_rpcs,
            list_page_max=cfg.list_page_max,
        )


@dataclass
class QuotaState:
    """The mutable part, one per server process (held by its interceptor)."""

    limiters: dict[str, RateLimiter] = field(default_factory=dict)
    share: ConcurrencyShare | None = None

    @classmethod
    def build(cls, quotas: Quotas, clock: Callable[[], float] = time.monotonic) -> "QuotaState":
        limiters = {}
        if quotas.write_rate > 0:
            limiters[WRITE] = RateLimiter(quotas.write_rate, quotas.write_burst, clock)
        if quotas.read_rate > 0:
            limiters[READ] = RateLimiter(quotas.read_rate, quotas.read_burst, clock)
        per_key, total = max(0, quotas.max_concurrent_per_caller), max(0, quotas.process_max_concurrent)
        return cls(limiters, ConcurrencyShare(per_key, total) if per_key or total else None)


async def refuse(context: grpc.aio.ServicerContext, retry_ms: int, message: str) -> NoReturn:
    """RESOURCE_EXHAUSTED with the retry hint in the message and the trailing metadata."""
    context.set_trailing_metadata((("retry-after-ms", str(retry_ms)),))
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{message}; retry after {retry_ms} ms")
    raise AssertionError("context.abort returned")  # it raises; the callers rely on that


class QuotaInterceptor(UnaryInterceptor):
    def __init__(self, quotas: Quotas, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.quotas = quotas
        self.state = QuotaState.build(quotas, clock)

    def applies_to(self, method: str) -> bool:
        return method in GROUP_OF_METHOD

    def wrap(self, inner: Behavior, method: str) -> Behavior:
        group = GROUP_OF_METHOD[method]
        name = method.rsplit("/", 1)[-1]
        limiter = self.state.limiters.get(group)
        share = self.state.share
        process_cap = self.quotas.process_max_concurrent
        page_max = self.quotas.list_page_max

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = caller_of(context)
            key = caller.key if caller is not None and caller.fair_share else None  # None: the total only
            weight = 1
            if share is not None:
                weight = share.weight(key, batch_weight(request)) if method == BATCH_METHOD else 1
                full = share.try_acquire(key, weight)
                if full == SHARE and caller is not None:  # only with a key
                    await refuse(
                        context, CONCURRENCY_RETRY_MS,
                        f"{caller.label} already has {share.per_key} TaskService calls in progress, its share of "
                        f"this server's {process_cap} ({name}, {group} group)",
                    )  # fmt: skip
                if full is not None:
                    who = caller.label if caller is not None else "an admin"
                    await refuse(
                        context, CONCURRENCY_RETRY_MS,
                        f"this TaskService has {share.total} calls in progress, its limit ({name} from {who})",
                    )  # fmt: skip
            try:
                if limiter is not None and caller is not None and method == BATCH_METHOD:
                    return await charged_per_task(limiter, caller, request, context)
                if limiter is not None and caller is not None:
                    cost = list_cost(request, page_max) if method in LIST_METHODS else 1.0
                    wait = limiter.wait_needed(caller.key, cost)
                    if wait > 0:
                        await refuse(
                            context, max(1, math.ceil(wait * 1000)),
                            f"{caller.label} is over its {group} rate limit ({GROUP_METHODS[group]}: "
                            f"{limiter.rate:g}/s, burst {limiter.burst:g}; this {name} costs {cost:g})",
                        )  # fmt: skip
                return await inner(request, context)
            finally:
                if share is not None:
                    share.release(key, weight)

        async def charged_per_task(
            limiter: RateLimiter, caller: Caller, request: Any, context: grpc.aio.ServicerContext
        ) -> Any:
            """ScheduleTasks: one write token per task, in order; the handler sees
            only the admitted tasks, the others are answered RESOURCE_EXHAUSTED
            here. A request the handler refuses whole (no tasks, too many, not a
            message) costs one token, as a refused ScheduleTask does."""
            count = batch_size(request)
            if not limits.SCHEDULE_BATCH.low <= count <= limits.SCHEDULE_BATCH.high:
                count = 0
            admitted, wait = limiter.take_up_to(caller.key, max(count, 1))
            if admitted == 0 or count == 0:
                if admitted == 0:
                    await refuse(
                        context, max(1, math.ceil(wait * 1000)),
                        f"{caller.label} is over its {group} rate limit ({GROUP_METHODS[group]}: "
                        f"{limiter.rate:g}/s, burst {limiter.burst:g}; this {name} costs 1 per task)",
                    )  # fmt: skip
                return await inner(request, context)
            if admitted == count:
                return await inner(request, context)
            retry_ms = max(1, math.ceil(wait * 1000))
            reply = await inner(pb.ScheduleTasksRequest(tasks=request.tasks[:admitted]), context)
            context.set_trailing_metadata((("retry-after-ms", str(retry_ms)),))
            message = (
                f"{caller.label} is over its {group} rate limit ({limiter.rate:g}/s, burst {limiter.burst:g}; "
                f"{admitted} of the {count} tasks fitted); retry after {retry_ms} ms"
            )
            return over_quota_results(reply, admitted, count, message)

        return limited


def transport_cap(cfg: Config) -> int:
    """gRPC's ``maximum_concurrent_rpcs`` for a TaskService: a backstop above the real cap."""
    return cfg.task_service_max_concurrent_rpcs * TRANSPORT_CAP_FACTOR
