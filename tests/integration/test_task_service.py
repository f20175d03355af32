"""TaskService on the real test Cassandra and ZooKeeper, through a real
``leasesched task-service`` process over gRPC (issue 2).

Each test uses its own namespace; the module has its own keyspace
(``module_config``), so nothing here depends on test order. The write-order
tests run the real ``Lifecycle`` over the real ``CassandraStore`` in-process,
with a fault injected around the store (not a mock of Cassandra).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from cassandra.cluster import Session

from leasesched.config import Config
from leasesched.errors import AlreadyExists, Unavailable
from leasesched.infra.local import LocalInfra
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, Task, now_ms, shard_of
from leasesched.store import schema
from leasesched.store.base import StoreUnavailable
from leasesched.store.cassandra import CassandraStore, new_cluster
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.integration.conftest import keyspace_for

Stub = pb_grpc.TaskServiceStub
RPC_TIMEOUT = 10.0


# -- helpers ------------------------------------------------------------------


def new_ns() -> str:
    return f"ns-{uuid.uuid4().hex[:10]}"


def spec(namespace: str, type_: str = "email.send", payload: bytes = b"hello", delay_s: float | None = 3600, **kw: Any) -> pb.TaskSpec:
    s = pb.TaskSpec(namespace=namespace, type=type_, payload=payload, **kw)
    if delay_s is not None and "run_at" not in kw:
        s.delay.FromMilliseconds(int(delay_s * 1000))
    return s


def schedule(stub: Stub, namespace: str, key: str = "", **kw: Any) -> pb.ScheduleTaskResponse:
    return stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec(namespace, **kw), idempotency_key=key), timeout=RPC_TIMEOUT)


def poll(stub: Stub, task_id: str) -> pb.TaskView:
    return stub.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=RPC_TIMEOUT).task


def list_all(stub: Stub, namespace: str, status: int = pb.TASK_STATUS_UNSPECIFIED, page_size: int = 2) -> list[list[pb.TaskView]]:
    """Every page of a listing (the pages themselves, to check their sizes)."""
    pages: list[list[pb.TaskView]] = []
    token = ""
    while True:
        reply = stub.ListTasks(
            pb.ListTasksRequest(namespace=namespace, status=status, page_size=page_size, page_token=token), timeout=RPC_TIMEOUT
        )
        assert len(reply.tasks) <= page_size
        pages.append(list(reply.tasks))
        token = reply.next_page_token
        if not token:
            return pages
        assert len(pages) < 50, "paging does not end"


def listed_ids(stub: Stub, namespace: str, status: int = pb.TASK_STATUS_UNSPECIFIED) -> list[str]:
    return [t.task_id for page in list_all(stub, namespace, status, page_size=100) for t in page]


def rpc_error(call: Callable[..., Any], request: Any, timeout: float = RPC_TIMEOUT) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    return info.value  # type: ignore[return-value]


def ms(ts: Any) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


@pytest.fixture(scope="module")
def cql(module_config: Config) -> Iterator[Session]:
    """A plain CQL session on the module's keyspace, to look behind the API."""
    cluster = new_cluster(module_config)
    try:
        yield cluster.connect(module_config.keyspace)
    finally:
        cluster.shutdown()


# -- schedule, poll, cancel, list ---------------------------------------------


def test_schedule_then_poll_round_trip(task_stub: Stub) -> None:
    ns = new_ns()
    before = now_ms()
    reply = schedule(task_stub, ns, delay_s=90, payload=b"\x00\x01binary")
    after = now_ms()
    assert reply.created
    task_id = uuid.UUID(reply.task_id)  # a real UUID
    # run_at = the server's now + delay; both clocks are this machine's.
    assert before + 90_000 - 5 <= ms(reply.run_at) <= after + 90_000 + 5

    view = poll(task_stub, str(task_id))
    assert view.task_id == str(task_id)
    assert view.namespace == ns and view.type == "email.send"
    assert view.status == pb.SCHEDULED
    assert ms(view.run_at) == ms(reply.run_at)
    assert view.HasField("created_at") and before - 5 <= ms(view.created_at) <= after + 5
    assert not view.HasField("started_at") and not view.HasField("finished_at")
    assert (view.attempt, view.max_attempts, view.priority) == (1, 3, 5)  # the defaults
    assert not view.cancel_requested and view.lease_token == 0 and not view.lease_owner


def test_schedule_keeps_what_was_asked(task_stub: Stub) -> None:
    ns = new_ns()
    run_at = now_ms() + 7_200_000
    s = spec(ns, type_="report:build-v2", delay_s=None, priority=0, has_priority=True)
    s.run_at.FromMilliseconds(run_at)
    s.retry_policy.maximum_attempts = 7
    reply = task_stub.ScheduleTask(pb.ScheduleTaskRequest(task=s), timeout=RPC_TIMEOUT)
    view = poll(task_stub, reply.task_id)
    assert ms(view.run_at) == run_at
    assert (view.type, view.priority, view.max_attempts) == ("report:build-v2", 0, 7)


def test_list_pages_newest_first_and_filters_by_status(task_stub: Stub) -> None:
    ns = new_ns()
    created = [schedule(task_stub, ns, payload=str(i).encode()).task_id for i in range(5)]
    views = {tid: poll(task_stub, tid) for tid in created}

    pages = list_all(task_stub, ns, page_size=2)
    ids = [t.task_id for page in pages for t in page]
    assert [len(p) for p in pages[:3]] == [2, 2, 1] and all(not p for p in pages[3:])
    assert sorted(ids) == sorted(created) and len(ids) == len(set(ids)), "every task exactly once"
    newest_first = sorted(created, key=lambda tid: (ms(views[tid].created_at), uuid.UUID(tid)), reverse=True)
    assert ids == newest_first
    assert ids[0] == created[-1] and ids[-1] == created[0]

    for tid in created[1:3]:
        assert task_stub.CancelTask(pb.CancelTaskRequest(task_id=tid), timeout=RPC_TIMEOUT).task.status == pb.CANCELLED
    cancelled = [t.task_id for page in list_all(task_stub, ns, pb.CANCELLED, page_size=2) for t in page]
    scheduled = [t.task_id for page in list_all(task_stub, ns, pb.SCHEDULED, page_size=2) for t in page]
    assert cancelled == [created[2], created[1]]
    assert scheduled == [created[4], created[3], created[0]]
    assert listed_ids(task_stub, ns, pb.SUCCEEDED) == []
    # The listing shows the current status (read from the task rows).
    statuses = {t.task_id: t.status for page in list_all(task_stub, ns, page_size=2) for t in page}
    assert statuses == {tid: pb.CANCELLED if tid in created[1:3] else pb.SCHEDULED for tid in created}


def test_small_and_large_tasks_are_both_written_and_listed(task_stub: Stub) -> None:
    """A small new row goes with its listing entry in one batch; a row over
    Cassandra's batch size limit (50 KiB) must go as two writes, or its
    ScheduleTask would fail."""
    ns = new_ns()
    sizes = {schedule(task_stub, ns, payload=b"s" * size).task_id: size for size in (100, 60_000)}
    assert set(listed_ids(task_stub, ns)) == set(sizes)
    for task_id, size in sizes.items():
        request = pb.PollTaskRequest(task_id=task_id, include_payload=True)
        assert len(task_stub.PollTask(request, timeout=RPC_TIMEOUT).task.payload) == size


def test_namespaces_are_separate(task_stub: Stub) -> None:
    a, b = new_ns(), new_ns()
    in_a = {schedule(task_stub, a).task_id for _ in range(2)}
    in_b = {schedule(task_stub, b).task_id}
    assert set(listed_ids(task_stub, a)) == in_a
    assert set(listed_ids(task_stub, b)) == in_b
    assert listed_ids(task_stub, new_ns()) == []


def test_cancel_scheduled_task_then_again(task_stub: Stub) -> None:
    ns = new_ns()
    task_id = schedule(task_stub, ns).task_id
    before = now_ms()
    view = task_stub.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=RPC_TIMEOUT).task
    assert view.status == pb.CANCELLED and view.task_id == task_id
    polled = poll(task_stub, task_id)
    assert polled.status == pb.CANCELLED
    assert polled.HasField("finished_at") and ms(polled.finished_at) >= before - 5
    assert polled.error  # says why it ended

    err = rpc_error(task_stub.CancelTask, pb.CancelTaskRequest(task_id=task_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert task_id in err.details() and "CANCELLED" in err.details()
    assert poll(task_stub, task_id).status == pb.CANCELLED


def test_poll_and_cancel_of_unknown_task_is_not_found(task_stub: Stub) -> None:
    unknown = str(uuid.uuid4())
    for call, request in (
        (task_stub.PollTask, pb.PollTaskRequest(task_id=unknown)),
        (task_stub.CancelTask, pb.CancelTaskRequest(task_id=unknown)),
    ):
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert unknown in err.details()


# -- idempotency ----------------------------------------------------------------


def test_same_key_same_request_is_one_task(task_stub: Stub) -> None:
    ns = new_ns()
    request = pb.ScheduleTaskRequest(task=spec(ns, payload=b"charge 10 EUR"), idempotency_key="order-42/charge")
    first = task_stub.ScheduleTask(request, timeout=RPC_TIMEOUT)
    second = task_stub.ScheduleTask(request, timeout=RPC_TIMEOUT)
    assert first.created and not second.created
    assert second.task_id == first.task_id
    assert ms(second.run_at) == ms(first.run_at)  # the stored task's, not a new "now + delay"
    assert listed_ids(task_stub, ns) == [first.task_id]


def test_same_key_different_request_is_already_exists(task_stub: Stub) -> None:
    ns = new_ns()
    first = schedule(task_stub, ns, key="k-1", payload=b"one")
    request = pb.ScheduleTaskRequest(task=spec(ns, payload=b"two"), idempotency_key="k-1")
    err = rpc_error(task_stub.ScheduleTask, request)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key" in err.details() and first.task_id in err.details()
    assert listed_ids(task_stub, ns) == [first.task_id]


def test_same_key_in_another_namespace_is_another_task(task_stub: Stub) -> None:
    a, b = new_ns(), new_ns()
    in_a = schedule(task_stub, a, key="shared-key")
    in_b = schedule(task_stub, b, key="shared-key")
    assert in_a.created and in_b.created and in_a.task_id != in_b.task_id
    assert poll(task_stub, in_b.task_id).namespace == b
    assert listed_ids(task_stub, a) == [in_a.task_id] and listed_ids(task_stub, b) == [in_b.task_id]


# -- bad input ----------------------------------------------------------------


def _snapshot(cql: Session) -> dict[str, set[Any]]:
    """Everything the API can write, for a before/after comparison (small module keyspace)."""
    return {
        "tasks": {r.task_id for r in cql.execute("SELECT task_id FROM tasks")},
        "due": {(r.task_id, r.kind) for r in cql.execute("SELECT task_id, kind FROM due_index")},
        "keys": {(r.namespace, r.idem_key) for r in cql.execute("SELECT namespace, idem_key FROM idempotency_keys")},
        "listing": {r.task_id for r in cql.execute("SELECT task_id FROM tasks_by_namespace")},
    }


def test_bad_input_gets_a_clear_status_and_writes_nothing(task_stub: Stub, task_service: Any, cql: Session) -> None:
    ns = new_ns()
    now = now_ms()
    good = schedule(task_stub, ns, key="good-1")  # a key and a task that bad requests must not disturb
    before = _snapshot(cql)

    def sched(key: str = "", **kw: Any) -> tuple[Callable[..., Any], Any]:
        return task_stub.ScheduleTask, pb.ScheduleTaskRequest(task=spec(ns, **kw), idempotency_key=key)

    def sched_at(at_ms: int) -> tuple[Callable[..., Any], Any]:
        s = spec(ns, delay_s=None)
        s.run_at.FromMilliseconds(at_ms)
        return task_stub.ScheduleTask, pb.ScheduleTaskRequest(task=s, idempotency_key="bad-when")

    def retry(attempts: int) -> tuple[Callable[..., Any], Any]:
        s = spec(ns)
        s.retry_policy.maximum_attempts = attempts
        return task_stub.ScheduleTask, pb.ScheduleTaskRequest(task=s, idempotency_key="bad-attempts")

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    unknown = str(uuid.uuid4())
    cases: list[tuple[str, tuple[Callable[..., Any], Any], grpc.StatusCode, str]] = [
        ("empty type", sched(type_="", key="bad-type"), invalid, "type"),
        ("bad characters in type", sched(type_="send mail!"), invalid, "type"),
        ("type starting with a digit", sched(type_="1send"), invalid, "type"),
        ("payload over 1 MiB", sched(payload=b"x" * (1024 * 1024 + 1), key="bad-payload"), invalid, "payload"),
        ("priority 10", sched(priority=10, has_priority=True), invalid, "priority"),
        ("priority -1", sched(priority=-1, has_priority=True), invalid, "priority"),
        ("max attempts 101", retry(101), invalid, "maximum_attempts"),
        ("run_at 2 days ago", sched_at(now - 2 * 86_400_000), invalid, "run_at"),
        ("run_at 2 years ahead", sched_at(now + 2 * 366 * 86_400_000), invalid, "run_at"),
        ("empty namespace", (task_stub.ScheduleTask, pb.ScheduleTaskRequest(task=spec(""))), invalid, "namespace"),
        ("bad namespace", (task_stub.ScheduleTask, pb.ScheduleTaskRequest(task=spec("a b"))), invalid, "namespace"),
        ("idempotency key with a space", sched(key="has space"), invalid, "idempotency_key"),
        ("malformed task id (poll)", (task_stub.PollTask, pb.PollTaskRequest(task_id="not-a-uuid")), invalid, "task_id"),
        ("empty task id (cancel)", (task_stub.CancelTask, pb.CancelTaskRequest(task_id="")), invalid, "task_id"),
        ("unknown task id (poll)", (task_stub.PollTask, pb.PollTaskRequest(task_id=unknown)), grpc.StatusCode.NOT_FOUND, unknown),
        ("unknown task id (cancel)", (task_stub.CancelTask, pb.CancelTaskRequest(task_id=unknown)), grpc.StatusCode.NOT_FOUND, unknown),
        ("bad page token", (task_stub.ListTasks, pb.ListTasksRequest(namespace=ns, page_token="garbage!")), invalid, "page_token"),
        ("page size over the limit", (task_stub.ListTasks, pb.ListTasksRequest(namespace=ns, page_size=100_000)), invalid, "page_size"),
        ("list without namespace", (task_stub.ListTasks, pb.ListTasksRequest()), invalid, "namespace"),
    ]
    wrong = []
    for name, (call, request), code, word in cases:
        try:
            call(request, timeout=RPC_TIMEOUT)
            wrong.append(f"{name}: accepted")
        except grpc.RpcError as err:
            if err.code() != code or word not in (err.details() or ""):
                wrong.append(f"{name}: {err.code().name} {err.details()!r}, wanted {code.name} naming {word!r}")
    assert not wrong, "\n".join(wrong)

    # Nothing half-written: not a task row, a due entry, a key or a listing row.
    assert _snapshot(cql) == before
    # The server still serves, and a good request (even with a key a bad request used) works.
    assert task_service.is_running()
    again = schedule(task_stub, ns, key="bad-type", type_="fixed.type")
    assert again.created
    assert set(listed_ids(task_stub, ns)) == {good.task_id, again.task_id}


# -- crash-safe write order (in-process, real Cassandra, injected fault) -----------


class InsertFailsOnce(CassandraStore):
    """The real store, except that the next ``insert_task`` raises StoreUnavailable
    once, after checking in Cassandra that the due entry was already written:
    a crash (or a lost connection) between the two writes."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.fail_inserts = 0
        self.calls: list[str] = []

    async def add_due(self, entry: DueEntry) -> None:
        self.calls.append("add_due")
        await super().add_due(entry)

    async def claim_idempotency_key(self, namespace: str, key: str, record: Any) -> Any:
        self.calls.append("claim_idempotency_key")
        return await super().claim_idempotency_key(namespace, key, record)

    async def insert_task(self, task: Task, new_id: bool = False, write_id: uuid.UUID | None = None) -> bool:
        self.calls.append("insert_task")
        if self.fail_inserts:
            self.fail_inserts -= 1
            assert await due_entries_of(self, task.task_id, task.shard), "the due entry must be written first"
            raise StoreUnavailable("injected: connection lost before the task insert")
        return await super().insert_task(task, new_id, write_id)


async def due_entries_of(store: CassandraStore, task_id: uuid.UUID, shard: int) -> list[DueEntry]:
    now = now_ms()
    entries = await store.read_due(shard, now - 600_000, now + 600_000, store._cfg.due_bucket_s)
    return [e for e in entries if e.task_id == task_id]


def new_task(namespace: str, shards: int = 64) -> Task:
    task_id = uuid.uuid4()
    now = now_ms()
    return Task(
        task_id=task_id,
        namespace=namespace,
        type="crash.test",
        payload=b"p",
        shard=shard_of(task_id, shards),
        created_at=now,
        run_at=now + 5_000,
        first_run_at=now + 5_000,
    )


@pytest.fixture
async def faulty_store(module_config: Config) -> AsyncIterator[InsertFailsOnce]:
    store = InsertFailsOnce(module_config)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


async def test_crash_between_due_entry_and_task_row_loses_nothing(faulty_store: InsertFailsOnce) -> None:
    life = Lifecycle(faulty_store)
    task = new_task(new_ns())
    faulty_store.fail_inserts = 1
    with pytest.raises(Unavailable):
        await life.schedule(task)
    assert faulty_store.calls == ["add_due", "insert_task"]
    # Not accepted (the client saw UNAVAILABLE) and not half-created: no task row...
    assert await faulty_store.get_task(task.task_id) is None
    assert await faulty_store.get_task(task.task_id, serial=True) is None
    # ...only the orphan due entry, which the trigger drops once it finds no task.
    (orphan,) = await due_entries_of(faulty_store, task.task_id, task.shard)
    assert orphan.kind == DueEntry.RUN and orphan.due_at == task.run_at

    # The same store works on: the client's retry (no key: a new task) is accepted.
    retry = new_task(task.namespace)
    assert (await life.schedule(retry)).created
    assert (await faulty_store.get_task(retry.task_id)) is not None


async def test_key_bound_then_insert_fails_retry_creates_the_reserved_task(faulty_store: InsertFailsOnce) -> None:
    life = Lifecycle(faulty_store)
    ns = new_ns()
    first = new_task(ns)
    faulty_store.fail_inserts = 1
    with pytest.raises(Unavailable):
        await life.schedule(first, "retry-me", b"hash-1")
    assert faulty_store.calls == ["claim_idempotency_key", "add_due", "insert_task"]
    assert await faulty_store.get_task(first.task_id, serial=True) is None

    # The client retries the same request: validation gave it a fresh id, the key maps it back.
    retry = new_task(ns)
    outcome = await life.schedule(retry, "retry-me", b"hash-1", shards=64)
    assert outcome.created
    assert outcome.task.task_id == first.task_id
    stored = await faulty_store.get_task(first.task_id, serial=True)
    assert stored is not None and stored.namespace == ns
    assert stored.shard == shard_of(first.task_id, 64)  # placed by the reserved id, not the retry's
    assert await faulty_store.get_task(retry.task_id) is None
    assert await due_entries_of(faulty_store, first.task_id, stored.shard)

    # A third retry finds the task; a different request with the key is refused.
    again = await life.schedule(new_task(ns), "retry-me", b"hash-1")
    assert not again.created and again.task.task_id == first.task_id
    with pytest.raises(AlreadyExists):
        await life.schedule(new_task(ns), "retry-me", b"hash-2")


async def test_plain_creation_never_overrides_a_later_conditional_write(faulty_store: InsertFailsOnce) -> None:
    """A key-less schedule creates its row with a plain insert (no Paxos round).
    Stamped older than any conditional write, it can never shadow one: not
    even when the very same insert is delivered again after a claim (a driver
    retry, a slow duplicate) — with an ordinary "now" timestamp this replay
    would put the running task back to SCHEDULED and let it run twice."""
    life = Lifecycle(faulty_store)
    task = new_task(new_ns()).replace(run_at=now_ms(), first_run_at=now_ms())
    assert (await life.schedule(task)).created
    lease = await life.claim(task.task_id, "w1", attempt=1)
    assert await faulty_store.insert_task(task, new_id=True)  # the replayed creation
    stored = await faulty_store.get_task(task.task_id, serial=True)
    assert stored is not None
    assert (stored.status.value, stored.lease_token, stored.lease_owner) == ("RUNNING", lease.token, "w1")
    # Only a conditional write can move it on, as before.
    assert await life.complete(task.task_id, lease.token, b"done") is not None
    done = await faulty_store.get_task(task.task_id, serial=True)
    assert done is not None and done.status.value == "SUCCEEDED"


# -- schema ---------------------------------------------------------------------


EXPECTED_TABLES = {"tasks", "due_index", "idempotency_keys", "tasks_by_namespace", "shard_checkpoints", "schema_migrations", "secrets"}


def _keyspace_meta(cfg: Config) -> tuple[Any, set[str]]:
    cluster = new_cluster(cfg)
    try:
        cluster.connect()
        meta = cluster.metadata.keyspaces[cfg.keyspace]
        return meta.replication_strategy, set(meta.tables)
    finally:
        cluster.shutdown()


def test_schema_apply_is_idempotent(infra: LocalInfra) -> None:
    cfg = infra.config.with_overrides(keyspace=keyspace_for("schema_idem"))
    try:
        first = schema.apply(cfg)
        assert [m.version for m in first] == [m.version for m in schema.load_migrations()] and first
        assert schema.apply(cfg) == []  # nothing left to apply
        strategy, tables = _keyspace_meta(cfg)
        assert EXPECTED_TABLES <= tables
    finally:
        schema.drop_keyspace(cfg)


def test_keyspace_replication_comes_from_config(infra: LocalInfra, module_config: Config) -> None:
    strategy, _ = _keyspace_meta(module_config)  # default config: SimpleStrategy:1
    assert type(strategy).__name__ == "SimpleStrategy" and strategy.replication_factor == 1

    cluster = new_cluster(infra.config)
    try:
        dc = cluster.connect().execute("SELECT data_center FROM system.local").one().data_center
    finally:
        cluster.shutdown()
    cfg = infra.config.with_overrides(keyspace=keyspace_for("schema_nts"), replication=f"NetworkTopologyStrategy:{dc}=1")
    try:
        assert schema.apply(cfg)
        strategy, tables = _keyspace_meta(cfg)
        assert type(strategy).__name__ == "NetworkTopologyStrategy"
        assert strategy.dc_replication_factors == {dc: 1}
        assert EXPECTED_TABLES <= tables
    finally:
        schema.drop_keyspace(cfg)
