"""ScheduleTasks (issue 17) without a server: TaskService over the in-memory
store (each task its own result, nothing half-written, the same idempotency
and namespace checks as ScheduleTask, bounded concurrency) and the quota
interceptor's per-task charge and weighted concurrency share."""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any

import grpc
import pytest

from leasesched.auth import Principal, current_principal
from leasesched.client import AsyncClient, Client, InvalidArgumentError, NewTask
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.lifecycle import Lifecycle, Scheduled
from leasesched.model import Task
from leasesched.server.auth_interceptor import roles_for
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.rate_limit import BATCH_IN_FLIGHT, BATCH_METHOD, ConcurrencyShare, QuotaInterceptor, Quotas
from services.task_service import TaskService
from tests.unit.served import served
from tests.unit.test_client import FAST
from tests.unit.test_rate_limit import Aborted, Clock, FakeContext, refused

Code = grpc.StatusCode


def item(type: str = "t", namespace: str = "ns", key: str = "", payload: bytes = b"") -> pb.ScheduleTaskRequest:
    return pb.ScheduleTaskRequest(task=pb.TaskSpec(namespace=namespace, type=type, payload=payload), idempotency_key=key)


def setup(cfg: Config | None = None) -> tuple[TaskService, MemoryStore]:
    store = MemoryStore()
    return TaskService(cfg or Config(), Lifecycle(store), shards=64), store


async def schedule_tasks(service: TaskService, *items: pb.ScheduleTaskRequest) -> list[pb.ScheduleTaskResult]:
    reply = await service.ScheduleTasks(pb.ScheduleTasksRequest(tasks=items), None)  # type: ignore[arg-type]
    return list(reply.results)


def code(result: pb.ScheduleTaskResult) -> Code:
    if result.WhichOneof("result") == "scheduled":
        return Code.OK
    return next(c for c in Code if c.value[0] == result.error.code)


async def test_each_task_gets_its_own_result_in_order_and_bad_ones_write_nothing() -> None:
    service, store = setup(Config(max_payload_bytes=10))
    results = await schedule_tasks(
        service,
        item(key="k1"),
        item(type="9bad"),
        item(payload=b"x" * 11),
        item(key="k1"),  # the same key and request in the same call: the same task
        item(type="other", key="k1"),  # the same key, another request
        item(),
    )
    assert [code(r) for r in results] == [Code.OK, Code.INVALID_ARGUMENT, Code.INVALID_ARGUMENT, Code.OK, Code.ALREADY_EXISTS, Code.OK]
    assert results[1].error.message.startswith("tasks[1]: type '9bad' is invalid")
    assert results[2].error.message.startswith("tasks[2]: payload is 11 bytes, over the limit of 10")
    assert "tasks[4]: idempotency_key 'k1' was already used" in results[4].error.message
    assert results[0].scheduled.task_id == results[3].scheduled.task_id
    assert sorted([results[0].scheduled.created, results[3].scheduled.created]) == [False, True]
    assert len(store.tasks) == 2  # k1's task and the last one: nothing of the refused ones
    again = await schedule_tasks(service, item(key="k1"))  # and in a later call
    assert again[0].scheduled.task_id == results[0].scheduled.task_id and not again[0].scheduled.created


async def test_a_namespace_the_token_may_not_use_is_refused_for_that_task_only() -> None:
    service, store = setup()
    token = current_principal.set(Principal("t1", "ns", "client"))
    try:
        results = await schedule_tasks(service, item(), item(namespace="other"), item())
    finally:
        current_principal.reset(token)
    assert [code(r) for r in results] == [Code.OK, Code.PERMISSION_DENIED, Code.OK]
    assert results[1].error.message == "tasks[1]: token is not allowed in namespace 'other'"
    assert {t.namespace for t in store.tasks.values()} == {"ns"}


@pytest.mark.parametrize("count", [0, 501])
async def test_no_tasks_or_too_many_is_refused_whole_naming_the_limit(count: int) -> None:
    service, store = setup()
    with pytest.raises(InvalidArgument, match=r"tasks .* out of range 1\.\.500"):
        await schedule_tasks(service, *[item()] * count)
    assert not store.tasks


async def test_tasks_run_concurrently_but_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    service, _ = setup()
    lifecycle = service._lifecycle
    real = lifecycle.schedule
    now, most = 0, 0

    async def slow(task: Task, *args: Any, **kw: Any) -> Scheduled:
        nonlocal now, most
        now += 1
        most = max(most, now)
        await asyncio.sleep(0.001)
        try:
            return await real(task, *args, **kw)
        finally:
            now -= 1

    monkeypatch.setattr(lifecycle, "schedule", slow)
    results = await schedule_tasks(service, *[item()] * 100)
    assert all(code(r) == Code.OK for r in results) and len({r.scheduled.task_id for r in results}) == 100
    assert most == BATCH_IN_FLIGHT


async def test_an_unexpected_error_is_internal_for_its_task_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    service, _ = setup()
    real = service._lifecycle.schedule

    async def flaky(task: Task, *args: Any, **kw: Any) -> Scheduled:
        if task.type == "boom":
            raise RuntimeError("a bug")
        return await real(task, *args, **kw)

    monkeypatch.setattr(service._lifecycle, "schedule", flaky)
    results = await schedule_tasks(service, item(), item(type="boom"), item())
    assert [code(r) for r in results] == [Code.OK, Code.INTERNAL, Code.OK]


def test_schedule_tasks_is_for_the_roles_that_schedule() -> None:
    assert roles_for("/leasesched.v1.TaskService/ScheduleTasks") == roles_for("/leasesched.v1.TaskService/ScheduleTask")
    assert roles_for("/leasesched.v1.TaskService/ScheduleTasks") == {"client", "admin"}


# --------------------------------------------------------------- quotas


def quotas(**kw: Any) -> Quotas:
    base: dict[str, Any] = dict(
        write_rate=2.0, write_burst=3.0, read_rate=3.0, read_burst=3.0,
        max_concurrent_per_caller=20, process_max_concurrent=40, list_page_max=1000,
    )  # fmt: skip
    return Quotas(**{**base, **kw})


async def answer_all(request: pb.ScheduleTasksRequest, context: Any) -> pb.ScheduleTasksResponse:
    """The inner handler: every task it is given scheduled (its index as the id)."""
    reply = pb.ScheduleTasksResponse()
    for index, _ in enumerate(request.tasks):
        reply.results.add().scheduled.task_id = str(index)
    return reply


async def test_the_write_quota_is_charged_per_task_in_order() -> None:
    current_principal.set(Principal("t1", "team-a", "client"))
    interceptor = QuotaInterceptor(quotas(), Clock())
    ctx = FakeContext()
    reply = await interceptor.wrap(answer_all, BATCH_METHOD)(pb.ScheduleTasksRequest(tasks=[item()] * 5), ctx)
    assert [code(r) for r in reply.results] == [Code.OK] * 3 + [Code.RESOURCE_EXHAUSTED] * 2
    assert [r.scheduled.task_id for r in reply.results[:3]] == ["0", "1", "2"]
    message = reply.results[4].error.message
    assert message.startswith("tasks[4]: namespace 'team-a' is over its write rate limit") and "3 of the 5" in message
    assert "retry after 500 ms" in message and dict(ctx.trailing) == {"retry-after-ms": "500"}
    # Not even the first task fits: the call is refused whole, as a ScheduleTask would be.
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await interceptor.wrap(answer_all, BATCH_METHOD)(pb.ScheduleTasksRequest(tasks=[item()] * 2), ctx)
    assert "costs 1 per task" in refused(ctx)


async def test_a_batch_holds_a_slot_per_task_in_progress_cut_to_the_share() -> None:
    current_principal.set(Principal("t1", "team-a", "client"))
    interceptor = QuotaInterceptor(quotas(write_burst=1000.0, max_concurrent_per_caller=20), Clock())
    share = interceptor.state.share
    assert share is not None
    held: list[int] = []

    async def looking(request: pb.ScheduleTasksRequest, context: Any) -> pb.ScheduleTasksResponse:
        held.append(share.held("namespace:team-a"))
        return await answer_all(request, context)

    wrapped = interceptor.wrap(looking, BATCH_METHOD)
    await wrapped(pb.ScheduleTasksRequest(tasks=[item()] * 3), FakeContext())
    await wrapped(pb.ScheduleTasksRequest(tasks=[item()] * 100), FakeContext())
    assert held == [3, BATCH_IN_FLIGHT] and share.held("namespace:team-a") == 0 and share.in_progress == 0
    small = ConcurrencyShare(per_key=4, total=100)
    weight = small.weight("k", BATCH_IN_FLIGHT)
    assert weight == 4 and small.try_acquire("k", weight) is None  # heavier than the share, still passes alone
    assert small.try_acquire("k") is not None
    small.release("k", weight)
    assert small.held("k") == 0 and small.in_progress == 0


# --------------------------------------------------------------- the client


def test_client_schedule_many_gives_a_typed_result_per_task() -> None:
    service, store = setup(Config(max_payload_bytes=10))
    with served(pb_grpc.add_TaskServiceServicer_to_server, service, "leasesched.v1.TaskService") as target:
        with Client(target, config=Config(), namespace="ns") as client:
            tasks = [NewTask("t"), NewTask("9bad"), NewTask("t", idempotency_key="k"), NewTask("t", idempotency_key="k")]
            results = client.schedule_many(tasks)
            many = client.schedule_many([NewTask("t", b"%d" % i) for i in range(501)])  # two calls: 500 + 1
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].code == Code.INVALID_ARGUMENT and results[1].message.startswith("tasks[1]: type '9bad'")
    assert isinstance(results[1].error, InvalidArgumentError) and results[0].error is None
    assert results[2].task_id == results[3].task_id and results[2].created and not results[3].created
    assert results[0].run_at is not None
    assert all(r.ok for r in many) and len({r.task_id for r in many}) == 501 and len(store.tasks) == 2 + 501


class OnceBusy(pb_grpc.TaskServiceServicer):
    """Answers the first call's tasks of type "busy" RESOURCE_EXHAUSTED, later ones OK."""

    def __init__(self) -> None:
        self.calls: list[pb.ScheduleTasksRequest] = []

    def ScheduleTasks(self, request: pb.ScheduleTasksRequest, context: Any) -> pb.ScheduleTasksResponse:
        self.calls.append(request)
        reply = pb.ScheduleTasksResponse()
        for index, task in enumerate(request.tasks):
            result = reply.results.add()
            if task.task.type == "busy" and len(self.calls) == 1:
                result.error.code, result.error.message = Code.RESOURCE_EXHAUSTED.value[0], f"tasks[{index}]: over quota"
            else:
                result.scheduled.task_id = task.idempotency_key
        return reply


def test_client_sends_again_the_tasks_that_got_a_retryable_answer() -> None:
    servicer = OnceBusy()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TaskServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}", config=Config(), call_retry=FAST) as client:
            results = client.schedule_many([NewTask("a"), NewTask("busy"), NewTask("c")])
    finally:
        srv.stop(0)
    assert [r.ok for r in results] == [True, True, True]
    assert len(servicer.calls) == 2 and [t.task.type for t in servicer.calls[1].tasks] == ["busy"]
    assert servicer.calls[1].tasks[0] == servicer.calls[0].tasks[1]  # the same request, key included
    assert results[1].task_id == servicer.calls[0].tasks[1].idempotency_key


async def test_async_client_schedule_many() -> None:
    servicer = OnceBusy()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TaskServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", config=Config(), call_retry=FAST) as client:
            results = await client.schedule_many([NewTask("busy"), NewTask("b", namespace="other")])
    finally:
        srv.stop(0)
    assert [r.ok for r in results] == [True, True] and len(servicer.calls) == 2
    assert [t.task.namespace for t in servicer.calls[0].tasks] == ["default", "other"]
