"""The Prometheus metrics of every leasesched process, defined once.

Metric objects are module-level and created *unregistered*; ``serve`` (called
once at process start with the process's role) registers the ones that role
reports into prometheus_client's registry and starts the ``/metrics`` HTTP
endpoint. Code elsewhere imports the objects and records into them; recording
into a metric that is not registered (unit tests, a process with
``metrics_port = 0``) costs the same and exports nothing.

Labels are kept few and bounded: gRPC method and status code (methods are the
registered ones only, see ``leasesched/server/metrics_interceptor.py``), task type
(capped by ``type_label``), and a small fixed set of reasons/outcomes.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Callable, Iterator, Mapping

from dataclasses import dataclass
from typing import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

ROLES = ("task-service", "task-updater", "trigger", "worker")

# ------------------------------------------------------------------ gRPC servers

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

rpc_duration = Histogram(
    "leasesched_rpc_duration_seconds",
    "Server-side latency of unary gRPC calls, by full method name and status code.",
    ["method", "code"],
    buckets=RPC_BUCKETS,
    registry=None,
)

# ------------------------------------------------------------------ task life cycle

tasks_scheduled = Counter(
    "leasesched_tasks_scheduled", "Tasks created by ScheduleTask (a retried key that finds its task is not counted).",
    ["type"], registry=None,
)  # fmt: skip
tasks_dispatched = Counter(
    "leasesched_tasks_dispatched", "Dispatches sent to a worker (a re-dispatch after the claim timeout counts again).",
    ["type"], registry=None,
)  # fmt: skip
tasks_scheduled_without_worker = Counter(
    "leasesched_tasks_scheduled_without_worker",
    "Tasks created while no live worker served their namespace and type (they wait until one subscribes).",
    ["type"], registry=None,
)  # fmt: skip
tasks_claimed = Counter("leasesched_tasks_claimed", "Successful ClaimTask calls (SCHEDULED -> RUNNING).", ["type"], registry=None)
claims_unread = Counter(
    "leasesched_claims_unread",
    "Claims made without reading the task first: one conditional write on its creation row (CreatedTask).",
    ["type"], registry=None,
)
tasks_completed = Counter("leasesched_tasks_completed", "Tasks that became SUCCEEDED (CompleteTask).", ["type"], registry=None)
tasks_failed = Counter(
    "leasesched_tasks_failed", "Tasks that became FAILED, by the worker's report, lease expiry or a deadline.",
    ["type", "reason"], registry=None,
)  # fmt: skip
tasks_requeued = Counter(
    "leasesched_tasks_requeued", "RUNNING tasks made SCHEDULED again: retry (after a failure), released (worker "
    "shutdown), rate_limited (the handler's gate closed, no attempt used) or lease_expired.",
    ["type", "reason"], registry=None,
)  # fmt: skip
history_write_failures = Counter(
    "leasesched_history_write_failures", "Writes of a task's attempt history (leasesched/attempt_history.py) that "
    "failed: the state change they describe stands, its history entry is missing or stale.", registry=None,
)  # fmt: skip
tasks_cancelled = Counter("leasesched_tasks_cancelled", "Running tasks that stopped on a cancel request.", ["type"], registry=None)
tasks_quarantined = Counter(
    "leasesched_tasks_quarantined", "Stored task rows found unreadable (a time past year 9999, an unknown status, "
    "a value out of range) and quarantined: failed with error type Unreadable, bad columns repaired. Counted once "
    "per task, by the process whose conditional write applied; reason = the first problem's kind (status, missing, "
    "time, priority, attempt, lease, retry_policy, timeouts).",
    ["reason"], registry=None,
)  # fmt: skip
store_unknown_outcomes = Counter(
    "leasesched_store_unknown_outcomes", "Conditional writes whose outcome was unknown (a timeout, a lost "
    "connection) and how a SERIAL read-back resolved them: applied, not_applied, or unresolved (answered UNAVAILABLE; "
    "never guessed).",
    ["resolved"], registry=None,
)  # fmt: skip
lease_expirations = Counter(
    "leasesched_lease_expirations", "Leases the trigger found expired (+ grace) and ended by a conditional write.",
    ["type"], registry=None,
)  # fmt: skip

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
dispatch_lag = Histogram(
    "leasesched_dispatch_lag_seconds",
    "Start time minus scheduled time (run_at) of each claimed task, observed at ClaimTask.",
    buckets=LAG_BUCKETS,
    registry=None,
)

# ------------------------------------------------------------------ trigger

shards_owned = Gauge("leasesched_shards_owned", "Logical shards this trigger owns now.", registry=None)
shard_ownership_changes = Counter(
    "leasesched_shard_ownership_changes", "Changes of this trigger's owned shard set.", registry=None
)
dispatch_queued = Gauge("leasesched_dispatch_queued", "Due tasks waiting for a free worker slot.", registry=None)
dispatch_inflight = Gauge("leasesched_dispatch_inflight", "Dispatched tasks not yet known to be claimed.", registry=None)
subscribed_workers = Gauge("leasesched_subscribed_workers", "Open worker Subscribe streams.", registry=None)
due_read_age = Gauge(
    "leasesched_due_read_age_seconds",
    "Seconds since the owned shard read longest ago had its due index read whole (about scan_interval_s when healthy).",
    registry=None,
)



@dataclass(frozen=True)
class GateSample:
    """One gate as a trigger last read it (``trigger/gates.py``)."""

    namespace: str
    gate: str
    tokens: float
    state: str  # open, paused, closed


GATE_STATES = ("open", "paused", "closed")
MAX_GATE_LABELS = 200  # gates are made by admins, but the label set stays bounded anyway


class GateCollector(Collector):
    """``leasesched_gate_tokens_available`` and ``leasesched_gate_state``, computed
    at scrape time from the trigger's last read of each gate it holds tasks
    for (nothing on the dispatch path). At most ``MAX_GATE_LABELS`` gates."""

    def __init__(self) -> None:
        self._source: Callable[[], list[GateSample]] = list

    def set_source(self, source: Callable[[], list[GateSample]]) -> None:
        self._source = source

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families([]))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(sorted(self._source(), key=lambda g: (g.namespace, g.gate))[:MAX_GATE_LABELS]))

    @staticmethod
    def _families(samples: list[GateSample]) -> list[GaugeMetricFamily]:
        tokens = GaugeMetricFamily(
            "leasesched_gate_tokens_available",
            "Tasks of the gate that could start at once now (its GCRA bucket, warm-up applied; 0 while paused or "
            "closed), as this trigger last read the gate.",
            labels=["namespace", "gate"],
        )
        state = GaugeMetricFamily(
            "leasesched_gate_state", "1 for the gate's state now (open, paused, closed), 0 for the others.",
            labels=["namespace", "gate", "state"],
        )  # fmt: skip
        for sample in samples:
            tokens.add_metric([sample.namespace, sample.gate], sample.tokens)
            for name in GATE_STATES:
                state.add_metric([sample.namespace, sample.gate, name], 1.0 if sample.state == name else 0.0)
        return [tokens, state]


gate_status = GateCollector()


@dataclass(frozen=True)
class LimitSample:
    namespace: str
    scope: str  # namespace, type, key
    name: str
    running: int  # slots taken now
    max_running: int


MAX_LIMIT_LABELS = 500


class LimitCollector(Collector):
    """``leasesched_limit_running`` and ``leasesched_limit_max_running`` per
    concurrency-limit group, from the TaskService's last sampling round
    (``services/limit_sampler.py``; nothing on the claim path). At most
    ``MAX_LIMIT_LABELS`` groups."""

    def __init__(self) -> None:
        self._source: Callable[[], list[LimitSample]] = list

    def set_source(self, source: Callable[[], list[LimitSample]]) -> None:
        self._source = source

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families([]))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(self._source()[:MAX_LIMIT_LABELS]))

    @staticmethod
    def _families(samples: list[LimitSample]) -> list[GaugeMetricFamily]:
        labels = ["namespace", "scope", "name"]
        running = GaugeMetricFamily(
            "leasesched_limit_running", "Tasks of the concurrency-limit group holding a slot (running), as last sampled.", labels=labels
        )
        limit = GaugeMetricFamily("leasesched_limit_max_running", "The group's concurrency limit (max_running).", labels=labels)
        for sample in samples:
            running.add_metric([sample.namespace, sample.scope, sample.name], sample.running)
            limit.add_metric([sample.namespace, sample.scope, sample.name], sample.max_running)
        return [running, limit]


limit_status = LimitCollector()

# ------------------------------------------------------------------ schedules (trigger and TaskService)

schedule_fires = Counter(
    "leasesched_schedule_fires",
    "Tasks created by periodic schedules, by cause: schedule, catchup, buffer, trigger, backfill.",
    ["cause"], registry=None,
)  # fmt: skip
schedule_skipped_slots = Counter(
    "leasesched_schedule_skipped_slots",
    "Slots of periodic schedules skipped, by reason: overlap, buffer_full, catchup_window, paused, no_actions_left.",
    ["reason"], registry=None,
)  # fmt: skip
schedule_fire_lag = Histogram(
    "leasesched_schedule_fire_lag_seconds",
    "Creation time of a slot's task minus the slot's time (schedule and catchup causes); the task then waits "
    "for its jitter and is dispatched like any due task (leasesched_dispatch_lag_seconds).",
    buckets=LAG_BUCKETS, registry=None,
)  # fmt: skip
schedule_evaluations = Counter(
    "leasesched_schedule_evaluations", "Evaluations of periodic schedules, by result: fired, idle, raced, error.",
    ["result"], registry=None,
)  # fmt: skip
_SCHEDULES = (schedule_fires, schedule_skipped_slots, schedule_fire_lag, schedule_evaluations)

# ------------------------------------------------------------------ worker

worker_slots = Gauge("leasesched_worker_slots", "Task slots of this worker.", registry=None)
worker_slots_busy = Gauge("leasesched_worker_slots_busy", "Task slots in use (claiming, running or reporting).", registry=None)
worker_executions = Counter(
    "leasesched_worker_executions",
    "Executions ended on this worker, by outcome: ok, error, permanent, cancelled, timeout, fenced (lease could "
    "not be proven), released (shutdown), not_claimed.",
    ["type", "outcome"],
    registry=None,
)
worker_execution_seconds = Histogram(
    "leasesched_worker_execution_seconds", "Handler run time (claim to report) of executions on this worker.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0), registry=None,
)  # fmt: skip
worker_loop_stalls = Counter(
    "leasesched_worker_loop_stalls",
    "Times the worker's event loop was blocked for more than 1 s (an async handler that does not await).",
    registry=None,
)
worker_loop_blocked_seconds = Counter(
    "leasesched_worker_loop_blocked_seconds", "Seconds the worker's event loop spent blocked in those stalls.", registry=None
)
worker_children_killed = Counter(
    "leasesched_worker_children_killed",
    "Process-mode handler children the watchdog killed because their lease could no longer be proven.",
    registry=None,
)

_RPC = (rpc_duration,)
class QueuedByGroup:
    """``leasesched_dispatch_queued_by_group{group="namespace/key"}``: the
    trigger's queued tasks of its busiest fair-share groups, computed at
    scrape time (nothing on the dispatch path). Keys are client input, so
    only the ``top`` largest groups get a series; the rest are summed as
    ``group="other"`` (a real group always has a '/')."""

    NAME = "leasesched_dispatch_queued_by_group"
    HELP = "Due tasks waiting for a worker slot, by fair-share group (namespace/concurrency key); the largest groups only."

    def __init__(self, top: int = 20) -> None:
        self._top = top
        self._source: Callable[[], Mapping[str, int]] | None = None

    def set_function(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["group"])]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["group"])
        counts = self._source() if self._source is not None else {}
        largest = heapq.nlargest(self._top, counts.items(), key=lambda item: item[1])
        for group, queued in largest:
            family.add_metric([group], queued)
        rest = sum(counts.values()) - sum(queued for _, queued in largest)
        if rest:
            family.add_metric(["other"], rest)
        yield family


dispatch_queued_by_group = QueuedByGroup()


class QueueByType(Collector):
    """``leasesched_queue_oldest_age_seconds{type}`` and
    ``leasesched_dispatch_queued_by_type{type}``: per task type, how long the
    oldest due task this trigger holds has waited for a worker slot (now −
    its due time; 0 when none waits) and how many wait. Computed at scrape
    time from the dispatcher's queues (one heap head per fair-share group and
    priority, see ``Dispatcher.queue_by_type``): nothing on the dispatch
    path. Measured: 100,000 queued tasks of 3 types in 100 groups × 10
    priorities, 0.16 ms per scrape (2 shared cores).

    Labels: the task type only, capped by ``type_label`` (types past the cap
    are folded into ``other``: the oldest age and the summed count). No shard
    label: per (shard, type) the series would multiply by the shard count
    (256 by default) and the queues are per type, not per shard; which
    shards a trigger owns is its own metric."""

    AGE = "leasesched_queue_oldest_age_seconds"
    AGE_HELP = "Seconds the oldest due task of this type has waited on this trigger for a free worker slot (0: none waits)."
    COUNT = "leasesched_dispatch_queued_by_type"
    COUNT_HELP = "Due tasks of this type waiting on this trigger for a free worker slot."

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._source: Callable[[], Mapping[str, tuple[int, int | None]]] | None = None
        self._clock = clock

    def set_source(self, source: Callable[[], Mapping[str, tuple[int, int | None]]]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.AGE, self.AGE_HELP, labels=["type"]),
                GaugeMetricFamily(self.COUNT, self.COUNT_HELP, labels=["type"])]  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(self.AGE, self.AGE_HELP, labels=["type"])
        count = GaugeMetricFamily(self.COUNT, self.COUNT_HELP, labels=["type"])
        now_ms = self._clock() * 1000
        by_label: dict[str, tuple[int, float]] = {}
        for task_type, (queued, oldest) in (self._source() if self._source is not None else {}).items():
            label = type_label(task_type)
            waited = max(0.0, (now_ms - oldest) / 1000) if oldest is not None and queued else 0.0
            total, worst = by_label.get(label, (0, 0.0))
            by_label[label] = (total + queued, max(worst, waited))
        for label, (queued, waited) in sorted(by_label.items()):
            age.add_metric([label], waited)
            count.add_metric([label], queued)
        yield age
        yield count


queue_by_type = QueueByType()


_BY_ROLE: dict[str, tuple[object, ...]] = {
    "task-service": (
        *_RPC, tasks_scheduled, tasks_scheduled_without_worker, tasks_quarantined, store_unknown_outcomes, *_SCHEDULES,
        limit_status, history_write_failures,
    ),  # fmt: skip
    "task-updater": (
        *_RPC, tasks_claimed, claims_unread, tasks_completed, tasks_failed, tasks_requeued, tasks_cancelled, dispatch_lag,
        tasks_quarantined, history_write_failures,
        store_unknown_outcomes,
    ),  # fmt: skip
    "trigger": (
        *_RPC, tasks_dispatched, tasks_quarantined, store_unknown_outcomes, lease_expirations, tasks_requeued,
        tasks_failed, shards_owned, history_write_failures,
        shard_ownership_changes, dispatch_queued, dispatch_queued_by_group, queue_by_type, dispatch_inflight,
        subscribed_workers,
        due_read_age, *_SCHEDULES, gate_status,
    ),  # fmt: skip
    "worker": (
        worker_slots, worker_slots_busy, worker_executions, worker_execution_seconds, worker_loop_stalls,
        worker_loop_blocked_seconds, worker_children_killed,
    ),  # fmt: skip
}


def for_role(role: str) -> tuple[object, ...]:
    """The metric objects a process of ``role`` exports."""
    try:
        return _BY_ROLE[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}") from None


def register(role: str, registry: CollectorRegistry = REGISTRY) -> None:
    """Register ``role``'s metrics in ``registry`` (once per registry)."""
    for metric in for_role(role):
        registry.register(metric)  # type: ignore[arg-type]


def serve(role: str, port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> int:
    """Register ``role``'s metrics and serve ``/metrics`` on ``host:port``; 0 = off.

    Returns the bound port (0 when off). The HTTP server runs in a daemon
    thread and keeps answering while the process drains on SIGTERM.
    """
    if port <= 0:
        return 0
    disable_created_metrics()  # no *_created series: half the series, nothing lost for rates
    register(role, registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


class _TypeLabels:
    """Caps the distinct task-type label values a process exports.

    Task types are client input: without a cap, a client inventing types
    would create unbounded time series. The first ``limit`` types seen keep
    their name; later ones are reported as ``other``.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task_type: str) -> str:
        if task_type in self._seen:
            return task_type
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(task_type)
                return task_type
        return "other"


MAX_TYPE_LABELS = 200
type_label = _TypeLabels(MAX_TYPE_LABELS)
