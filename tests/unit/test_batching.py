"""Coalesced calls (leasesched/batching.py) and the batch RPCs built on them:
TaskUpdater's ClaimTasks / CompleteTasks (each item exactly its unary call),
the worker's UpdaterClient (batches only what waits; each item's error raised
as the unary call would) and the trigger's NotifyDueBatch (checked whole)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Sequence

import grpc
import pytest

from leasesched.batching import Batch, Coalescer
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.lifecycle import Lifecycle
from leasesched.model import RetryPolicy, Task, now_ms
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.task_updater import TaskUpdater
from tests.unit.served import served
from trigger.service import TriggerService
from worker.updater_client import UpdaterClient


class Recorder:
    """A batch sender that records each batch and holds it until released."""

    def __init__(self) -> None:
        self.batches: list[Batch[int]] = []
        self.gate = asyncio.Event()
        self.fail_items: set[int] = set()
        self.fail_call = False

    async def __call__(self, batch: Batch[int]) -> Sequence[int | BaseException]:
        self.batches.append(batch)
        await self.gate.wait()
        if self.fail_call:
            raise ConnectionError("call failed")
        return [ValueError(f"item {i}") if i in self.fail_items else i * 10 for i in batch.items]


async def test_a_lone_item_leaves_at_once_and_alone() -> None:
    send = Recorder()
    send.gate.set()
    coalescer: Coalescer[int, int] = Coalescer(send, max_batch=10, max_in_flight=1)
    assert await coalescer.submit(1, 5.0) == 10
    assert [list(b.items) for b in send.batches] == [[1]]


async def test_items_that_wait_for_a_call_leave_together_in_order() -> None:
    send = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(send, max_batch=3, max_in_flight=1)
    first = coalescer.submit(0, 5.0)
    await asyncio.sleep(0)  # the sender takes item 0 and its call is out
    later = [coalescer.submit(i, 5.0) for i in range(1, 6)]
    assert coalescer.pending == 5
    send.gate.set()
    assert await asyncio.gather(first, *later) == [0, 10, 20, 30, 40, 50]
    assert [list(b.items) for b in send.batches] == [[0], [1, 2, 3], [4, 5]]  # max_batch bounds a batch


async def test_each_item_gets_its_own_error_and_a_failed_call_fails_its_batch_only() -> None:
    send = Recorder()
    send.fail_items = {2}
    send.gate.set()
    coalescer: Coalescer[int, int] = Coalescer(send, max_batch=10, max_in_flight=1)
    results = await asyncio.gather(*(coalescer.submit(i, 5.0) for i in range(4)), return_exceptions=True)
    assert results[:2] == [0, 10] and results[3] == 30
    assert isinstance(results[2], ValueError) and str(results[2]) == "item 2"
    send.fail_call = True
    with pytest.raises(ConnectionError):
        await coalescer.submit(7, 5.0)
    send.fail_call = False
    assert await coalescer.submit(8, 5.0) == 80  # the coalescer goes on after a failed call


async def test_a_caller_that_gives_up_does_not_cancel_the_batch() -> None:
    send = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(send, max_batch=10, max_in_flight=1)
    blocker = coalescer.submit(0, 5.0)
    await asyncio.sleep(0)
    impatient = asyncio.ensure_future(asyncio.wait_for(coalescer.submit(1, 5.0), 0.01))
    patient = coalescer.submit(2, 5.0)
    with pytest.raises(asyncio.TimeoutError):
        await impatient
    send.gate.set()
    assert await asyncio.gather(blocker, patient) == [0, 20]
    assert [list(b.items) for b in send.batches] == [[0], [1, 2]]  # item 1 was still sent


async def test_a_batch_call_gets_the_shortest_deadline_of_its_items() -> None:
    send = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(send, max_batch=10, max_in_flight=1)
    first = coalescer.submit(0, 9.0)
    await asyncio.sleep(0)
    rest = [coalescer.submit(1, 9.0), coalescer.submit(2, 0.5), coalescer.submit(3, 9.0)]
    send.gate.set()
    await asyncio.gather(first, *rest)
    assert 0.3 < send.batches[1].timeout_s <= 0.5


# ---------------------------------------------------------------- TaskUpdater


class Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None


def new_task() -> Task:
    now = now_ms()
    return Task(
        task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"p", shard=1, created_at=now, run_at=now, first_run_at=now,
        retry=RetryPolicy(maximum_attempts=3),
    )  # fmt: skip


async def test_claim_tasks_answers_each_claim_as_claim_task_would() -> None:
    life = Lifecycle(MemoryStore())
    updater = TaskUpdater(Config(), life)
    tasks = [(await life.schedule(new_task())).task for _ in range(3)]
    request = pb.ClaimTasksRequest(claims=[
        pb.ClaimTaskRequest(task_id=str(tasks[0].task_id), worker_id="w", attempt=1),
        pb.ClaimTaskRequest(task_id=str(uuid.uuid4()), worker_id="w", attempt=1),  # no such task
        pb.ClaimTaskRequest(task_id="not-a-uuid", worker_id="w", attempt=1),
        pb.ClaimTaskRequest(task_id=str(tasks[1].task_id), worker_id="w", attempt=1),
    ])  # fmt: skip
    reply = await updater.ClaimTasks(request, Context())  # type: ignore[arg-type]
    outcomes = [r.WhichOneof("outcome") for r in reply.results]
    assert outcomes == ["claimed", "error", "error", "claimed"]
    assert reply.results[0].claimed.task_id == str(tasks[0].task_id) and reply.results[0].claimed.payload == b"p"
    assert reply.results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert reply.results[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "task_id" in reply.results[2].error.message
    assert (await life.get(tasks[1].task_id)).status == TaskStatus.RUNNING
    assert (await life.get(tasks[2].task_id)).status == TaskStatus.SCHEDULED  # not in the batch: untouched

    token = reply.results[0].claimed.lease_token
    done = await updater.CompleteTasks(pb.CompleteTasksRequest(completions=[
        pb.CompleteTaskRequest(task_id=str(tasks[0].task_id), lease_token=token, result=b"r"),
        pb.CompleteTaskRequest(task_id=str(tasks[1].task_id), lease_token=token + 1000),  # not its lease
    ]), Context())  # type: ignore[arg-type]  # fmt: skip
    assert done.results[0].completed.status == pb.SUCCEEDED
    assert done.results[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert (await life.get(tasks[1].task_id)).status == TaskStatus.RUNNING


@pytest.mark.parametrize("count", [0, 257])
async def test_a_batch_call_with_no_item_or_too_many_is_refused_whole(count: int) -> None:
    life = Lifecycle(MemoryStore())
    updater = TaskUpdater(Config(), life)
    task = (await life.schedule(new_task())).task
    claims = [pb.ClaimTaskRequest(task_id=str(task.task_id), worker_id="w", attempt=1)] * count
    with pytest.raises(InvalidArgument, match=r"claims .* is out of range 1\.\.256"):
        await updater.ClaimTasks(pb.ClaimTasksRequest(claims=claims), Context())  # type: ignore[arg-type]
    assert (await life.get(task.task_id)).status == TaskStatus.SCHEDULED


class CountingUpdater(TaskUpdater):
    """The real TaskUpdater, counting the calls it gets and holding claims a moment."""

    def __init__(self, life: Lifecycle) -> None:
        super().__init__(Config(), life)
        self.calls: list[tuple[str, int]] = []

    async def ClaimTask(self, request: Any, context: Any) -> Any:
        self.calls.append(("ClaimTask", 1))
        await asyncio.sleep(0.05)
        return await super().ClaimTask(request, context)

    async def ClaimTasks(self, request: Any, context: Any) -> Any:
        self.calls.append(("ClaimTasks", len(request.claims)))
        await asyncio.sleep(0.05)
        return await super().ClaimTasks(request, context)


async def test_the_worker_client_batches_what_waits_and_raises_each_items_error() -> None:
    life = Lifecycle(MemoryStore())
    tasks = [(await life.schedule(new_task())).task for _ in range(12)]
    updater = CountingUpdater(life)
    with served(pb_grpc.add_TaskUpdaterServicer_to_server, updater, "leasesched.v1.TaskUpdater") as address:
        client = UpdaterClient(lambda: [address], Config())
        try:
            requests = [pb.ClaimTaskRequest(task_id=str(t.task_id), worker_id="w", attempt=1) for t in tasks]
            requests.append(pb.ClaimTaskRequest(task_id=str(uuid.uuid4()), worker_id="w", attempt=1))
            results = await asyncio.gather(*(client.call("ClaimTask", r) for r in requests), return_exceptions=True)
        finally:
            await client.close()
    claimed = [r for r in results if isinstance(r, pb.ClaimTaskResponse)]
    assert sorted(r.task_id for r in claimed) == sorted(str(t.task_id) for t in tasks)
    missing = results[-1]
    assert isinstance(missing, grpc.aio.AioRpcError) and missing.code() == grpc.StatusCode.NOT_FOUND
    # 4 claims went out alone at once (BATCH_CALLS_IN_FLIGHT); the other 9 waited and left in batches.
    assert sum(n for _, n in updater.calls) == 13
    assert len(updater.calls) < 13 and any(kind == "ClaimTasks" for kind, _ in updater.calls)
    for t in tasks:
        assert (await life.get(t.task_id)).status == TaskStatus.RUNNING


# ---------------------------------------------------------------- trigger


async def test_notify_due_batch_checks_every_hint_before_acting_on_any() -> None:
    hinted: list[pb.NotifyDueRequest] = []
    service = TriggerService(None, hinted.append, logical_shards=8)  # type: ignore[arg-type]
    good = pb.NotifyDueRequest(task_id=str(uuid.uuid4()), shard=2)
    bad = pb.NotifyDueRequest(task_id=str(uuid.uuid4()), shard=99)
    with pytest.raises(InvalidArgument, match=r"hints\[1\]: shard 99 is out of range 0\.\.7"):
        await service.NotifyDueBatch(pb.NotifyDueBatchRequest(hints=[good, bad, good]), None)  # type: ignore[arg-type]
    assert hinted == []
    with pytest.raises(InvalidArgument, match=r"hints 0 entries is out of range"):
        await service.NotifyDueBatch(pb.NotifyDueBatchRequest(), None)  # type: ignore[arg-type]
    await service.NotifyDueBatch(pb.NotifyDueBatchRequest(hints=[good, good]), None)  # type: ignore[arg-type]
    assert hinted == [good, good]
