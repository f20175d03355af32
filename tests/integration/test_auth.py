"""Authentication, namespace isolation and rate limits, on real processes.

TaskService and TaskUpdater run with auth on (the default) against the real
Cassandra; tokens are created the way an operator creates them. Each check
asserts the exact status code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from leasesched.config import Config
from leasesched.store.cassandra import CassandraStore
from leasesched.testing import RunningProcess
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.cluster import wait_for
from tests.processes import SessionGroup
from tests.tokens import issue_tokens

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Tokens:
    admin: str
    client_a: str
    client_b: str
    worker_a: str
    worker_b: str
    revocable: str
    revocable_id: str


def _create_tokens(cfg: Config) -> Tokens:
    wanted = [
        ("ops", "admin", "admin"),
        ("team-a", "client", "client_a"),
        ("team-b", "client", "client_b"),
        ("team-a", "worker", "worker_a"),
        ("team-b", "worker", "worker_b"),
        ("team-a", "client", "revocable"),
    ]
    made = dict(zip((name for _, _, name in wanted), issue_tokens(cfg, wanted)))
    return Tokens(**{k: v[0] for k, v in made.items()}, revocable_id=made["revocable"][1])


@dataclass
class AuthCluster:
    cfg: Config
    tokens: Tokens
    task_service: RunningProcess
    task_updater: RunningProcess

    def tasks(self, token: str | None) -> pb_grpc.TaskServiceStub:
        assert self.task_service.target
        return pb_grpc.TaskServiceStub(sync_channel(self.task_service.target, self.cfg, token=token or ""))

    def schedules(self, token: str) -> pb_grpc.ScheduleServiceStub:
        assert self.task_service.target
        return pb_grpc.ScheduleServiceStub(sync_channel(self.task_service.target, self.cfg, token=token))

    def limits(self, token: str) -> pb_grpc.LimitServiceStub:
        assert self.task_service.target
        return pb_grpc.LimitServiceStub(sync_channel(self.task_service.target, self.cfg, token=token))

    def updater(self, token: str) -> pb_grpc.TaskUpdaterStub:
        assert self.task_updater.target
        return pb_grpc.TaskUpdaterStub(sync_channel(self.task_updater.target, self.cfg, token=token))


@pytest.fixture(scope="module")
def auth_cluster(module_config: Config) -> Iterator[AuthCluster]:
    base = module_config.with_overrides(auth="on", auth_cache_s=1.0, schedule_rate_per_namespace=5.0, schedule_burst=5.0)
    tokens = _create_tokens(base)
    cfg = base.with_overrides(token=tokens.admin)  # the services' own identity
    group = SessionGroup()
    try:
        yield AuthCluster(cfg, tokens, group.start_serving("task-service", cfg), group.start_serving("task-updater", cfg))
    finally:
        group.stop_all()


def schedule(stub: pb_grpc.TaskServiceStub, namespace: str, **kw: object) -> pb.ScheduleTaskResponse:
    spec = pb.TaskSpec(namespace=namespace, type="auth.test", payload=b"x", **kw)
    return stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10)


def code_of(fn: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()  # type: ignore[operator]
    return err.value.code()


def wait_rate_budget(cluster: AuthCluster, namespace: str) -> None:
    """Tests share the 5/s budget per namespace: wait until a burst is available again."""
    time.sleep(1.1)


def test_missing_malformed_and_unknown_tokens(auth_cluster: AuthCluster) -> None:
    poll = pb.PollTaskRequest(task_id="00000000-0000-0000-0000-000000000000")
    for token in (None, "not-a-token", "lsk_0123456789abcdef_wrong-secret", auth_cluster.tokens.client_a[:-2] + "xx"):
        assert code_of(lambda: auth_cluster.tasks(token).PollTask(poll, timeout=5)) == UNAUTHENTICATED
    # Health checks stay open, so load balancers and probes need no token.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert auth_cluster.task_service.target
    with sync_channel(auth_cluster.task_service.target, auth_cluster.cfg, token="") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cross_namespace_access_is_denied_without_revealing_existence(auth_cluster: AuthCluster) -> None:
    a, b = auth_cluster.tasks(auth_cluster.tokens.client_a), auth_cluster.tasks(auth_cluster.tokens.client_b)
    task_id = schedule(a, "team-a").task_id
    assert a.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=5).task.namespace == "team-a"

    # B cannot schedule into A, poll, cancel or list A's tasks...
    assert code_of(lambda: schedule(b, "team-a")) == DENIED
    assert code_of(lambda: b.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=5)) == DENIED
    assert code_of(lambda: b.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=5)) == DENIED
    assert code_of(lambda: b.ListTasks(pb.ListTasksRequest(namespace="team-a"), timeout=5)) == DENIED
    # ...and a missing id looks exactly like A's existing one.
    missing = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(grpc.RpcError) as foreign:
        b.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=5)
    with pytest.raises(grpc.RpcError) as absent:
        b.PollTask(pb.PollTaskRequest(task_id=missing), timeout=5)
    assert absent.value.code() == foreign.value.code() == DENIED
    assert absent.value.details().replace(missing, "ID") == foreign.value.details().replace(task_id, "ID")
    # The task is untouched, and an admin still sees the real NOT_FOUND.
    assert a.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=5).task.status == pb.SCHEDULED
    admin = auth_cluster.tasks(auth_cluster.tokens.admin)
    assert code_of(lambda: admin.PollTask(pb.PollTaskRequest(task_id=missing), timeout=5)) == grpc.StatusCode.NOT_FOUND
    # Roles: a worker token cannot use the user API, a client token cannot use the worker API.
    worker_as_client = auth_cluster.tasks(auth_cluster.tokens.worker_a)
    assert code_of(lambda: worker_as_client.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=5)) == DENIED
    client_as_worker = auth_cluster.updater(auth_cluster.tokens.client_a)
    claim = pb.ClaimTaskRequest(task_id=task_id, worker_id="w", attempt=1)
    assert code_of(lambda: client_as_worker.ClaimTask(claim, timeout=5)) == DENIED
    wait_rate_budget(auth_cluster, "team-a")


def test_workers_only_touch_their_namespace(auth_cluster: AuthCluster) -> None:
    task_id = schedule(auth_cluster.tasks(auth_cluster.tokens.client_a), "team-a").task_id
    foreign, own = auth_cluster.updater(auth_cluster.tokens.worker_b), auth_cluster.updater(auth_cluster.tokens.worker_a)
    claim = pb.ClaimTaskRequest(task_id=task_id, worker_id="w", attempt=1)
    assert code_of(lambda: foreign.ClaimTask(claim, timeout=5)) == DENIED
    lease = own.ClaimTask(claim, timeout=5)
    # A forged report under the right token from the wrong namespace is refused too.
    forged = pb.CompleteTaskRequest(task_id=task_id, lease_token=lease.lease_token, result=b"forged")
    assert code_of(lambda: foreign.CompleteTask(forged, timeout=5)) == DENIED
    beat = pb.HeartbeatRequest(task_id=task_id, lease_token=lease.lease_token, worker_id="w")
    assert code_of(lambda: foreign.Heartbeat(beat, timeout=5)) == DENIED
    fail = pb.FailTaskRequest(task_id=task_id, lease_token=lease.lease_token, error="x")
    assert code_of(lambda: foreign.FailTask(fail, timeout=5)) == DENIED
    own.CompleteTask(pb.CompleteTaskRequest(task_id=task_id, lease_token=lease.lease_token, result=b"ok"), timeout=5)
    view = auth_cluster.tasks(auth_cluster.tokens.client_a).PollTask(pb.PollTaskRequest(task_id=task_id), timeout=5).task
    assert view.status == pb.SUCCEEDED and view.result == b"ok"
    wait_rate_budget(auth_cluster, "team-a")


def test_schedules_are_isolated_by_namespace_and_role(auth_cluster: AuthCluster) -> None:
    a, b = auth_cluster.schedules(auth_cluster.tokens.client_a), auth_cluster.schedules(auth_cluster.tokens.client_b)
    mine = pb.Schedule(namespace="team-a", schedule_id="nightly")
    mine.spec.cron.append("30 2 * * *")
    mine.action.type = "auth.test"
    a.CreateSchedule(pb.CreateScheduleRequest(schedule=mine), timeout=5)
    theirs = pb.ScheduleRef(namespace="team-a", schedule_id="nightly")
    missing = pb.ScheduleRef(namespace="team-a", schedule_id="no-such")
    # B cannot create, see, list, change, run or delete A's schedules, and cannot tell which exist.
    assert code_of(lambda: b.CreateSchedule(pb.CreateScheduleRequest(schedule=mine), timeout=5)) == DENIED
    for target in (theirs, missing):
        wait_rate_budget(auth_cluster, "team-b")  # B's write bucket holds 5
        assert code_of(lambda: b.DescribeSchedule(pb.DescribeScheduleRequest(ref=target), timeout=5)) == DENIED
        assert code_of(lambda: b.TriggerSchedule(pb.TriggerScheduleRequest(ref=target), timeout=5)) == DENIED
        assert code_of(lambda: b.PauseSchedule(pb.PauseScheduleRequest(ref=target), timeout=5)) == DENIED
        assert code_of(lambda: b.DeleteSchedule(pb.DeleteScheduleRequest(ref=target), timeout=5)) == DENIED
    assert code_of(lambda: b.ListSchedules(pb.ListSchedulesRequest(namespace="team-a"), timeout=5)) == DENIED
    wait_rate_budget(auth_cluster, "team-b")
    assert code_of(lambda: b.UpdateSchedule(pb.UpdateScheduleRequest(schedule=mine), timeout=5)) == DENIED
    # A worker token may not use the schedule API at all.
    worker = auth_cluster.schedules(auth_cluster.tokens.worker_a)
    assert code_of(lambda: worker.DescribeSchedule(pb.DescribeScheduleRequest(ref=theirs), timeout=5)) == DENIED
    # A's schedule is untouched.
    d = a.DescribeSchedule(pb.DescribeScheduleRequest(ref=theirs), timeout=5).schedule
    assert d.version == 1 and not d.schedule.paused and d.fired_total == 0
    wait_rate_budget(auth_cluster, "team-a")


def test_concurrency_limits_are_read_by_their_namespace_and_changed_by_admins(auth_cluster: AuthCluster) -> None:
    admin = auth_cluster.limits(auth_cluster.tokens.admin)
    a, b = auth_cluster.limits(auth_cluster.tokens.client_a), auth_cluster.limits(auth_cluster.tokens.client_b)
    mine = pb.LimitRef(namespace="team-a", scope=pb.LIMIT_SCOPE_KEY, name="*")
    made = admin.SetLimit(pb.SetLimitRequest(limit=mine, max_running=2), timeout=5).limit
    # A client reads its own namespace's limits ...
    assert a.GetLimit(pb.GetLimitRequest(limit=mine), timeout=5).limit == made
    assert [v.limit for v in a.ListLimits(pb.ListLimitsRequest(namespace="team-a"), timeout=5).limits] == [mine]
    # ... but changes none, not even its own, and sees no other namespace's, nor every namespace at once.
    assert code_of(lambda: a.SetLimit(pb.SetLimitRequest(limit=mine, max_running=9), timeout=5)) == DENIED
    assert code_of(lambda: a.DeleteLimit(pb.DeleteLimitRequest(limit=mine), timeout=5)) == DENIED
    assert code_of(lambda: b.GetLimit(pb.GetLimitRequest(limit=mine), timeout=5)) == DENIED
    assert code_of(lambda: b.ListLimits(pb.ListLimitsRequest(namespace="team-a"), timeout=5)) == DENIED
    assert code_of(lambda: b.ListLimits(pb.ListLimitsRequest(), timeout=5)) == DENIED
    wait_rate_budget(auth_cluster, "team-b")
    # A worker token may not use the limit API at all.
    worker = auth_cluster.limits(auth_cluster.tokens.worker_a)
    assert code_of(lambda: worker.GetLimit(pb.GetLimitRequest(limit=mine), timeout=5)) == DENIED
    # Untouched; the admin lists every namespace and deletes it.
    assert admin.GetLimit(pb.GetLimitRequest(limit=mine), timeout=5).limit == made
    assert mine in [v.limit for v in admin.ListLimits(pb.ListLimitsRequest(), timeout=5).limits]
    admin.DeleteLimit(pb.DeleteLimitRequest(limit=mine, expected_version=1), timeout=5)
    wait_rate_budget(auth_cluster, "team-a")


def test_revoked_token_stops_working(auth_cluster: AuthCluster, module_config: Config) -> None:
    stub = auth_cluster.tasks(auth_cluster.tokens.revocable)
    listing = pb.ListTasksRequest(namespace="team-a", page_size=1)
    stub.ListTasks(listing, timeout=5)

    async def revoke() -> None:
        store = CassandraStore(auth_cluster.cfg)
        await store.connect()
        try:
            assert await store.revoke_token(auth_cluster.tokens.revocable_id)
        finally:
            await store.close()

    asyncio.run(revoke())

    def refused() -> bool:
        try:
            stub.ListTasks(listing, timeout=5)
            return False
        except grpc.RpcError as err:
            return err.code() == UNAUTHENTICATED

    wait_for(refused, 10, "the revoked token to be refused (cache 1 s)")


def test_rate_limit_triggers_with_a_retry_hint_and_recovers(auth_cluster: AuthCluster) -> None:
    time.sleep(1.1)  # a full bucket (burst 5, 5/s)
    a, b = auth_cluster.tasks(auth_cluster.tokens.client_a), auth_cluster.tasks(auth_cluster.tokens.client_b)
    accepted, refused = 0, None
    for _ in range(20):
        try:
            schedule(a, "team-a")
            accepted += 1
        except grpc.RpcError as err:
            refused = err
            break
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 5 <= accepted <= 7  # the burst, plus what refilled while we called
    assert "retry after" in refused.details()
    hint = dict(refused.trailing_metadata() or ()).get("retry-after-ms")
    assert hint is not None and 0 < int(hint) <= 1000
    schedule(b, "team-b")  # another namespace has its own budget
    time.sleep(int(hint) / 1000 + 0.05)
    schedule(a, "team-a")  # recovered
