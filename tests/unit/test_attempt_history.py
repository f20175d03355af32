"""Issue 16, attempt history: every attempt of a task is recorded by the
lifecycle (claim → RUNNING, each end → its outcome), bounded per task, never
failing the state change it describes; lease losses are counted on the task
row and flag it stuck. GetTaskHistory, the client and ``leasesched task
history`` show it (the real TaskService over the in-memory store, served over
real gRPC in this process)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from leasesched import history as hist
from leasesched.attempt_history import AttemptHistory
from leasesched.cli import task_cmd
from leasesched.client import Client, InvalidArgumentError, NotFoundError
from leasesched.config import Config
from leasesched.errors import FailedPrecondition, Unavailable
from leasesched.gates import Gate
from leasesched.history import AttemptOutcome, HistoryEntry, HistoryKind
from leasesched.lifecycle import Lifecycle
from leasesched.model import RetryPolicy, Task, now_ms
from leasesched.observability import metrics
from leasesched.states import TaskStatus
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.convert import task_view
from services.task_service import TaskService
from tests.unit.served import served

O = AttemptOutcome


def new_task(**kw: Any) -> Task:
    now = now_ms()
    base: dict[str, Any] = dict(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"p", shard=3,
                                created_at=now, run_at=now, first_run_at=now)  # fmt: skip
    base.update(kw)
    return Task(**base)


async def attempts(life: Lifecycle, task_id: uuid.UUID) -> list[HistoryEntry]:
    """The task's ATTEMPT entries, oldest first, as GetTaskHistory shows them
    (the running attempt from the row)."""
    current = await life.get(task_id)
    return [e for e in reversed(await life.history.read(task_id, current=current)) if e.kind is HistoryKind.ATTEMPT]


async def claim_due(life: Lifecycle, task_id: uuid.UUID, worker: str) -> int:
    current = await life.get(task_id)
    return (await life.claim(task_id, worker, current.attempt, now=max(now_ms(), current.run_at))).token


def failures() -> float:
    return metrics.history_write_failures._value.get()  # type: ignore[attr-defined, no-any-return]


# ---------------------------------------------------------------- each outcome


async def test_the_running_attempt_is_shown_from_the_row_and_the_claim_writes_nothing(store: MemoryStore, life: Lifecycle) -> None:
    """Issue 17: one history write per attempt (at its end): the attempt that
    runs is the task row, shown with its live progress."""
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.heartbeat(task.task_id, lease.token, 30.0, "a third")
    assert store.history.get(task.task_id, {}) == {}
    [entry] = await attempts(life, task.task_id)
    assert (entry.outcome, entry.worker_id, entry.lease_token, entry.attempt) == (O.RUNNING, "w1", lease.token, 1)
    assert entry.started_at == lease.task.started_at and entry.ended_at is None
    assert (entry.progress_percent, entry.progress_message) == (30.0, "a third")
    assert await life.history.read(task.task_id) == []  # without the row: only what was written


async def test_a_completion_writes_succeeded_and_the_last_progress(life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.heartbeat(task.task_id, lease.token, 40.0, "step 4 of 10")
    assert await life.history.read(task.task_id) == []  # neither the claim nor a heartbeat writes history
    before = now_ms()
    assert await life.complete(task.task_id, lease.token, b"ok") == TaskStatus.SUCCEEDED
    [entry] = await attempts(life, task.task_id)
    assert entry.outcome is O.SUCCEEDED and entry.lease_token == lease.token and entry.worker_id == "w1"
    assert entry.progress_message == "step 4 of 10" and entry.progress_percent == 100.0
    assert entry.ended_at is not None and entry.ended_at >= before
    assert entry.started_at == lease.task.started_at


async def test_a_completion_reads_nothing_writes_no_entry_and_the_row_is_the_succeeded_attempt(store: MemoryStore) -> None:
    """Issue 17: a succeeded attempt is the task row (SUCCEEDED is final), so
    a completion is its one conditional write: no read, no history entry, in
    whichever process it lands. The worker's last progress message, sent
    with the completion, is written into the row and shown; without it the
    last heartbeat's stays."""
    claimer, elsewhere = Lifecycle(store), Lifecycle(store)
    reads: list[uuid.UUID] = []
    get_task = store.get_task

    async def counting_get_task(task_id: uuid.UUID, *args: Any, **kw: Any) -> Any:
        reads.append(task_id)
        return await get_task(task_id, *args, **kw)

    store.get_task = counting_get_task  # type: ignore[method-assign]
    for completer, sent, shown in ((claimer, "done: 10 of 10", "done: 10 of 10"), (elsewhere, None, "step 4 of 10")):
        task = (await claimer.schedule(new_task())).task
        lease = await claimer.claim(task.task_id, "w1", 1)
        await claimer.heartbeat(task.task_id, lease.token, 40.0, "step 4 of 10")
        reads.clear()
        assert await completer.complete(task.task_id, lease.token, b"ok", progress_message=sent) == TaskStatus.SUCCEEDED
        assert reads == [] and store.history.get(task.task_id, {}) == {}
        [entry] = await attempts(claimer, task.task_id)
        assert (entry.outcome, entry.worker_id, entry.attempt, entry.lease_token) == (O.SUCCEEDED, "w1", 1, lease.token)
        assert (entry.started_at, entry.progress_percent, entry.progress_message) == (lease.task.started_at, 100.0, shown)
        assert entry.ended_at == (await claimer.get(task.task_id)).finished_at


async def test_an_entry_written_for_the_succeeded_attempt_is_shown_once(store: MemoryStore, life: Lifecycle) -> None:
    """A version before this one wrote the SUCCEEDED entry: the row's own
    view of that attempt (same lease token) is not added beside it."""
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.complete(task.task_id, lease.token, b"ok")
    done = await life.get(task.task_id)
    await life.history.ended(lease.task, O.SUCCEEDED, done.finished_at or 0)
    assert len(store.history[task.task_id]) == 1
    [entry] = await attempts(life, task.task_id)
    assert (entry.outcome, entry.lease_token) == (O.SUCCEEDED, lease.token)


async def test_failures_then_success_are_three_attempts(life: Lifecycle) -> None:
    policy = RetryPolicy(initial_interval_ms=1, maximum_attempts=3)
    task = (await life.schedule(new_task(retry=policy))).task
    for worker in ("w1", "w2"):
        token = await claim_due(life, task.task_id, worker)
        await life.heartbeat(task.task_id, token, 10.0, f"{worker} got far")
        assert (await life.fail(task.task_id, token, "connection reset", "IOError")).status == TaskStatus.SCHEDULED
    token = await claim_due(life, task.task_id, "w3")
    await life.complete(task.task_id, token, b"ok")
    got = await attempts(life, task.task_id)
    assert [(e.attempt, e.lease_token, e.worker_id, e.outcome) for e in got] == [
        (1, 1, "w1", O.FAILED), (2, 2, "w2", O.FAILED), (3, 3, "w3", O.SUCCEEDED),
    ]  # fmt: skip
    assert (got[0].error_type, got[0].error, got[0].progress_message) == ("IOError", "connection reset", "w1 got far")
    assert got[0].ended_at is not None and got[0].ended_at <= got[1].started_at


async def test_the_last_failure_is_failed_too(life: Lifecycle) -> None:
    task = (await life.schedule(new_task(retry=RetryPolicy(maximum_attempts=1)))).task
    lease = await life.claim(task.task_id, "w1", 1)
    assert (await life.fail(task.task_id, lease.token, "no", "BadInput", non_retryable=True)).status == TaskStatus.FAILED
    [entry] = await attempts(life, task.task_id)
    assert (entry.outcome, entry.error_type, entry.error) == (O.FAILED, "BadInput", "no")


async def test_timeouts_are_timed_out(life: Lifecycle) -> None:
    # start_to_close: the worker stops the handler and reports it (worker/execution.py).
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.fail(task.task_id, lease.token, "start_to_close of 1.0 s exceeded", "StartToCloseTimeout")
    [entry] = await attempts(life, task.task_id)
    assert (entry.outcome, entry.error_type) == (O.TIMED_OUT, "StartToCloseTimeout")
    # schedule_to_close passing while it runs: the trigger fails it.
    task = (await life.schedule(new_task())).task
    await life.claim(task.task_id, "w1", 1)
    assert await life.fail_deadline(await life.get(task.task_id), "schedule_to_close of 5 ms exceeded")
    [entry] = await attempts(life, task.task_id)
    assert (entry.outcome, entry.error_type, entry.error) == (O.TIMED_OUT, "DeadlineExceeded", "schedule_to_close of 5 ms exceeded")


async def test_a_deadline_of_a_waiting_task_ends_no_attempt(life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    assert await life.fail_deadline(task, "schedule_to_start of 5 ms exceeded")
    assert await life.history.read(task.task_id) == []


async def test_cancel_release_and_rate_limited(store: MemoryStore, life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.cancel(task.task_id)
    await life.acknowledge_cancel(task.task_id, lease.token, "stopped")
    assert [e.outcome for e in await attempts(life, task.task_id)] == [O.CANCELLED]

    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.release(task.task_id, lease.token)
    assert [e.outcome for e in await attempts(life, task.task_id)] == [O.RELEASED]

    await store.insert_gate(Gate(namespace="ns", name="api", rate=5.0, burst=5))
    task = (await life.schedule(new_task(gate="api"))).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.rate_limited(task.task_id, lease.token, 5000, "HTTP 429", "HTTP429")
    [entry] = await attempts(life, task.task_id)
    assert (entry.outcome, entry.error_type, entry.error) == (O.RATE_LIMITED, "HTTP429", "HTTP 429")


async def test_a_lost_lease_is_recorded_and_counted_on_the_row(life: Lifecycle) -> None:
    task = (await life.schedule(new_task(lease_ms=1000, retry=RetryPolicy(maximum_attempts=5)))).task
    for n in (1, 2, 3):
        token = await claim_due(life, task.task_id, f"w{n}")
        running = await life.get(task.task_id)
        assert await life.expire_lease(running, now=(running.lease_expires_at or 0) + 1) == TaskStatus.SCHEDULED
        stored = await life.get(task.task_id)
        assert stored.lease_losses == n
        assert task_view(stored, stuck_lease_losses=3).stuck is (n >= 3)
        assert task_view(stored, stuck_lease_losses=3).lease_losses == n
    token = await claim_due(life, task.task_id, "w4")
    await life.complete(task.task_id, token, b"ok")
    got = await attempts(life, task.task_id)
    assert [(e.worker_id, e.outcome) for e in got] == [
        ("w1", O.LEASE_LOST), ("w2", O.LEASE_LOST), ("w3", O.LEASE_LOST), ("w4", O.SUCCEEDED),
    ]  # fmt: skip
    assert got[0].error_type == "LeaseExpired"
    assert (await life.get(task.task_id)).lease_losses == 3  # a completion keeps the count
    assert not task_view(await life.get(task.task_id), stuck_lease_losses=0).stuck  # 0: never stuck


async def test_a_lost_lease_on_the_last_attempt_or_with_a_cancel_request_counts_too(life: Lifecycle) -> None:
    task = (await life.schedule(new_task(lease_ms=1000, retry=RetryPolicy(maximum_attempts=1)))).task
    lease = await life.claim(task.task_id, "w1", 1)
    assert await life.expire_lease(await life.get(task.task_id), now=lease.expires_at + 1) == TaskStatus.FAILED
    assert (await life.get(task.task_id)).lease_losses == 1
    assert [e.outcome for e in await attempts(life, task.task_id)] == [O.LEASE_LOST]
    task = (await life.schedule(new_task(lease_ms=1000))).task
    lease = await life.claim(task.task_id, "w1", 1)
    await life.cancel(task.task_id)
    assert await life.expire_lease(await life.get(task.task_id), now=lease.expires_at + 1) == TaskStatus.CANCELLED
    assert (await life.get(task.task_id)).lease_losses == 1


# ---------------------------------------------------------------- only after the change, never failing it


async def test_no_entry_for_a_change_that_did_not_happen(store: MemoryStore, life: Lifecycle) -> None:
    task = (await life.schedule(new_task())).task
    lease = await life.claim(task.task_id, "w1", 1)
    store.fail_next.add("update_task")
    with pytest.raises(Unavailable):
        await life.complete(task.task_id, lease.token, b"ok")
    with pytest.raises(FailedPrecondition):
        await life.complete(task.task_id, lease.token + 1, b"stale")  # not the holder
    assert [e.outcome for e in await attempts(life, task.task_id)] == [O.RUNNING]
    other = (await life.schedule(new_task())).task
    store.fail_next.add("update_task")
    with pytest.raises(Unavailable):
        await life.claim(other.task_id, "w1", 1)
    assert await life.history.read(other.task_id) == []


async def test_a_failed_history_write_fails_neither_the_rpc_nor_the_state_change(store: MemoryStore, life: Lifecycle) -> None:
    before = failures()
    # (A completion writes no entry, so none of its writes can fail.)
    for end in ("fail", "expire"):
        task = (await life.schedule(new_task(lease_ms=1000))).task
        lease = await life.claim(task.task_id, "w1", 1)
        store.fail_next.add("add_history")
        if end == "fail":
            assert (await life.fail(task.task_id, lease.token, "boom")).status == TaskStatus.SCHEDULED
        else:
            running = await life.get(task.task_id)
            assert await life.expire_lease(running, now=lease.expires_at + 1) == TaskStatus.SCHEDULED
        assert await attempts(life, task.task_id) == []  # a gap, never a wrong line: the change stands
    assert failures() == before + 2


# ---------------------------------------------------------------- the bound


async def test_the_history_is_bounded(store: MemoryStore) -> None:
    life = Lifecycle(store, lease_grace_ms=0, history_max_entries=5)
    task = (await life.schedule(new_task())).task
    for n in range(1, 24):
        lease = await life.claim(task.task_id, "w", 1, now=now_ms() + n)
        await life.release(task.task_id, lease.token)
        assert len(store.history[task.task_id]) <= 5 + life.history.trim_every
    shown = await life.history.read(task.task_id)
    assert [e.lease_token for e in shown] == [23, 22, 21, 20, 19]  # the newest, newest first
    assert len(await life.history.read(task.task_id, limit=2)) == 2
    assert len(await life.history.read(task.task_id, limit=500)) == 5  # never past the bound
    assert min(key[1] for key in store.history[task.task_id]) > "a" + f"{10:020d}"  # the old ones were removed


async def test_a_trim_removes_older_entries_only(store: MemoryStore) -> None:
    tid = uuid.uuid4()
    for at in range(10):
        await store.add_history(HistoryEntry(tid, HistoryKind.ATTEMPT, started_at=1000 + at, lease_token=at + 1))
    await store.trim_history(tid, 4)
    assert sorted(e.lease_token for e in store.history[tid].values()) == [7, 8, 9, 10]
    await store.trim_history(tid, 40)
    assert len(store.history[tid]) == 4


def test_the_bound_must_be_positive(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="history_max_entries"):
        AttemptHistory(store, 0)


# ---------------------------------------------------------------- the proto mirrors the contract


def test_the_proto_enums_name_every_outcome_and_operation() -> None:
    assert {f"HISTORY_OUTCOME_{o.value}" for o in hist.AttemptOutcome} == set(pb.HistoryOutcome.keys()) - {"HISTORY_OUTCOME_UNSPECIFIED"}
    assert {f"HISTORY_OPERATION_{o.value}" for o in hist.Operation} == set(pb.HistoryOperation.keys()) - {
        "HISTORY_OPERATION_UNSPECIFIED"
    }


# ---------------------------------------------------------------- GetTaskHistory, the client, the CLI


@pytest.fixture
def cluster() -> Iterator[tuple[str, Lifecycle, asyncio.AbstractEventLoop]]:
    """TaskService over the in-memory store, served in this process: its address,
    its lifecycle, and a loop of this thread to drive the lifecycle with."""
    store = MemoryStore()
    life = Lifecycle(store, lease_grace_ms=0, history_max_entries=10)
    cfg = Config(stuck_lease_losses=2, history_max_entries=10)
    service = TaskService(cfg, life, shards=64)
    loop = asyncio.new_event_loop()
    with served(pb_grpc.add_TaskServiceServicer_to_server, service, "leasesched.v1.TaskService") as address:
        yield address, life, loop
    loop.close()


def _a_task_with_history(life: Lifecycle, loop: asyncio.AbstractEventLoop) -> uuid.UUID:
    async def make() -> uuid.UUID:
        task = (await life.schedule(new_task(lease_ms=1000, retry=RetryPolicy(initial_interval_ms=1)))).task
        for worker in ("w1", "w2"):
            await claim_due(life, task.task_id, worker)
            running = await life.get(task.task_id)
            await life.expire_lease(running, now=(running.lease_expires_at or 0) + 1)
        token = await claim_due(life, task.task_id, "w3")
        await life.heartbeat(task.task_id, token, 50.0, "half\nway")
        await life.fail(task.task_id, token, "bad\x1b[31m input", "ValueError", non_retryable=True)
        return task.task_id

    return loop.run_until_complete(make())


def test_the_client_shows_the_history_and_poll_the_stuck_flag(cluster: tuple[str, Lifecycle, Any]) -> None:
    address, life, loop = cluster
    task_id = _a_task_with_history(life, loop)
    with Client(address, config=Config()) as client:
        lines = client.history(str(task_id))
        assert [(line.attempt, line.worker_id, line.outcome) for line in lines] == [
            (3, "w3", O.FAILED), (2, "w2", O.LEASE_LOST), (1, "w1", O.LEASE_LOST),
        ]  # fmt: skip
        assert lines[0].kind is HistoryKind.ATTEMPT and lines[0].error_type == "ValueError"
        assert lines[0].progress.message == "half\nway" and lines[0].started_at is not None and lines[0].ended_at is not None
        assert len(client.history(str(task_id), limit=1)) == 1
        polled = client.poll(str(task_id))
        assert polled.lease_losses == 2 and polled.stuck  # the service's stuck_lease_losses is 2
        with pytest.raises(NotFoundError):
            client.history(str(uuid.uuid4()))
        with pytest.raises(InvalidArgumentError, match="task_id"):
            client.history("not-a-uuid")
        with pytest.raises(InvalidArgumentError, match="limit"):
            client.history(str(task_id), limit=-1)


def test_the_cli_prints_one_line_per_entry(cluster: tuple[str, Lifecycle, Any]) -> None:
    address, life, loop = cluster
    task_id = _a_task_with_history(life, loop)
    shown = CliRunner().invoke(task_cmd.task, ["--target", address, "history", str(task_id)], obj=Config())
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].split()[:3] == ["ATTEMPT", "TOKEN", "OUTCOME"]
    assert lines[1].split()[:3] == ["3", "3", "FAILED"] and "w3" in lines[1] and "50% half\\nway" in lines[1]
    assert "ValueError: bad\\x1b[31m input" in lines[2]  # control characters shown escaped
    assert lines[3].split()[:3] == ["2", "2", "LEASE_LOST"] and "w2" in lines[3]
    assert lines[5].split()[:3] == ["1", "1", "LEASE_LOST"] and "w1" in lines[5]
    as_json = CliRunner().invoke(task_cmd.task, ["--target", address, "--json", "history", str(task_id)], obj=Config())
    entries = json.loads(as_json.output)["entries"]
    assert [e["outcome"] for e in entries] == ["HISTORY_OUTCOME_FAILED", "HISTORY_OUTCOME_LEASE_LOST", "HISTORY_OUTCOME_LEASE_LOST"]
    assert entries[0]["worker_id"] == "w3" and entries[0]["lease_token"] == "3"
    polled = CliRunner().invoke(task_cmd.task, ["--target", address, "poll", str(task_id)], obj=Config())
    assert "lost 2 time(s)  STUCK" in polled.output
    missing = CliRunner().invoke(task_cmd.task, ["--target", address, "history", str(uuid.uuid4())], obj=Config())
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


async def test_attempts_of_the_same_millisecond_list_the_later_one_first() -> None:
    """A retry with no backoff can be claimed in the millisecond its previous attempt
    started (a fast CI machine did it): the higher lease token is the newer attempt."""
    from leasesched.store.memory import MemoryStore

    store, task_id = MemoryStore(), uuid.uuid4()
    for token in (1, 2):
        await store.add_history(HistoryEntry(task_id=task_id, kind=HistoryKind.ATTEMPT, started_at=1_000, lease_token=token, attempt=token))
    assert [e.lease_token for e in await store.read_history(task_id, 10)] == [2, 1]
