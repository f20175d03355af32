"""``concurrency_key`` end to end over the in-memory store (issue 15): checked
like other names, stored with the task, shown by PollTask and ListTasks, part
of the idempotency hash, and known to the trigger without an extra read on
both ways a due task reaches it (the scan reads the row anyway; TaskService's
creation hint carries it)."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any, Sequence

import pytest
from click.testing import CliRunner

from leasesched.cli import task_cmd
from leasesched.client import TaskView, schedule_request
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.lifecycle import Lifecycle, run_entry
from leasesched.model import DueEntry, Task, now_ms
from leasesched.server.schedule_validation import action_from_pb
from leasesched.server.validation import request_hash, validate_schedule
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from services.due_notifier import DueNotifier
from services.task_service import TaskService
from tests.unit.test_cli_task import TASK_ID, FakeStub, scheduled, view
from tests.unit.waiting import wait_until
from trigger.dispatcher import Dispatcher, Ready
from trigger.main import Trigger
from trigger.scanner import ScanSettings, ShardScanner

NOW = 1_800_000_000_000


def req(**task_fields: Any) -> pb.ScheduleTaskRequest:
    return pb.ScheduleTaskRequest(task=pb.TaskSpec(namespace="ns", type="t", **task_fields))


# ---------------------------------------------------------------- validation


def test_a_good_key_is_kept_and_empty_means_none() -> None:
    assert validate_schedule(req(concurrency_key="partner-7:eu.1"), Config(), 64, NOW).concurrency_key == "partner-7:eu.1"
    assert validate_schedule(req(), Config(), 64, NOW).concurrency_key == ""
    assert validate_schedule(req(concurrency_key="k" * 64), Config(), 64, NOW).concurrency_key == "k" * 64


@pytest.mark.parametrize("key", ["a b", "k\n", "-lead", "k" * 65, "é", "a/b"])
def test_a_bad_key_is_refused_naming_the_field(key: str) -> None:
    with pytest.raises(InvalidArgument, match="concurrency_key"):
        validate_schedule(req(concurrency_key=key), Config(), 64, NOW)


def test_the_idempotency_hash_includes_the_key_and_is_unchanged_without_one() -> None:
    assert request_hash(req(concurrency_key="a")) != request_hash(req(concurrency_key="b"))
    assert request_hash(req(concurrency_key="a")) != request_hash(req())
    assert request_hash(req(concurrency_key="")) == request_hash(req())  # old requests hash as before


def test_a_schedule_action_keeps_its_key() -> None:
    """Schedules carry the key since issue 15's keys for schedules
    (tests/unit/test_schedule_actions.py has the rest)."""
    assert action_from_pb(pb.TaskSpec(type="t", concurrency_key="p1"), "ns", Config(), NOW).concurrency_key == "p1"


# ---------------------------------------------------------------- TaskService


async def test_schedule_poll_and_list_round_trip_and_the_hint_carries_the_key() -> None:
    store = MemoryStore()
    hinted: list[Task] = []

    async def notify(task: Task, write_id: object = None) -> None:
        hinted.append(task)

    service = TaskService(Config(), Lifecycle(store), shards=64, notify_due=notify)
    reply: Any = await service.ScheduleTask(req(concurrency_key="partner-7"), None)  # type: ignore[arg-type]
    again: Any = await service.ScheduleTask(req(), None)  # type: ignore[arg-type]
    assert store.tasks[uuid.UUID(reply.task_id)].concurrency_key == "partner-7"
    polled: Any = await service.PollTask(pb.PollTaskRequest(task_id=reply.task_id), None)  # type: ignore[arg-type]
    assert polled.task.concurrency_key == "partner-7"
    listed: Any = await service.ListTasks(pb.ListTasksRequest(namespace="ns"), None)  # type: ignore[arg-type]
    assert {v.task_id: v.concurrency_key for v in listed.tasks} == {reply.task_id: "partner-7", again.task_id: ""}
    assert [t.concurrency_key for t in hinted] == ["partner-7", ""]


async def test_the_due_notifier_puts_the_key_in_the_hint() -> None:
    notifier = DueNotifier(None, Config())  # type: ignore[arg-type]
    notifier._owner_of = {3: "trigger:1"}
    sent: list[pb.NotifyDueRequest] = []

    async def send(address: str, hints: Sequence[pb.NotifyDueRequest], timeout: float) -> None:
        sent.extend(hints)

    notifier._send = send  # type: ignore[method-assign]
    task = Task(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=3, run_at=NOW, concurrency_key="p9")
    await notifier(task)
    await wait_until(lambda: sent)
    assert sent[0].concurrency_key == "p9" and sent[0].namespace == "ns"


# ---------------------------------------------------------------- trigger


class Recording(Dispatcher):
    """A dispatcher that records what it is offered."""

    def __init__(self) -> None:
        super().__init__(5.0, self._unclaimed)
        self.offered: list[Ready] = []

    async def _unclaimed(self, ready: Ready) -> bool:
        return False

    def offer(self, ready: Ready) -> None:
        self.offered.append(ready)
        super().offer(ready)


def settings() -> ScanSettings:
    return ScanSettings(
        bucket_s=10, interval_s=0.05, lookahead_ms=2000, settle_ms=100, orphan_grace_ms=30_000, lease_grace_ms=0, start_ms=0
    )


async def test_the_scan_path_takes_the_key_from_the_row_it_reads() -> None:
    store = MemoryStore()
    dispatcher = Recording()
    scanner = ShardScanner(0, Lifecycle(store), dispatcher, settings())
    now = now_ms()
    task = Task(task_id=uuid.uuid4(), namespace="ns", type="t", payload=b"", shard=0, created_at=now, run_at=now, concurrency_key="p1")
    await Lifecycle(store).schedule(task)
    store.reads = 0
    scanner.notify_entry(run_entry(task, now))
    await wait_until(lambda: dispatcher.offered)
    assert dispatcher.offered[0].group == "p1" and store.reads == 1  # the one read the scan path makes anyway
    scanner.stop()


async def test_the_hint_path_takes_the_key_from_the_hint_without_a_read() -> None:
    store = MemoryStore()
    trigger = Trigger(Config(), Lifecycle(store), settings())
    trigger.dispatcher = dispatcher = Recording()
    trigger.set_owned(frozenset({2}))
    try:
        store.reads = 0
        hint = pb.NotifyDueRequest(
            task_id=str(uuid.uuid4()), shard=2, attempt=1, lease_token=0, priority=5, type="t", namespace="ns", concurrency_key="p2"
        )
        hint.run_at.FromMilliseconds(now_ms())
        trigger.due_hint(hint)
        assert [r.group for r in dispatcher.offered] == ["p2"]
        assert store.reads == 0
    finally:
        trigger.stop()


def test_dispatcher_ready_carries_the_group() -> None:
    ready = Recording().make_ready(uuid.uuid4(), "ns", "t", 1, 0, 5, NOW, 0, on_done=lambda: None, group="g")
    assert ready.group == "g"
    entry = DueEntry(shard=0, due_at=NOW, task_id=ready.task_id, kind=DueEntry.RUN)
    assert entry.kind == DueEntry.RUN  # the due index itself carries no key: the row or the hint does


# ---------------------------------------------------------------- client and CLI


def test_the_client_sends_and_shows_the_key() -> None:
    assert schedule_request("t", namespace="ns", concurrency_key="p3").task.concurrency_key == "p3"
    assert schedule_request("t", namespace="ns").task.concurrency_key == ""
    view = TaskView.from_pb(pb.TaskView(task_id="x", status=pb.SCHEDULED, concurrency_key="p3"))
    assert view.concurrency_key == "p3"


def test_the_cli_sends_the_key_and_poll_shows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeStub()

    @contextlib.contextmanager
    def open_stub(target: str, cfg: Config, service: Any = None) -> Any:
        yield fake

    monkeypatch.setattr(task_cmd, "open_stub", open_stub)
    result = CliRunner().invoke(task_cmd.task, ["schedule", "demo.echo", "--concurrency-key", "partner-7"], obj=Config())
    assert result.exit_code == 0, result.output
    assert scheduled(fake).task.concurrency_key == "partner-7"
    fake.replies["PollTask"] = [pb.PollTaskResponse(task=view(concurrency_key="partner-7"))]
    shown = CliRunner().invoke(task_cmd.task, ["poll", TASK_ID], obj=Config())
    assert "concurrency_key=partner-7" in shown.output, shown.output
