"""Issue 16, dead letters: ListTasks' type and time filters, CountTasks, the
dead-letter index the lifecycle keeps, and the trigger's queue-age gauges
(TaskService and Lifecycle over the in-memory store; the Cassandra store's
side is tests/integration/test_dead_letters.py)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from leasesched.cli import task_cmd

from leasesched.config import Config
from leasesched.errors import InvalidArgument, Unavailable
from leasesched.lifecycle import Lifecycle
from leasesched.model import RetryPolicy, Task, now_ms
from leasesched.observability.metrics import QueueByType
from leasesched.states import TaskStatus
from leasesched.store.base import ListQuery
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from services.task_service import TaskService
from tests.unit.test_cli_task import FakeStub, run
from trigger.dispatcher import Dispatcher, Ready

HOUR_MS = 3_600_000


def setup() -> tuple[TaskService, MemoryStore, Lifecycle]:
    store = MemoryStore()
    life = Lifecycle(store)
    return TaskService(Config(), life, shards=64), store, life


async def new_task(life: Lifecycle, task_type: str = "t", created_at: int | None = None, attempts: int = 1) -> Task:
    at = now_ms() if created_at is None else created_at
    task = Task(
        task_id=uuid.uuid4(), namespace="ns", type=task_type, payload=b"", shard=0, created_at=at, run_at=now_ms(),
        retry=RetryPolicy(maximum_attempts=attempts),
    )  # fmt: skip
    await life.schedule(task)
    return task


async def fail(life: Lifecycle, task: Task) -> None:
    lease = await life.claim(task.task_id, "w", attempt=1)
    assert (await life.fail(task.task_id, lease.token, "boom")).status == TaskStatus.FAILED


def ts(ms: int) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    value = Timestamp()
    value.FromMilliseconds(ms)
    return value


async def list_all(service: TaskService, **filters: Any) -> tuple[list[str], int]:
    """Every task id the filters list, page by page (pages of 2); the number of pages."""
    ids: list[str] = []
    token, pages = "", 0
    while True:
        reply: Any = await service.ListTasks(pb.ListTasksRequest(namespace="ns", page_size=2, page_token=token, **filters), None)  # type: ignore[arg-type]
        ids += [t.task_id for t in reply.tasks]
        pages += 1
        token = reply.next_page_token
        if not token:
            return ids, pages


# ---------------------------------------------------------------- ListTasks filters


async def test_type_and_time_filters_page_through_every_match_newest_first() -> None:
    service, _, life = setup()
    base = now_ms() - 10 * HOUR_MS
    tasks = [await new_task(life, "a" if i % 2 else "b", base + i * HOUR_MS) for i in range(8)]
    a_ids, pages = await list_all(service, type="a")
    assert a_ids == [str(t.task_id) for t in reversed(tasks) if t.type == "a"] and pages == 2
    window, _ = await list_all(service, created_after=ts(base + 2 * HOUR_MS), created_before=ts(base + 6 * HOUR_MS))
    assert window == [str(t.task_id) for t in reversed(tasks[2:6])]  # after inclusive, before exclusive
    both, _ = await list_all(service, type="b", created_after=ts(base + 2 * HOUR_MS))
    assert both == [str(t.task_id) for t in reversed(tasks[2:]) if t.type == "b"]


async def test_filters_are_validated() -> None:
    service, _, life = setup()
    await new_task(life)

    async def refused(**fields: Any) -> str:
        with pytest.raises(InvalidArgument) as info:
            await service.ListTasks(pb.ListTasksRequest(namespace="ns", **fields), None)  # type: ignore[arg-type]
        return str(info.value)

    assert "type" in await refused(type="no spaces allowed")
    assert "created_after" in await refused(created_after=ts(2000), created_before=ts(1000))
    assert "created_before" in await refused(created_before=ts(-5000))


async def test_a_token_is_refused_with_other_filters() -> None:
    service, _, life = setup()
    for _ in range(3):
        await new_task(life, "a")
    first: Any = await service.ListTasks(pb.ListTasksRequest(namespace="ns", page_size=1, type="a"), None)  # type: ignore[arg-type]
    assert first.next_page_token
    for other in ({"type": "b"}, {"type": ""}, {"type": "a", "created_after": ts(0)}):
        with pytest.raises(InvalidArgument, match="page_token"):
            await service.ListTasks(pb.ListTasksRequest(namespace="ns", page_size=1, page_token=first.next_page_token, **other), None)  # type: ignore[arg-type]
    again: Any = await service.ListTasks(pb.ListTasksRequest(namespace="ns", page_size=1, type="a", page_token=first.next_page_token), None)  # type: ignore[arg-type]
    assert len(again.tasks) == 1 and again.tasks[0].task_id != first.tasks[0].task_id


async def test_memory_store_type_filter_matches_query_matches() -> None:
    store = MemoryStore()
    life = Lifecycle(store)
    await new_task(life, "a")
    await new_task(life, "b")
    page = await store.list_tasks(ListQuery(namespace="ns", type="b"))
    assert [t.type for t in page.tasks] == ["b"] and page.next_token == ""


# ---------------------------------------------------------------- dead letters


async def count(service: TaskService, **fields: Any) -> Any:
    return await service.CountTasks(pb.CountTasksRequest(namespace="ns", **fields), None)  # type: ignore[arg-type]


async def test_failed_tasks_are_counted_per_type_exactly() -> None:
    service, store, life = setup()
    for task_type, failures in (("a", 3), ("b", 2)):
        for _ in range(failures):
            await fail(life, await new_task(life, task_type))
    await new_task(life, "a")  # SCHEDULED: not a dead letter
    reply = await count(service, status=pb.FAILED)
    assert [(r.type, r.status, r.count) for r in reply.rows] == [("a", pb.FAILED, 3), ("b", pb.FAILED, 2)]
    assert reply.exact and reply.method == pb.FAILED_INDEX and reply.scanned == 5
    only_b = await count(service, status=pb.FAILED, type="b")
    assert [(r.type, r.count) for r in only_b.rows] == [("b", 2)]


async def test_a_retry_that_is_not_final_is_no_dead_letter_and_left_failed_removes_it() -> None:
    service, store, life = setup()
    retried = await new_task(life, "a", attempts=3)
    lease = await life.claim(retried.task_id, "w", attempt=1)
    assert (await life.fail(retried.task_id, lease.token, "again")).status == TaskStatus.SCHEDULED
    dead = await new_task(life, "a")
    await fail(life, dead)
    assert [(r.type, r.count) for r in (await count(service, status=pb.FAILED)).rows] == [("a", 1)]
    # What RetryTask (FAILED → SCHEDULED, another engineer's) calls after its write:
    await life._left_failed(await life.get(dead.task_id))
    assert not (await count(service, status=pb.FAILED)).rows


async def test_a_lost_index_write_is_repaired_by_the_retried_report() -> None:
    service, store, life = setup()
    task = await new_task(life, "a")
    lease = await life.claim(task.task_id, "w", attempt=1)
    store.fail_next.add("add_failed")
    with pytest.raises(Unavailable):
        await life.fail(task.task_id, lease.token, "boom")
    assert (await life.get(task.task_id)).status == TaskStatus.FAILED
    assert not (await count(service, status=pb.FAILED)).rows
    assert (await life.fail(task.task_id, lease.token, "boom")).status == TaskStatus.FAILED  # the worker's retry
    assert [(r.type, r.count) for r in (await count(service, status=pb.FAILED)).rows] == [("a", 1)]


async def test_lease_expiry_and_deadline_failures_are_dead_letters() -> None:
    service, store, life = setup()
    expired = await new_task(life, "lease")
    lease = await life.claim(expired.task_id, "w", attempt=1)
    running = await life.get(expired.task_id)
    assert await life.expire_lease(running, now=lease.expires_at + life.lease_grace_ms + 1) == TaskStatus.FAILED
    late = await new_task(life, "late")
    assert await life.fail_deadline(await life.get(late.task_id), "too late")
    rows = (await count(service, status=pb.FAILED)).rows
    assert [(r.type, r.count) for r in rows] == [("late", 1), ("lease", 1)]


async def test_other_statuses_are_counted_by_a_bounded_scan() -> None:
    service, _, life = setup()
    await new_task(life, "a")
    await new_task(life, "a")
    await fail(life, await new_task(life, "b"))
    reply = await count(service)
    assert [(r.type, r.status, r.count) for r in reply.rows] == [("a", pb.SCHEDULED, 2), ("b", pb.FAILED, 1)]
    assert reply.method == pb.RECENT_SCAN and reply.exact
    with pytest.raises(InvalidArgument, match="type"):
        await count(service, type="bad type")


# ---------------------------------------------------------------- queue age


def ready(task_type: str, run_at: int, group: str = "", priority: int = 5) -> Ready:
    return Ready(
        sort_key=(-priority, run_at, 0), task_id=uuid.uuid4(), namespace="ns", type=task_type, attempt=1, lease_token=0,
        priority=priority, run_at=run_at, shard=0, on_done=lambda: None, group=group,
    )  # fmt: skip


def samples(collector: QueueByType) -> dict[tuple[str, str], float]:
    return {(family.name, s.labels["type"]): s.value for family in collector.collect() for s in family.samples}


def test_queue_age_is_the_oldest_waiting_task_per_type() -> None:
    dispatcher = Dispatcher(5.0, lambda r: None)  # type: ignore[arg-type, return-value]
    now = 1_000_000_000
    dispatcher.offer(ready("a", now - 5_000, group="g1", priority=9))
    dispatcher.offer(ready("a", now - 30_000, group="g2", priority=1))  # the oldest, in another group and level
    dispatcher.offer(ready("b", now - 1_000))
    collector = QueueByType(clock=lambda: now / 1000)
    collector.set_source(dispatcher.queue_by_type)
    got = samples(collector)
    assert got[("leasesched_queue_oldest_age_seconds", "a")] == 30.0
    assert got[("leasesched_queue_oldest_age_seconds", "b")] == 1.0
    assert got[("leasesched_dispatch_queued_by_type", "a")] == 2
    assert got[("leasesched_dispatch_queued_by_type", "b")] == 1


# ---------------------------------------------------------------- CLI


class CountingStub(FakeStub):
    def __init__(self) -> None:
        super().__init__()
        self.replies["CountTasks"] = [
            pb.CountTasksResponse(rows=[pb.CountTasksResponse.Row(type="a", status=pb.FAILED, count=3)], exact=True,
                                  method=pb.FAILED_INDEX, scanned=3)  # fmt: skip
        ]

    def CountTasks(self, request: Any, timeout: float | None = None) -> Any:
        return self._answer("CountTasks", request)


@pytest.fixture
def cli_stub(monkeypatch: pytest.MonkeyPatch) -> CountingStub:
    fake = CountingStub()

    @contextlib.contextmanager
    def open_stub(target: str, cfg: Config, service: Any = None) -> Iterator[CountingStub]:
        yield fake

    monkeypatch.setattr(task_cmd, "open_stub", open_stub)
    return fake


def test_cli_list_sends_type_and_time_range_to_the_server(cli_stub: CountingStub) -> None:
    result = run(["list", "--type", "a", "--since", "2026-12-01T00:00:00Z", "--until", "1h", "--json"])
    assert result.exit_code == 0, result.output
    request = cli_stub.requests["ListTasks"][0]
    assert request.type == "a"
    assert request.created_after.ToDatetime(dt.timezone.utc) == dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    ago = dt.datetime.now(dt.timezone.utc) - request.created_before.ToDatetime(dt.timezone.utc)
    assert dt.timedelta(minutes=59) < ago < dt.timedelta(minutes=61)
    assert run(["list", "--since", "yesterday"]).exit_code == 2


def test_cli_count_prints_rows_and_how_they_were_counted(cli_stub: CountingStub) -> None:
    result = run(["count", "--status", "FAILED", "--type", "a"])
    assert result.exit_code == 0, result.output
    request = cli_stub.requests["CountTasks"][0]
    assert (request.status, request.type) == (pb.FAILED, "a")
    assert "FAILED" in result.stdout and result.stdout.rstrip().endswith("3")
    assert "exact; FAILED_INDEX, 3 rows read" in result.stderr
    assert json.loads(run(["count", "--json"]).stdout)["rows"][0]["count"] == "3"
