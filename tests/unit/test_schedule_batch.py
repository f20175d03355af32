"""ScheduleTasks (issue 17) without a server: TaskService over the in-memory
store (each task its own result, nothing half-written, the same idempotency
and namespace checks as ScheduleTask, bounded concurrency) and the quota
interceptor's per-task charge and weighted concurrency share."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from leasesched.auth import Principal, current_principal
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.lifecycle import Lifecycle, Scheduled
from leasesched.model import Task
from leasesched.server.auth_interceptor import roles_for
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from services.rate_limit import BATCH_IN_FLIGHT, BATCH_METHOD, ConcurrencyShare, QuotaInterceptor, Quotas
from services.task_service import TaskService
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
