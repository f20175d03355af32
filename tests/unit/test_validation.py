import pytest
from google.protobuf.duration_pb2 import Duration

from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.model import shard_of
from leasesched.v1 import scheduler_pb2 as pb
from services.validation import check_task_id, request_hash, validate_schedule

NOW = 1_800_000_000_000
CFG = Config(max_payload_bytes=1024)


def req(**task_fields: object) -> pb.ScheduleTaskRequest:
    fields = {"namespace": "ns", "type": "email.send", **task_fields}
    return pb.ScheduleTaskRequest(task=pb.TaskSpec(**fields))


def test_defaults() -> None:
    task = validate_schedule(req(payload=b"x"), CFG, 64, NOW)
    assert task.priority == 5
    assert task.run_at == NOW and task.first_run_at == NOW
    assert task.retry.maximum_attempts == CFG.default_max_attempts
    assert task.retry.initial_interval_ms == 1000 and task.retry.backoff_coefficient == 2.0
    assert task.lease_ms == int(CFG.default_lease_s * 1000)
    assert task.shard == shard_of(task.task_id, 64)
    assert task.deadline_at is None


def test_delay_priority_and_deadline() -> None:
    r = req(delay=Duration(seconds=30), priority=0, has_priority=True)
    r.task.timeouts.schedule_to_close.FromSeconds(60)
    task = validate_schedule(r, CFG, 64, NOW)
    assert task.run_at == NOW + 30_000
    assert task.priority == 0
    assert task.deadline_at == NOW + 90_000


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"type": ""}, "type is required"),
        ({"type": "bad type"}, "type 'bad type' is invalid"),
        ({"type": "9starts-with-digit"}, "is invalid"),
        ({"type": "x" * 200}, "is invalid"),
        ({"namespace": ""}, "namespace is required"),
        ({"namespace": "a/b"}, "namespace 'a/b' is invalid"),
        ({"payload": b"x" * 1025}, "over the limit of 1024"),
        ({"priority": 10}, "priority 10 is out of range"),
        ({"priority": -1, "has_priority": True}, "priority -1 is out of range"),
        ({"delay": Duration(seconds=-5)}, "delay must be a non-negative duration"),
        ({"delay": Duration(seconds=10**9)}, "delay is more than"),
        ({"lease_duration": Duration(seconds=7200)}, "lease_duration must be between"),
    ],
)
def test_bad_input_is_refused_with_a_message(fields: dict, needle: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_schedule(req(**fields), CFG, 64, NOW)
    assert needle in str(err.value)


def test_run_at_far_past_and_future() -> None:
    past = req()
    past.task.run_at.FromMilliseconds(NOW - int(CFG.max_schedule_behind_s * 1000) - 1)
    with pytest.raises(InvalidArgument, match="in the past"):
        validate_schedule(past, CFG, 64, NOW)
    future = req()
    future.task.run_at.FromMilliseconds(NOW + int(CFG.max_schedule_ahead_s * 1000) + 1)
    with pytest.raises(InvalidArgument, match="in the future"):
        validate_schedule(future, CFG, 64, NOW)


@pytest.mark.parametrize(
    "policy,needle",
    [
        (pb.RetryPolicy(maximum_attempts=101), "maximum_attempts 101 is out of range"),
        (pb.RetryPolicy(maximum_attempts=-1), "maximum_attempts -1 is out of range"),
        (pb.RetryPolicy(backoff_coefficient=0.5), "backoff_coefficient 0.5 is out of range"),
        (
            pb.RetryPolicy(initial_interval=Duration(seconds=10), maximum_interval=Duration(seconds=1)),
            "maximum_interval is shorter",
        ),
        (pb.RetryPolicy(non_retryable_error_types=["ok", "not ok"]), "'not ok' is not a valid name"),
    ],
)
def test_bad_retry_policy(policy: pb.RetryPolicy, needle: str) -> None:
    r = req()
    r.task.retry_policy.CopyFrom(policy)
    with pytest.raises(InvalidArgument) as err:
        validate_schedule(r, CFG, 64, NOW)
    assert needle in str(err.value)


def test_allow_list_makes_unknown_types_invalid() -> None:
    cfg = Config(allowed_task_types="email.send, report.build")
    validate_schedule(req(type="report.build"), cfg, 64, NOW)
    with pytest.raises(InvalidArgument, match="type 'other' is unknown"):
        validate_schedule(req(type="other"), cfg, 64, NOW)


def test_bad_idempotency_key() -> None:
    r = req()
    r.idempotency_key = "has space"
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        validate_schedule(r, CFG, 64, NOW)


def test_task_id_must_be_uuid() -> None:
    with pytest.raises(InvalidArgument, match="not a UUID"):
        check_task_id("nope")


def test_request_hash_tells_requests_apart() -> None:
    assert request_hash(req(payload=b"a")) == request_hash(req(payload=b"a"))
    assert request_hash(req(payload=b"a")) != request_hash(req(payload=b"b"))
