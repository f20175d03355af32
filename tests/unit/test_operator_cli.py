"""``leasesched task retry|resume|mark-failed|terminate|bulk``: the requests the
CLI sends, the version it reads when none is given (and says so), and a
refusal's one line. The real calls are in tests/integration/test_operations.py."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from leasesched.cli import task_cmd
from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb

TASK_ID = str(uuid.UUID(int=0x1234))


class Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.FAILED_PRECONDITION

    def details(self) -> str:
        return "expected_version 'old' is not the current version of task ...: it is 'abc'"


class FakeStub:
    """Both services' methods: records each request, answers a view (or raises ``refuse``)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.refuse = False

    def __getattr__(self, method: str) -> Any:
        def answer(request: Any, timeout: float | None = None) -> Any:
            self.requests.append((method, request))
            if self.refuse:
                raise Refused()
            if method == "PollTask":
                return pb.PollTaskResponse(task=pb.TaskView(task_id=TASK_ID, status=pb.FAILED, attempt=3, version="v-now"))
            if method == "BulkOperate":
                return pb.BulkOperateResponse(matched=2, applied=1, conflicts=1, applied_task_ids=[TASK_ID])
            response = getattr(pb, f"{method}Response")
            return response(task=pb.TaskView(task_id=TASK_ID, status=pb.SCHEDULED, version="v-next"))

        return answer


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> FakeStub:
    fake = FakeStub()

    @contextlib.contextmanager
    def open_stub(target: str, cfg: Config, service: Any = None) -> Iterator[FakeStub]:
        yield fake

    monkeypatch.setattr(task_cmd, "open_stub", open_stub)
    return fake


def run(args: list[str]) -> Result:
    return CliRunner().invoke(task_cmd.task, args, obj=Config())


@pytest.mark.parametrize(
    "command, method",
    [("retry", "RetryTask"), ("resume", "ResumeTask"), ("mark-failed", "MarkTaskFailed"), ("terminate", "TerminateTask")],
)
def test_each_action_sends_the_version_and_the_reason(stub: FakeStub, command: str, method: str) -> None:
    result = run([command, TASK_ID, "--version", "v-read", "--reason", "because"])
    assert result.exit_code == 0, result.output
    ((sent, request),) = stub.requests
    assert sent == method and request.expected_version == "v-read" and request.reason == "because"
    assert "v-next" in result.stdout


def test_without_a_version_the_cli_reads_it_and_says_so(stub: FakeStub) -> None:
    result = run(["retry", TASK_ID, "--reason", "fixed", "--payload", '{"x": 1}', "--at", "2030-01-01T00:00:00Z"])
    assert result.exit_code == 0, result.output
    assert [m for m, _ in stub.requests] == ["PollTask", "RetryTask"]
    request = stub.requests[1][1]
    assert request.expected_version == "v-now" and request.has_payload and request.payload == b'{"x": 1}'
    assert request.run_at.seconds == 1893456000
    assert "no --version given: read v-now" in result.stderr and "FAILED" in result.stderr


def test_a_reason_is_required(stub: FakeStub) -> None:
    result = run(["terminate", TASK_ID, "--version", "v"])
    assert result.exit_code == 2 and "--reason" in result.output
    assert stub.requests == []


def test_a_conflict_is_one_line_and_exit_1(stub: FakeStub) -> None:
    stub.refuse = True
    result = run(["mark-failed", TASK_ID, "--version", "old", "--reason", "x"])
    assert result.exit_code == 1
    assert result.stderr.startswith("FAILED_PRECONDITION: expected_version 'old'")


def test_bulk_sends_the_filter_and_prints_the_counts(stub: FakeStub) -> None:
    result = run(["bulk", "retry", "-n", "ns", "--type", "t", "--status", "FAILED", "--max-count", "10", "--rate", "5",
                  "--reason", "outage over", "--created-after", "2026-12-01T00:00:00Z"])  # fmt: skip
    assert result.exit_code == 0, result.output
    ((method, request),) = stub.requests
    assert method == "BulkOperate" and request.operation == pb.BULK_RETRY and request.namespace == "ns"
    assert (request.type, request.status, request.max_count, request.rate_per_second) == ("t", pb.FAILED, 10, 5.0)
    assert request.HasField("created_after") and not request.HasField("created_before")
    assert "matched 2, applied 1, conflicts 1, failed 0" in result.stdout and TASK_ID in result.stdout
    assert run(["bulk", "retry", "--reason", "x"]).exit_code == 2  # --max-count is required


def test_the_client_methods_over_real_grpc() -> None:
    """Client.mark_task_failed / retry_task against a served OperatorService: the
    new TaskView.version comes back, a stale version is FailedPreconditionError."""
    import asyncio

    from leasesched.client import BulkOperation, Client, FailedPreconditionError
    from leasesched.lifecycle import Lifecycle
    from leasesched.model import Task, now_ms
    from leasesched.store.memory import MemoryStore
    from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
    from leasesched.versions import version_of
    from services.operator_service import OperatorService
    from tests.unit.served import served

    store = MemoryStore()
    life = Lifecycle(store)
    now = now_ms()
    task = Task(task_id=uuid.uuid4(), namespace="default", type="t", payload=b"", shard=0, created_at=now,
                run_at=now + 3_600_000)  # fmt: skip
    asyncio.run(life.schedule(task))
    with served(pb_grpc.add_OperatorServiceServicer_to_server, OperatorService(Config(), life),
                "leasesched.v1.OperatorService") as address, Client(address, config=Config()) as client:  # fmt: skip
        with pytest.raises(FailedPreconditionError, match="expected_version"):
            client.mark_task_failed(str(task.task_id), "stale", "x")
        done = client.mark_task_failed(str(task.task_id), version_of(task), "give up")
        assert done.status.value == "FAILED" and done.error_type == "MarkedFailed"
        assert done.version == version_of(store.tasks[task.task_id])
        again = client.retry_task(str(task.task_id), done.version, "try again", payload=b"new")
        assert again.status.value == "SCHEDULED" and again.attempt == 1 and store.tasks[task.task_id].payload == b"new"
        result = client.bulk_operate(BulkOperation.MARK_FAILED, "cleanup", max_count=5, dry_run=True)
        assert (result.matched, result.applied) == (1, 0)
