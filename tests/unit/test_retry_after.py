"""Retry-After from a handler to the next run: ``RetryAfter`` raised by a
handler, the worker's FailTask carrying ``retry_after``, the TaskUpdater's
check of it, and the lifecycle scheduling the retry no earlier than asked
(MemoryStore; no servers)."""

from __future__ import annotations

import math
import uuid
from typing import Any, Iterator

import grpc
import pytest

from leasesched import limits
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, RetryPolicy, Task, Timeouts, now_ms
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from services.task_updater import TaskUpdater
from tests.unit.test_execution_stop import FakeUpdater, Harness, harness  # noqa: F401 - the fixture, not a second copy of it
from worker.handlers import RetryAfter, TaskContext


def new_task(**kw: Any) -> Task:
    now = now_ms()
    base: dict[str, Any] = dict(
        task_id=uuid.uuid4(), namespace="ns", type="webhook", payload=b"{}", shard=3, created_at=now, run_at=now, first_run_at=now,
        retry=RetryPolicy(initial_interval_ms=1000, maximum_attempts=5),
    )  # fmt: skip
    base.update(kw)
    return Task(**base)


async def running(life: Lifecycle, **kw: Any) -> tuple[Task, int]:
    task = (await life.schedule(new_task(**kw))).task
    return task, (await life.claim(task.task_id, "w", 1)).token


# ---------------------------------------------------------------- lifecycle


async def test_a_retry_after_longer_than_the_backoff_delays_the_next_run(store: MemoryStore, life: Lifecycle) -> None:
    task, token = await running(life)
    before = now_ms()
    outcome = await life.fail(task.task_id, token, "HTTP 429", "HTTP429", retry_after_ms=7000)
    after = now_ms()
    assert outcome.status == TaskStatus.SCHEDULED and outcome.next_run_at is not None
    assert before + 7000 <= outcome.next_run_at <= after + 7000  # not the 1 s backoff
    view = await life.get(task.task_id)
    assert view.run_at == outcome.next_run_at and view.attempt == 2 and view.error_type == "HTTP429"
    entries = [e for e in store.due if e.kind == DueEntry.RUN and e.attempt == 2]
    assert [e.due_at for e in entries] == [outcome.next_run_at]


async def test_a_retry_after_shorter_than_the_backoff_changes_nothing(life: Lifecycle) -> None:
    task, token = await running(life, retry=RetryPolicy(initial_interval_ms=5000, maximum_attempts=5))
    before = now_ms()
    outcome = await life.fail(task.task_id, token, "HTTP 503", "HTTP503", retry_after_ms=100)
    assert outcome.next_run_at is not None and outcome.next_run_at >= before + 4000  # the backoff (jitter ≤ 20 %)


async def test_a_retry_after_past_schedule_to_close_fails_the_task_now(life: Lifecycle) -> None:
    deadline = now_ms() + 60_000
    task, token = await running(life, timeouts=Timeouts(schedule_to_close_ms=60_000), deadline_at=deadline)
    outcome = await life.fail(task.task_id, token, "HTTP 429 from h", "HTTP429", retry_after_ms=120_000)
    assert outcome.status == TaskStatus.FAILED
    view = await life.get(task.task_id)
    assert view.error.startswith("HTTP 429 from h (not retried: Retry-After of 120 s ends past the task's schedule_to_close")
    # Within the deadline it is retried as asked.
    task, token = await running(life, timeouts=Timeouts(schedule_to_close_ms=60_000), deadline_at=now_ms() + 60_000)
    assert (await life.fail(task.task_id, token, "HTTP 429", "HTTP429", retry_after_ms=30_000)).status == TaskStatus.SCHEDULED


async def test_a_retry_after_does_not_give_an_attempt_back(life: Lifecycle) -> None:
    task, token = await running(life, retry=RetryPolicy(maximum_attempts=1))
    outcome = await life.fail(task.task_id, token, "HTTP 429", "HTTP429", retry_after_ms=1000)
    assert outcome.status == TaskStatus.FAILED


async def test_the_wait_is_bounded_by_the_retry_interval_limit(life: Lifecycle) -> None:
    task, token = await running(life)
    before = now_ms()
    outcome = await life.fail(task.task_id, token, "x", retry_after_ms=int(limits.RETRY_INTERVAL.high) * 3)
    assert outcome.next_run_at is not None and outcome.next_run_at <= now_ms() + limits.RETRY_INTERVAL.high
    assert outcome.next_run_at >= before + limits.RETRY_INTERVAL.high


# ---------------------------------------------------------------- TaskUpdater


class Context:
    """The little of a ServicerContext the TaskUpdater uses (nothing, for FailTask)."""


async def test_the_task_updater_passes_retry_after_and_refuses_bad_values(life: Lifecycle) -> None:
    updater = TaskUpdater(Config(), life)
    task, token = await running(life)
    request = pb.FailTaskRequest(task_id=str(task.task_id), lease_token=token, error="HTTP 429", error_type="HTTP429")
    for bad, message in (
        (dict(seconds=-1), "retry_after must be a non-negative duration"),
        (dict(seconds=0, nanos=-5), "retry_after must be a non-negative duration"),
        (dict(seconds=int(limits.RETRY_INTERVAL.high // 1000) + 1), "retry_after .* is out of range 0..31622400 s"),
    ):
        request.retry_after.seconds = bad.get("seconds", 0)
        request.retry_after.nanos = bad.get("nanos", 0)
        with pytest.raises(InvalidArgument, match=message):
            await updater.FailTask(request, Context())  # type: ignore[arg-type]
    assert (await life.get(task.task_id)).status == TaskStatus.RUNNING  # nothing written
    request.retry_after.FromMilliseconds(9000)
    before = now_ms()
    reply = await updater.FailTask(request, Context())  # type: ignore[arg-type]
    assert reply.status == pb.SCHEDULED and reply.next_run_at.ToMilliseconds() >= before + 9000


async def test_a_fail_without_retry_after_keeps_the_backoff(life: Lifecycle) -> None:
    updater = TaskUpdater(Config(), life)
    task, token = await running(life)
    before = now_ms()
    request = pb.FailTaskRequest(task_id=str(task.task_id), lease_token=token, error="boom")
    reply = await updater.FailTask(request, Context())  # type: ignore[arg-type]
    assert before + 700 <= reply.next_run_at.ToMilliseconds() <= now_ms() + 1000


# ---------------------------------------------------------------- the worker


async def test_the_worker_reports_a_handlers_retry_after(harness: Harness) -> None:
    seen: list[float] = []

    async def handler(ctx: TaskContext) -> bytes:
        seen.append(ctx.start_to_close_s)
        raise RetryAfter(2.0004, "HTTP 429 from h", error_type="HTTP429")

    updater = FakeUpdater(lease_s=30, start_to_close_s=12)
    await harness.execution(handler, updater, mode="async").run()
    (_, method, request), = updater.reports()
    assert method == "FailTask" and not request.non_retryable
    assert (request.error, request.error_type) == ("HTTP 429 from h", "HTTP429")
    assert request.HasField("retry_after") and request.retry_after.ToMilliseconds() == 2001  # rounded up
    assert seen == [12.0]  # the handler knows its start_to_close


async def test_an_ordinary_failure_sends_no_retry_after(harness: Harness) -> None:
    async def handler(ctx: TaskContext) -> bytes:
        raise OSError("boom")

    updater = FakeUpdater(lease_s=30)
    await harness.execution(handler, updater, mode="async").run()
    (_, method, request), = updater.reports()
    assert method == "FailTask" and not request.HasField("retry_after")


def test_retry_after_values_are_finite_and_cut_to_the_limit() -> None:
    assert RetryAfter(-3).seconds == 0
    assert RetryAfter(10**12).milliseconds == limits.RETRY_INTERVAL.high
    assert str(RetryAfter(2)) == "retry after 2 s"
    with pytest.raises(ValueError, match="finite"):
        RetryAfter(math.nan)
    with pytest.raises(ValueError, match="finite"):
        RetryAfter(math.inf)


def asks_to_wait(ctx: TaskContext) -> None:
    """A process-mode handler (module level: the child imports it by name)."""
    raise RetryAfter(3, f"later (start_to_close {ctx.start_to_close_s:g} s)", error_type="HTTP429")


async def test_a_process_handlers_retry_after_crosses_to_the_worker(harness: Harness) -> None:
    updater = FakeUpdater(lease_s=30, start_to_close_s=20)
    await harness.execution(asks_to_wait, updater, mode="process").run()
    (_, method, request), = updater.reports()
    assert method == "FailTask" and request.retry_after.ToMilliseconds() == 3000
    assert (request.error, request.error_type) == ("later (start_to_close 20 s)", "HTTP429")
