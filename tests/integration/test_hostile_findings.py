"""The five findings of the independent hostile-input run (issue 9), each as a
named regression test against a real TaskService and TaskUpdater on the real
test Cassandra. Every one of them failed on the code before the fix:

1. schedule_to_close = 1e12 s was accepted and stored a deadline past year
   9999 — a row no process could decode (the read half is
   ``test_poison_row.py``; here: the request is refused, nothing written);
2. durations of 1e17 s answered INTERNAL after the idempotency key was bound,
   so the next *valid* request with that key got ALREADY_EXISTS;
3. a retry interval of 1e12 s was accepted, and every FailTask of the task
   then answered INTERNAL (a TTL over the store's limit);
4. page tokens were trusted: forged ones answered INTERNAL, UNAVAILABLE, or
   walked 200,000 empty partitions until DEADLINE_EXCEEDED;
5. ``$`` in the validation patterns matched before a trailing newline, so
   "h.a\\n", "k\\n" and "E\\n" were accepted and stored.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cassandra.cluster import Session
from google.protobuf.duration_pb2 import Duration

from leasesched import limits
from leasesched.config import Config
from leasesched.model import now_ms
from leasesched.store.cassandra import new_cluster
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.processes import SessionGroup

RPC_TIMEOUT = 10.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Cluster:
    tasks: pb_grpc.TaskServiceStub
    updater: pb_grpc.TaskUpdaterStub
    cql: Session


@pytest.fixture(scope="module")
def cluster(module_config: Config) -> Iterator[Cluster]:
    group = SessionGroup()
    db = new_cluster(module_config)
    try:
        service = group.start_serving("task-service", module_config)
        updater = group.start_serving("task-updater", module_config)
        assert service.target and updater.target
        with grpc.insecure_channel(service.target) as a, grpc.insecure_channel(updater.target) as b:
            yield Cluster(pb_grpc.TaskServiceStub(a), pb_grpc.TaskUpdaterStub(b), db.connect(module_config.keyspace))
    finally:
        db.shutdown()
        group.stop_all()


def new_ns() -> str:
    return f"ns-{uuid.uuid4().hex[:10]}"


def refused(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=RPC_TIMEOUT)
    return info.value


def rows_of(cql: Session, namespace: str) -> dict[str, int]:
    """What a namespace has in the store: its tasks (via the listing table) and keys."""
    # The module's keyspace is small: read whole tables and count this namespace's rows.
    tasks = [r for r in cql.execute("SELECT namespace FROM tasks") if r.namespace == namespace]
    listing = [r for r in cql.execute("SELECT namespace FROM tasks_by_namespace") if r.namespace == namespace]
    keys = [r for r in cql.execute("SELECT namespace FROM idempotency_keys") if r.namespace == namespace]
    assert len(tasks) == len(listing), "a task row without its listing row, or the reverse"
    return {"tasks": len(tasks), "keys": len(keys)}


def test_1_far_schedule_to_close_is_refused_and_writes_nothing(cluster: Cluster) -> None:
    ns = new_ns()
    spec = pb.TaskSpec(namespace=ns, type="h.a")
    spec.timeouts.schedule_to_close.CopyFrom(Duration(seconds=10**12))
    err = refused(cluster.tasks.ScheduleTask, pb.ScheduleTaskRequest(task=spec, idempotency_key="k1"))
    assert err.code() == INVALID
    assert "timeouts.schedule_to_close 1000000000000 s is out of range 0..31622400 s" in (err.details() or "")
    assert rows_of(cluster.cql, ns) == {"tasks": 0, "keys": 0}


@pytest.mark.parametrize(
    "field", ["retry_policy.initial_interval", "timeouts.start_to_close", "timeouts.schedule_to_start"]
)
def test_2_overflowing_durations_are_refused_before_the_key_is_bound(cluster: Cluster, field: str) -> None:
    ns = new_ns()
    bad = pb.TaskSpec(namespace=ns, type="h.a")
    message, name = field.split(".")
    getattr(getattr(bad, message), name).CopyFrom(Duration(seconds=10**17))
    err = refused(cluster.tasks.ScheduleTask, pb.ScheduleTaskRequest(task=bad, idempotency_key="same-key"))
    assert err.code() == INVALID and field in (err.details() or ""), err.details()
    assert rows_of(cluster.cql, ns) == {"tasks": 0, "keys": 0}
    # The key was not used up: a valid request with it creates its task.
    good = pb.TaskSpec(namespace=ns, type="h.a")
    reply = cluster.tasks.ScheduleTask(pb.ScheduleTaskRequest(task=good, idempotency_key="same-key"), timeout=RPC_TIMEOUT)
    assert reply.created
    assert cluster.tasks.PollTask(pb.PollTaskRequest(task_id=reply.task_id), timeout=RPC_TIMEOUT).task.namespace == ns


def test_3_retry_intervals_are_bounded_and_the_longest_one_is_applied(cluster: Cluster) -> None:
    ns = new_ns()
    far = pb.TaskSpec(namespace=ns, type="h.a")
    far.retry_policy.initial_interval.CopyFrom(Duration(seconds=10**12))
    err = refused(cluster.tasks.ScheduleTask, pb.ScheduleTaskRequest(task=far))
    assert err.code() == INVALID and "retry_policy.initial_interval" in (err.details() or "")

    # The longest accepted interval: FailTask applies it (before: INTERNAL, TTL overflow).
    longest = pb.TaskSpec(namespace=ns, type="h.a")
    longest.retry_policy.initial_interval.CopyFrom(Duration(seconds=limits.YEAR_MS // 1000))
    longest.retry_policy.maximum_attempts = 3
    task_id = cluster.tasks.ScheduleTask(pb.ScheduleTaskRequest(task=longest), timeout=RPC_TIMEOUT).task_id
    lease = cluster.updater.ClaimTask(pb.ClaimTaskRequest(task_id=task_id, worker_id="w1", attempt=1), timeout=RPC_TIMEOUT)
    before = now_ms()
    failed = cluster.updater.FailTask(
        pb.FailTaskRequest(task_id=task_id, lease_token=lease.lease_token, error="boom", error_type="Boom"), timeout=RPC_TIMEOUT
    )
    assert failed.status == pb.SCHEDULED
    next_run = failed.next_run_at.seconds * 1000 + failed.next_run_at.nanos // 1_000_000
    # Up to 20 % jitter shortens the wait; never past the interval.
    assert before + 0.8 * limits.YEAR_MS - 1000 <= next_run <= now_ms() + limits.YEAR_MS
    view = cluster.tasks.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=RPC_TIMEOUT).task
    assert view.status == pb.SCHEDULED and view.attempt == 2


def _legacy_token(body: dict[str, Any]) -> str:
    """A page token in the old unsigned format (base64 of JSON): what was forged."""
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


def test_4_page_tokens_cannot_be_forged_or_moved(cluster: Cluster) -> None:
    ns, other = new_ns(), new_ns()
    for _ in range(5):
        cluster.tasks.ScheduleTask(pb.ScheduleTaskRequest(task=pb.TaskSpec(namespace=ns, type="h.a")), timeout=RPC_TIMEOUT)
    first = cluster.tasks.ListTasks(pb.ListTasksRequest(namespace=ns, page_size=2), timeout=RPC_TIMEOUT)
    real = first.next_page_token
    assert real and len(real) <= limits.MAX_PAGE_TOKEN

    forged = [
        _legacy_token({"d": 1e308, "c": None, "t": None}),  # float infinity → INTERNAL before
        _legacy_token({"d": 2**31, "c": 2**63, "t": str(uuid.uuid4())}),  # int and timestamp overflow
        _legacy_token({"d": 200_000 + now_ms() // 86_400_000, "c": None, "t": None}),  # 200,000 empty days
        _legacy_token({"d": -5, "c": None, "t": None}),  # answered UNAVAILABLE before
        real[:-2] + ("AA" if not real.endswith("AA") else "BB"),  # a real token, edited
        real + "x" * limits.MAX_PAGE_TOKEN,
        "v1.e30.AAAAAAAAAAAAAAAAAAAAAA",
        "\n",
    ]
    for token in forged:
        started = time.monotonic()
        err = refused(cluster.tasks.ListTasks, pb.ListTasksRequest(namespace=ns, page_token=token))
        assert err.code() == INVALID and "page_token" in (err.details() or ""), (token, err.code(), err.details())
        assert time.monotonic() - started < RPC_TIMEOUT
    # A real token is bound to its namespace and its status filter.
    err = refused(cluster.tasks.ListTasks, pb.ListTasksRequest(namespace=other, page_token=real))
    assert err.code() == INVALID and "page_token" in (err.details() or "")
    err = refused(cluster.tasks.ListTasks, pb.ListTasksRequest(namespace=ns, status=pb.SCHEDULED, page_token=real))
    assert err.code() == INVALID
    # ... and works where it belongs: the pages together are every task, once.
    seen = [t.task_id for t in first.tasks]
    token = real
    while token:
        page = cluster.tasks.ListTasks(pb.ListTasksRequest(namespace=ns, page_size=2, page_token=token), timeout=RPC_TIMEOUT)
        seen += [t.task_id for t in page.tasks]
        token = page.next_page_token
    assert len(seen) == len(set(seen)) == 5


@pytest.mark.parametrize(
    "what", ["type", "namespace", "idempotency_key", "non_retryable_error_types"]
)
def test_5_trailing_newlines_are_refused(cluster: Cluster, what: str) -> None:
    ns = new_ns()
    spec = pb.TaskSpec(namespace=ns, type="h.a")
    key = ""
    if what == "type":
        spec.type = "h.a\n"
    elif what == "namespace":
        spec.namespace = ns + "\n"
    elif what == "idempotency_key":
        key = "k\n"
    else:
        spec.retry_policy.non_retryable_error_types.append("E\n")
    err = refused(cluster.tasks.ScheduleTask, pb.ScheduleTaskRequest(task=spec, idempotency_key=key))
    assert err.code() == INVALID and what in (err.details() or ""), err.details()
    assert rows_of(cluster.cql, ns) == {"tasks": 0, "keys": 0}
