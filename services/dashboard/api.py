"""Everything the dashboard asks the cluster, in one place.

The dashboard talks to the gRPC API only, through ``leasesched.client.Client``
and with the *logged-in person's own token*: the servers' role and namespace
checks apply to every page exactly as to the CLI, and the dashboard holds no
credential of its own that could show more than the token may see. The one
exception is the cluster page (``ClusterReader``): no RPC reports shard
ownership or the registered workers, so it reads ZooKeeper's registry
read-only, like ``leasesched cluster status``; it never reads Cassandra.

``DashboardApi`` is the seam the web app depends on (a Protocol): the real one
is ``GrpcApi``; unit tests pass a fake. Operator actions (OperatorService) are
added here as methods when that service exists, so the app gains them as a
small addition.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leasesched.client import (
    Client,
    ClientError,
    GateView,
    HistoryLine,
    InvalidArgumentError,
    LimitInfo,
    PermissionDeniedError,
    ScheduleView,
    TaskStatus,
    TaskView,
)
from leasesched.config import Config
from leasesched.transport import sync_channel


class Role(str, enum.Enum):
    """The roles a person can log in with (a worker token cannot: it may not read tasks)."""

    CLIENT = "client"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def may_act(self) -> bool:
        """Operator actions (and cancel) are shown and accepted for these roles only;
        a client token gets the read-only dashboard even where the API would let it cancel."""
        return self in (Role.OPERATOR, Role.ADMIN)

    @property
    def may_read_payloads(self) -> bool:
        """Payloads (a task's, a schedule action's) are shown to client and admin only:
        the roles the API lets read schedule definitions, where payloads live. An
        operator acts on tasks without reading their data (docs/dashboard.md)."""
        return self in (Role.CLIENT, Role.ADMIN)

    @property
    def sees_cluster(self) -> bool:
        """The cluster page spans every namespace, so admins only (as ``cluster status``)."""
        return self is Role.ADMIN


@dataclass(frozen=True)
class Identity:
    """Who a token is, as far as the API shows it (there is no WhoAmI RPC)."""

    namespace: str
    role: Role


@dataclass(frozen=True)
class TaskPage:
    tasks: list[TaskView]
    next_page_token: str  # "" after the last page


@dataclass(frozen=True)
class Count:
    """Tasks of one status, as CountTasks counted them."""

    value: int
    capped: bool  # a lower bound: the server stopped at its bound of rows read

    def __str__(self) -> str:
        return f"{self.value}+" if self.capped else str(self.value)


class Action(str, enum.Enum):
    """The operator actions (OperatorService), each on the version of the task the
    person saw (``expected_version``): a task that changed since is refused."""

    RETRY = "retry"  # FAILED or CANCELLED: runs again
    RESUME = "resume"  # SCHEDULED, waiting for its retry backoff: due now
    MARK_FAILED = "mark-failed"  # SCHEDULED (typically failing and waiting to retry): FAILED now
    TERMINATE = "terminate"  # RUNNING: the lease is revoked, FAILED ("Terminated")

    @property
    def label(self) -> str:
        return self.value.replace("-", " ").capitalize()

    def applies_to(self, task: TaskView, now: dt.datetime) -> bool:
        """Whether to offer it (the server decides; this keeps buttons that can only be refused away)."""
        if self is Action.RETRY:
            return task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
        if self is Action.TERMINATE:
            return task.status is TaskStatus.RUNNING
        if self is Action.MARK_FAILED:
            return task.status is TaskStatus.SCHEDULED
        return task.status is TaskStatus.SCHEDULED and task.attempt > 1 and task.run_at is not None and task.run_at > now


class LoginRefused(Exception):
    """The token cannot be used for the dashboard (unknown, revoked, a worker's, another namespace's)."""


class DashboardApi(Protocol):
    """The calls of one logged-in session, made with its token."""

    def identify(self) -> Identity: ...

    def list_page(
        self, status: TaskStatus | None, page_size: int, page_token: str = "", type: str = "", since: dt.datetime | None = None
    ) -> TaskPage: ...

    def count(self, status: TaskStatus) -> Count: ...

    def poll(self, task_id: str, include_payload: bool = False) -> TaskView: ...

    def history(self, task_id: str) -> list[HistoryLine]: ...

    def cancel(self, task_id: str) -> TaskView: ...

    def act(self, action: Action, task_id: str, expected_version: str, reason: str) -> TaskView: ...

    def schedules(self) -> list[ScheduleView]: ...

    def describe_schedule(self, schedule_id: str) -> ScheduleView: ...

    def limits(self) -> list[LimitInfo]: ...

    def gates(self) -> list[GateView]: ...

    def store_probe(self) -> StoreProbe: ...

    def close(self) -> None: ...


ApiFactory = Callable[[str, str], DashboardApi]  # (token, namespace) → the session's API


@dataclass(frozen=True)
class StoreProbe:
    """TaskService's health and one ListTasks (which reads the store) timed: the
    store's health as seen through the API."""

    serving: str  # SERVING, NOT_SERVING, or the error
    list_ok: bool
    list_ms: float
    detail: str = ""


class GrpcApi:
    """``DashboardApi`` over a ``Client`` bound to one token and namespace."""

    def __init__(self, target: str, cfg: Config, token: str, namespace: str) -> None:
        self._target = target
        self._cfg = cfg
        self.namespace = namespace
        self._channel = sync_channel(target, cfg, token=token)
        self._client = Client(target, config=cfg, namespace=namespace, channel=self._channel)

    def identify(self) -> Identity:
        """Probe the role (auth_interceptor.ROLES_BY_METHOD): ListTasks must work (else no
        dashboard: a worker token, or another namespace's); listing every namespace's
        limits works for admins only; OperatorService answers an operator's RetryTask of
        no task INVALID_ARGUMENT (the interceptor let it through; nothing is changed) and
        a client's PERMISSION_DENIED."""
        try:
            self._client.list_page(self.namespace, None, 1)
        except ClientError as exc:
            raise LoginRefused(f"{exc.code.name}: {exc.details}") from None
        try:
            next(iter(self._client.list_limits(every_namespace=True, page_size=1)), None)
            return Identity(self.namespace, Role.ADMIN)
        except PermissionDeniedError:
            pass
        try:
            self._client.retry_task("", "", "")
        except InvalidArgumentError:
            return Identity(self.namespace, Role.OPERATOR)
        except PermissionDeniedError:
            return Identity(self.namespace, Role.CLIENT)
        raise LoginRefused("the role probe was answered unexpectedly")

    def list_page(
        self, status: TaskStatus | None, page_size: int, page_token: str = "", type: str = "", since: dt.datetime | None = None
    ) -> TaskPage:
        """One page, filtered by the server (state, exact type, created since)."""
        tasks, token = self._client.list_page(self.namespace, status, page_size, page_token, type=type or None, created_after=since)
        return TaskPage(list(tasks), token)

    def count(self, status: TaskStatus) -> Count:
        """CountTasks: FAILED exactly (the dead-letter index), the others over the
        server's recent scan (a lower bound when it stopped at its bound)."""
        counts = self._client.count(status)
        return Count(sum(row.count for row in counts.rows), not counts.exact)

    def poll(self, task_id: str, include_payload: bool = False) -> TaskView:
        return self._client.poll(task_id, include_payload=include_payload)

    def history(self, task_id: str) -> list[HistoryLine]:
        """Attempts and operator actions, newest first (GetTaskHistory), at most 50."""
        return self._client.history(task_id, limit=50)

    def cancel(self, task_id: str) -> TaskView:
        return self._client.cancel(task_id)

    def act(self, action: Action, task_id: str, expected_version: str, reason: str) -> TaskView:
        """One OperatorService call, through the client (its retries and error mapping)."""
        calls = {
            Action.RETRY: self._client.retry_task,
            Action.RESUME: self._client.resume_task,
            Action.MARK_FAILED: self._client.mark_task_failed,
            Action.TERMINATE: self._client.terminate_task,
        }
        return calls[action](task_id, expected_version, reason)

    def schedules(self) -> list[ScheduleView]:
        return list(self._client.list_schedules(self.namespace))

    def describe_schedule(self, schedule_id: str) -> ScheduleView:
        return self._client.describe_schedule(schedule_id)

    def limits(self) -> list[LimitInfo]:
        return list(self._client.list_limits(self.namespace))

    def gates(self) -> list[GateView]:
        return list(self._client.list_gates(self.namespace))

    def store_probe(self) -> StoreProbe:
        serving = _health(self._target, self._cfg)
        started = time.monotonic()
        try:
            self._client.list_page(self.namespace, None, 1)
            return StoreProbe(serving, True, (time.monotonic() - started) * 1000)
        except ClientError as exc:
            return StoreProbe(serving, False, (time.monotonic() - started) * 1000, f"{exc.code.name}: {exc.details}")

    def close(self) -> None:
        self._channel.close()


def _health(target: str, cfg: Config) -> str:
    """The gRPC health check of TaskService (open to every caller, no token)."""
    with sync_channel(target, cfg, token="") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"


def grpc_api_factory(target: str, cfg: Config) -> ApiFactory:
    def make(token: str, namespace: str) -> DashboardApi:
        return GrpcApi(target, cfg, token, namespace)

    return make


# ---------------------------------------------------------------- the cluster page


@dataclass(frozen=True)
class TriggerInfo:
    address: str
    shards: list[int]
    workers: list[str]


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    namespace: str
    types: list[str]
    busy: int
    slots: int
    leases: list[tuple[str, int]]  # (task id, lease token)


@dataclass(frozen=True)
class ClusterView:
    logical_shards: int
    triggers: list[TriggerInfo]
    workers: list[WorkerInfo]
    services: dict[str, list[str]]  # role → addresses (task-service, task-updater)
    shards_without_owner: list[int] = field(default_factory=list)
    error: str = ""  # ZooKeeper unreachable: what went wrong


class ClusterReader(Protocol):
    def read(self) -> ClusterView: ...


class ZooKeeperClusterReader:
    """The registry as ``leasesched cluster status`` reads it: read-only, a fresh
    ZooKeeper session per read (a page view every few seconds at most)."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg

    def read(self) -> ClusterView:
        from leasesched.coordination import registry, zk

        try:
            client = zk.connect(self._cfg, timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - shown on the page
            return ClusterView(0, [], [], {}, error=f"ZooKeeper unreachable: {exc}")
        try:
            try:
                data, _ = client.get(f"{self._cfg.zk_root}/cluster")
                shards = int(json.loads(data)["logical_shards"])
            except Exception:  # noqa: BLE001 - no cluster node yet: the configured shape
                shards = self._cfg.logical_shards
            roles = {r: registry.members(client, self._cfg.zk_root, r) for r in ("task-service", "task-updater", "trigger", "worker")}
        finally:
            client.stop()
            client.close()
        return cluster_view(shards, roles)


def cluster_view(shards: int, roles: dict[str, dict[str, dict[str, object]]]) -> ClusterView:
    """The page's view of the registry's raw registrations."""
    triggers = [
        TriggerInfo(address, sorted(_ints(data.get("shards"))), sorted(str(w) for w in _items(data.get("workers"))))
        for address, data in sorted(roles.get("trigger", {}).items())
    ]
    workers = [
        WorkerInfo(
            worker_id, str(data.get("namespace", "")), [str(t) for t in _items(data.get("types"))],
            _int(data.get("busy")), _int(data.get("slots")),
            [(str(lease[0]), _int(lease[1])) for lease in _items(data.get("leases")) if isinstance(lease, list | tuple) and len(lease) == 2],
        )  # fmt: skip
        for worker_id, data in sorted(roles.get("worker", {}).items())
    ]
    owned = {s for t in triggers for s in t.shards}
    services = {r: sorted(roles.get(r, {})) for r in ("task-service", "task-updater")}
    return ClusterView(shards, triggers, workers, services, sorted(set(range(shards)) - owned))


def _items(value: object) -> Iterable[object]:
    return value if isinstance(value, list) else []


def _ints(value: object) -> list[int]:
    return [v for v in _items(value) if isinstance(v, int)]


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0
