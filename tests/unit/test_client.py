"""leasesched.client without a cluster: request building, conversions, and the
retry / wait / paging behaviour against a scripted TaskService served over real
gRPC in this process (so the client's own channel, token interceptor and
error codes are the real ones; only the server's answers are made up)."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from leasesched.client import (
    AsyncClient,
    CallRetry,
    Client,
    ClientError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    TaskStatus,
    TaskView,
    Timeouts,
    UnavailableError,
    WaitTimeoutError,
    schedule_request,
)
from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

FAST = CallRetry(initial_backoff=dt.timedelta(milliseconds=10), max_backoff=dt.timedelta(milliseconds=50))
UTC = dt.timezone.utc


# ---------------------------------------------------------------- a scripted server


@dataclass
class Scripted(pb_grpc.TaskServiceServicer):
    """Answers each method's queued failures first, then succeeds; records every request."""

    failures: dict[str, list[grpc.StatusCode]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[str, list[object]] = field(default_factory=lambda: defaultdict(list))
    metadata: list[dict[str, str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # PollTask answers in turn (the last one repeats)
    cancelled: bool = False
    pages: list[list[str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.requests[method].append(request)
            self.metadata.append({k: v for k, v in context.invocation_metadata()})
            code = self.failures[method].pop(0) if self.failures[method] else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")

    def ScheduleTask(self, request: pb.ScheduleTaskRequest, context: grpc.ServicerContext) -> pb.ScheduleTaskResponse:
        self._enter("ScheduleTask", request, context)
        # The real server: the same key and request give the same id.
        return pb.ScheduleTaskResponse(task_id=str(uuid.uuid5(uuid.NAMESPACE_OID, request.idempotency_key)), created=True)

    def PollTask(self, request: pb.PollTaskRequest, context: grpc.ServicerContext) -> pb.PollTaskResponse:
        self._enter("PollTask", request, context)
        with self.lock:
            status = self.statuses.pop(0) if len(self.statuses) > 1 else (self.statuses or [pb.RUNNING])[0]
        if self.cancelled:
            status = pb.CANCELLED
        return pb.PollTaskResponse(task=view(request.task_id, status))

    def CancelTask(self, request: pb.CancelTaskRequest, context: grpc.ServicerContext) -> pb.CancelTaskResponse:
        with self.lock:
            already, self.cancelled = self.cancelled, True
        if already:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"task {request.task_id} is already CANCELLED")
        self._enter("CancelTask", request, context)  # a failure scripted here comes after the cancel applied
        return pb.CancelTaskResponse(task=view(request.task_id, pb.CANCELLED))

    def ListTasks(self, request: pb.ListTasksRequest, context: grpc.ServicerContext) -> pb.ListTasksResponse:
        self._enter("ListTasks", request, context)
        index = int(request.page_token.removeprefix("opaque:")) if request.page_token else 0
        nxt = f"opaque:{index + 1}" if index + 1 < len(self.pages) else ""
        return pb.ListTasksResponse(tasks=[view(t, pb.SCHEDULED) for t in self.pages[index]], next_page_token=nxt)


def view(task_id: str, status: int) -> pb.TaskView:
    v = pb.TaskView(task_id=task_id, namespace="default", type="t", status=status, attempt=1, max_attempts=3)
    if status == pb.SUCCEEDED:
        v.result = b"the result"
        v.finished_at.FromDatetime(dt.datetime(2026, 12, 2, 12, 0, tzinfo=UTC))
    return v


@pytest.fixture
def server() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TaskServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        srv.stop(0)


def client(target: str, **kwargs: object) -> Client:
    kwargs.setdefault("call_retry", FAST)
    return Client(target, config=Config(), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- retries


def test_schedule_retried_on_unavailable_sends_the_same_key_and_request(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.failures["ScheduleTask"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with client(target) as c:
        task_id = c.schedule("report.build", b"x", delay=dt.timedelta(seconds=5))
    sent = fake.requests["ScheduleTask"]
    assert len(sent) == 3
    keys = {r.idempotency_key for r in sent}  # type: ignore[attr-defined]
    assert len(keys) == 1 and "" not in keys, "every retry carries the one generated key"
    assert len({r.SerializeToString(deterministic=True) for r in sent}) == 1, "the same request, byte for byte"  # type: ignore[attr-defined]
    assert task_id == str(uuid.uuid5(uuid.NAMESPACE_OID, keys.pop()))


async def test_async_schedule_retried_on_unavailable_keeps_a_given_key(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.failures["ScheduleTask"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    async with AsyncClient(target, config=Config(), call_retry=FAST) as c:
        await c.schedule("report.build", idempotency_key="order-17")
    assert [r.idempotency_key for r in fake.requests["ScheduleTask"]] == ["order-17"] * 3  # type: ignore[attr-defined]


def test_resource_exhausted_and_cancelled_are_retried(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.failures["PollTask"] = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED]
    with client(target) as c:
        assert c.poll(str(uuid.uuid4())).status is TaskStatus.RUNNING
    assert len(fake.requests["PollTask"]) == 3


def test_other_codes_raise_a_typed_error_at_once(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.failures["ScheduleTask"] = [grpc.StatusCode.INVALID_ARGUMENT]
    fake.failures["PollTask"] = [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED]
    with client(target) as c:
        with pytest.raises(InvalidArgumentError) as bad:
            c.schedule("t")
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.details == "scripted INVALID_ARGUMENT"
        with pytest.raises(NotFoundError):
            c.poll(str(uuid.uuid4()))
        with pytest.raises(ClientError) as other:
            c.poll(str(uuid.uuid4()))
        assert type(other.value) is ClientError and other.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(fake.requests["ScheduleTask"]) == 1 and len(fake.requests["PollTask"]) == 2


def test_retries_stop_at_the_budget(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.failures["PollTask"] = [grpc.StatusCode.UNAVAILABLE] * 1000
    retry = CallRetry(initial_backoff=dt.timedelta(milliseconds=10), max_backoff=dt.timedelta(milliseconds=50),
                      max_elapsed=dt.timedelta(seconds=0.5))  # fmt: skip
    started = time.monotonic()
    with client(target, call_retry=retry) as c, pytest.raises(UnavailableError) as gone:
        c.poll(str(uuid.uuid4()))
    assert gone.value.code == grpc.StatusCode.UNAVAILABLE
    # The retry helper (backoff) times its budget on the wall clock, truncating its last
    # wait to the budget; measured here on the monotonic one, the two may differ by a
    # fraction of a millisecond (CI: 0.4996 s), so the lower bound has a margin.
    assert 0.45 <= time.monotonic() - started < 3.0
    assert len(fake.requests["PollTask"]) > 3


# ---------------------------------------------------------------- configuration


def test_target_and_token_come_from_the_config(server: tuple[Scripted, str]) -> None:
    fake, target = server
    host, port = target.rsplit(":", 1)
    cfg = Config.from_env({"LEASESCHED_BIND_HOST": host, "LEASESCHED_TASK_SERVICE_PORT": port, "LEASESCHED_TOKEN": "lsk_env"})
    with Client(config=cfg) as c:
        assert c.target == target
        c.poll(str(uuid.uuid4()))
    with Client(config=cfg, token="lsk_given") as c:
        c.poll(str(uuid.uuid4()))
    assert [m.get("authorization") for m in fake.metadata] == ["Bearer lsk_env", "Bearer lsk_given"]


# ---------------------------------------------------------------- wait, cancel, list


def test_wait_returns_the_final_state(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.statuses = [pb.SCHEDULED, pb.RUNNING, pb.SUCCEEDED]
    with client(target) as c:
        final = c.wait(str(uuid.uuid4()), timeout=10)
    assert final.status is TaskStatus.SUCCEEDED and final.result == b"the result"
    assert final.finished_at == dt.datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert len(fake.requests["PollTask"]) == 3


def test_wait_polls_less_and_less_often_and_times_out(server: tuple[Scripted, str]) -> None:
    fake, target = server  # the task stays RUNNING
    started = time.monotonic()
    with client(target) as c, pytest.raises(TimeoutError) as timed_out:
        c.wait(str(uuid.uuid4()), timeout=dt.timedelta(seconds=1.0))
    elapsed = time.monotonic() - started
    assert isinstance(timed_out.value, WaitTimeoutError) and timed_out.value.last.status is TaskStatus.RUNNING
    assert 1.0 <= elapsed < 2.0
    # At 0, 0.05, 0.15, 0.35, 0.75 and 1.0 s: six polls (a fixed 50 ms would be twenty).
    assert 5 <= len(fake.requests["PollTask"]) <= 7, len(fake.requests["PollTask"])


async def test_async_wait_times_out(server: tuple[Scripted, str]) -> None:
    fake, target = server
    async with AsyncClient(target, config=Config(), call_retry=FAST) as c:
        with pytest.raises(WaitTimeoutError):
            await c.wait(str(uuid.uuid4()), timeout=0.4)
    assert 3 <= len(fake.requests["PollTask"]) <= 6


def test_cancel_whose_answer_was_lost_returns_the_cancelled_task(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.failures["CancelTask"] = [grpc.StatusCode.UNAVAILABLE]  # applied, then the answer is lost
    with client(target) as c:
        assert c.cancel(str(uuid.uuid4())).status is TaskStatus.CANCELLED
        # Without a retry of ours, "already cancelled" is the caller's business.
        with pytest.raises(FailedPreconditionError):
            c.cancel(str(uuid.uuid4()))


def test_list_follows_the_page_tokens_to_the_end(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.pages = [["a", "b"], ["c", "d"], ["e"]]
    with client(target) as c:
        ids = [t.task_id for t in c.list(status=TaskStatus.SCHEDULED, page_size=2)]
    assert ids == ["a", "b", "c", "d", "e"]
    sent = fake.requests["ListTasks"]
    assert [r.page_token for r in sent] == ["", "opaque:1", "opaque:2"]  # type: ignore[attr-defined]
    assert {(r.namespace, r.status, r.page_size) for r in sent} == {("default", pb.SCHEDULED, 2)}  # type: ignore[attr-defined]


async def test_async_list_follows_the_page_tokens(server: tuple[Scripted, str]) -> None:
    fake, target = server
    fake.pages = [["a"], ["b"]]
    async with AsyncClient(target, config=Config(), call_retry=FAST, namespace="ns") as c:
        ids = [t.task_id async for t in c.list()]
    assert ids == ["a", "b"]
    assert {r.namespace for r in fake.requests["ListTasks"]} == {"ns"}  # type: ignore[attr-defined]


# ---------------------------------------------------------------- pure logic


def test_schedule_request_carries_every_option() -> None:
    request = schedule_request(
        "email.send", b"hi", namespace="ns", delay=dt.timedelta(seconds=90), priority=0,
        retry_policy=RetryPolicy(initial_interval=dt.timedelta(milliseconds=500), backoff_coefficient=1.5,
                                 maximum_interval=dt.timedelta(seconds=20), maximum_attempts=7,
                                 non_retryable_error_types=["ValueError"]),
        timeouts=Timeouts(schedule_to_start=dt.timedelta(seconds=1), start_to_close=dt.timedelta(seconds=2),
                          schedule_to_close=dt.timedelta(seconds=3)),
        lease_duration=dt.timedelta(seconds=4), idempotency_key="k1",
    )  # fmt: skip
    spec = request.task
    assert (spec.namespace, spec.type, spec.payload, request.idempotency_key) == ("ns", "email.send", b"hi", "k1")
    assert spec.WhichOneof("when") == "delay" and spec.delay.ToMilliseconds() == 90_000
    assert spec.has_priority and spec.priority == 0, "priority 0 is sent as a priority, not as 'unset'"
    rp = spec.retry_policy
    assert (rp.initial_interval.ToMilliseconds(), rp.backoff_coefficient, rp.maximum_interval.ToMilliseconds()) == (500, 1.5, 20_000)
    assert rp.maximum_attempts == 7 and list(rp.non_retryable_error_types) == ["ValueError"]
    t = spec.timeouts
    assert (t.schedule_to_start.seconds, t.start_to_close.seconds, t.schedule_to_close.seconds) == (1, 2, 3)
    assert spec.lease_duration.seconds == 4


def test_schedule_request_defaults_are_left_to_the_server() -> None:
    first = schedule_request("t", namespace="ns")
    second = schedule_request("t", namespace="ns")
    spec = first.task
    assert not spec.has_priority and spec.WhichOneof("when") is None
    assert spec.retry_policy == pb.RetryPolicy() and spec.timeouts == pb.Timeouts() and not spec.HasField("lease_duration")
    assert first.idempotency_key and first.idempotency_key != second.idempotency_key, "a fresh key per call"
    at = dt.datetime(2027, 1, 1, 8, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert schedule_request("t", namespace="ns", run_at=at).task.run_at.ToDatetime(tzinfo=UTC) == at


def test_schedule_request_refuses_local_mistakes() -> None:
    with pytest.raises(ValueError, match="not both"):
        schedule_request("t", namespace="ns", run_at=dt.datetime.now(UTC), delay=dt.timedelta(seconds=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule_request("t", namespace="ns", run_at=dt.datetime(2027, 1, 1))


def test_task_view_from_pb() -> None:
    raw = view("id-1", pb.SUCCEEDED)
    raw.progress.percent, raw.progress.message, raw.error_type = 100.0, "done", ""
    task = TaskView.from_pb(raw)
    assert task.status is TaskStatus.SUCCEEDED and task.terminal and task.result == b"the result"
    assert task.progress.percent == 100.0 and task.progress.message == "done"
    assert task.started_at is None and task.lease_expires_at is None, "unset times are None, not 1970"
    assert not TaskView.from_pb(view("id-2", pb.RUNNING)).terminal
    unserved = view("id-3", pb.SCHEDULED)
    unserved.no_worker_for_type = True
    assert TaskView.from_pb(unserved).no_worker_for_type and not task.no_worker_for_type
