"""PollTask's cache of finished tasks (TaskService over the in-memory store):
finished answers are served without a read, live ones never are, and a
cached answer is still confined to its namespace."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from leasesched.auth import Principal, current_principal
from leasesched.config import Config
from leasesched.errors import PermissionDenied
from leasesched.lifecycle import Lifecycle
from leasesched.model import Task, now_ms
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from services.poll_cache import FinishedTasks
from services.task_service import TaskService


async def setup(cfg: Config | None = None) -> tuple[TaskService, MemoryStore, Lifecycle]:
    store = MemoryStore()
    life = Lifecycle(store)
    return TaskService(cfg or Config(), life, shards=64), store, life


async def new_task(life: Lifecycle, namespace: str = "ns") -> Task:
    now = now_ms()
    task = Task(task_id=uuid.uuid4(), namespace=namespace, type="t", payload=b"", shard=0, created_at=now, run_at=now)
    await life.schedule(task)
    return task


async def poll(service: TaskService, task: Task) -> pb.TaskView:
    reply: Any = await service.PollTask(pb.PollTaskRequest(task_id=str(task.task_id)), None)  # type: ignore[arg-type]
    return reply.task


async def test_finished_task_is_read_once_live_task_every_time() -> None:
    service, store, life = await setup()
    task = await new_task(life)
    lease = await life.claim(task.task_id, "w", attempt=1)
    await life.heartbeat(task.task_id, lease.token, 40.0, "almost")
    store.reads = 0
    assert (await poll(service, task)).progress.percent == 40.0
    assert store.reads == 1
    await life.heartbeat(task.task_id, lease.token, 60.0, "more")
    store.reads = 0
    assert (await poll(service, task)).progress.percent == 60.0  # live: read again, current
    assert store.reads == 1
    await life.complete(task.task_id, lease.token, b"ok")
    store.reads = 0
    first, second = await poll(service, task), await poll(service, task)
    assert first.status == second.status == pb.SUCCEEDED and second.result == b"ok"
    assert store.reads == 1


async def test_cached_answer_is_still_confined_to_its_namespace() -> None:
    service, _, life = await setup()
    task = await new_task(life, "ns-a")
    await life.cancel(task.task_id)  # final: CANCELLED
    await poll(service, task)  # cached now (auth off)
    token = current_principal.set(Principal("t1", "ns-b", "client"))
    try:
        with pytest.raises(PermissionDenied):
            await poll(service, task)
    finally:
        current_principal.reset(token)
    token = current_principal.set(Principal("t2", "ns-a", "client"))
    try:
        assert (await poll(service, task)).status == pb.CANCELLED
    finally:
        current_principal.reset(token)


async def test_cache_off_and_byte_bound() -> None:
    service, store, life = await setup(Config(poll_cache_mb=0))
    task = await new_task(life)
    await life.cancel(task.task_id)
    store.reads = 0
    await poll(service, task)
    await poll(service, task)
    assert store.reads == 2
    cache = FinishedTasks(max_bytes=2_000)
    views = [pb.TaskView(task_id=str(uuid.uuid4()), result=b"x" * 500) for _ in range(10)]
    for view in views:
        cache.remember(uuid.UUID(view.task_id), view, final=True)
    assert 0 < len(cache) < 10  # oldest evicted by size
    assert cache.get(uuid.UUID(views[-1].task_id)) is views[-1]
    cache.remember(uuid.uuid4(), pb.TaskView(result=b"x" * 5_000), final=True)  # larger than the cache: not kept
    assert cache.get(uuid.UUID(views[-1].task_id)) is views[-1]


async def test_an_operator_retry_is_seen_at_once_here_and_within_the_ttl_elsewhere() -> None:
    """A final answer is final only until an operator retries the task: the
    OperatorService beside this TaskService makes it forget the answer; another
    process's cache lets it go after its TTL."""
    from leasesched.lifecycle import OperatorAction
    from leasesched.versions import version_of
    from services.operator_service import OperatorService

    service, store, life = await setup()
    task = await new_task(life)
    cancelled = await life.cancel(task.task_id)
    assert (await poll(service, task)).status == pb.CANCELLED  # kept now
    operators = OperatorService(Config(), life, on_changed=service.forget_finished)
    request = pb.RetryTaskRequest(task_id=str(task.task_id), expected_version=version_of(cancelled), reason="again")
    await operators.RetryTask(request, None)  # type: ignore[arg-type]
    assert (await poll(service, task)).status == pb.SCHEDULED

    clock = [0.0]
    cache = FinishedTasks(max_bytes=10_000, ttl_s=10.0, timer=lambda: clock[0])
    view = pb.TaskView(task_id=str(task.task_id), status=pb.FAILED)
    cache.remember(task.task_id, view, final=True)
    clock[0] = 9.0
    assert cache.get(task.task_id) is view
    clock[0] = 10.5
    assert cache.get(task.task_id) is None
