import pytest
from google.protobuf.duration_pb2 import Duration

from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.model import shard_of
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.server.validation import check_task_id, request_hash, validate_schedule

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
        ({"delay": Duration(seconds=10**9)}, "delay 1000000000 s is out of range 0..31622400 s"),
        ({"lease_duration": Duration(seconds=7200)}, "lease_duration must be between"),
        # set, though under a whole millisecond: not "unset, so the default" (found by the hostile-input test in CI)
        ({"lease_duration": Duration(nanos=1)}, "lease_duration must be between 1 s and 3600 s, not 1e-09 s"),
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
        (pb.RetryPolicy(non_retryable_error_types=["ok", "not ok"]), "entry 'not ok' is invalid"),
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


# ---- bounds derived from storage (issue 9): each of these was accepted and then
# broke a later write or read (a deadline past year 9999, a bigint overflow, a TTL
# over the store's limit).

FAR = Duration(seconds=10**12)
OVERFLOW = Duration(seconds=10**17)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("timeouts.schedule_to_close", FAR, "timeouts.schedule_to_close 1000000000000 s is out of range 0..31622400 s"),
        ("timeouts.start_to_close", OVERFLOW, "timeouts.start_to_close 100000000000000000 s is out of range"),
        ("timeouts.schedule_to_start", OVERFLOW, "timeouts.schedule_to_start 100000000000000000 s is out of range"),
        ("retry_policy.initial_interval", OVERFLOW, "retry_policy.initial_interval 100000000000000000 s is out of range"),
        ("retry_policy.initial_interval", FAR, "retry_policy.initial_interval 1000000000000 s is out of range"),
        ("retry_policy.maximum_interval", FAR, "retry_policy.maximum_interval 1000000000000 s is out of range"),
        ("timeouts.start_to_close", Duration(seconds=1, nanos=-1), "must be a non-negative duration"),
        ("timeouts.start_to_close", Duration(seconds=0, nanos=10**9), "must be a non-negative duration"),
    ],
)
def test_durations_are_bounded_by_what_the_store_holds(field: str, value: Duration, needle: str) -> None:
    r = req()
    message, name = field.split(".")
    getattr(getattr(r.task, message), name).CopyFrom(value)
    with pytest.raises(InvalidArgument) as err:
        validate_schedule(r, CFG, 64, NOW)
    assert needle in str(err.value)


def test_the_largest_accepted_values_stay_storable() -> None:
    """Everything at its upper bound at once: the derived times fit the store."""
    from leasesched import limits

    r = req(delay=Duration(seconds=int(CFG.max_schedule_ahead_s)))
    year = Duration(seconds=limits.YEAR_MS // 1000)
    for name in ("schedule_to_start", "start_to_close", "schedule_to_close"):
        getattr(r.task.timeouts, name).CopyFrom(year)
    r.task.retry_policy.initial_interval.CopyFrom(year)
    r.task.retry_policy.maximum_interval.CopyFrom(year)
    r.task.retry_policy.backoff_coefficient = 100.0
    r.task.retry_policy.maximum_attempts = CFG.max_attempts_limit
    task = validate_schedule(r, CFG, 64, NOW)
    assert task.deadline_at is not None and task.deadline_at < limits.MAX_STORED_TIME_MS
    backoff = task.retry.backoff_ms(task.max_attempts)
    assert backoff == limits.YEAR_MS
    limits.ttl_s(task.run_at + backoff, NOW)  # raises if a retry's due entry could not be stored


def test_default_maximum_interval_is_capped() -> None:
    r = req()
    r.task.retry_policy.initial_interval.FromSeconds(30 * 86_400)
    task = validate_schedule(r, CFG, 64, NOW)
    assert task.retry.maximum_interval_ms == 366 * 86_400_000  # not 100 × 30 days


def test_backoff_never_overflows() -> None:
    from leasesched.model import RetryPolicy

    policy = RetryPolicy(initial_interval_ms=1000, backoff_coefficient=100.0, maximum_interval_ms=5000, maximum_attempts=10_000)
    assert policy.backoff_ms(10_000) == 5000


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"type": "h.a\n"}, "type 'h.a\\n' is invalid"),
        ({"namespace": "ns\n"}, "namespace 'ns\\n' is invalid"),
        ({"type": "h.a\nb"}, "is invalid"),
    ],
)
def test_names_match_exactly_no_trailing_newline(fields: dict, needle: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_schedule(req(**fields), CFG, 64, NOW)
    assert needle in str(err.value)


def test_idempotency_key_and_error_types_match_exactly() -> None:
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        validate_schedule(pb.ScheduleTaskRequest(task=req().task, idempotency_key="k\n"), CFG, 64, NOW)
    r = req()
    r.task.retry_policy.non_retryable_error_types.append("E\n")
    with pytest.raises(InvalidArgument, match="non_retryable_error_types entry"):
        validate_schedule(r, CFG, 64, NOW)
    # The same values without the newline are fine.
    ok = pb.ScheduleTaskRequest(task=req().task, idempotency_key="k")
    ok.task.retry_policy.non_retryable_error_types.append("E")
    validate_schedule(ok, CFG, 64, NOW)


@pytest.mark.parametrize("coefficient", [float("nan"), float("inf"), float("-inf"), 0.5, 101.0])
def test_backoff_coefficient_must_be_finite_and_in_range(coefficient: float) -> None:
    r = req()
    r.task.retry_policy.backoff_coefficient = coefficient
    with pytest.raises(InvalidArgument, match="backoff_coefficient"):
        validate_schedule(r, CFG, 64, NOW)


def test_config_cannot_lift_the_hard_bounds() -> None:
    cfg = Config(max_schedule_ahead_s=1e12, max_attempts_limit=10**9)
    with pytest.raises(InvalidArgument, match="delay"):
        validate_schedule(req(delay=Duration(seconds=10**11)), cfg, 64, NOW)
    r = req()
    r.task.retry_policy.maximum_attempts = 2**31 - 1
    with pytest.raises(InvalidArgument, match="maximum_attempts 2147483647 is out of range 1..10000"):
        validate_schedule(r, cfg, 64, NOW)


def test_a_stored_interval_past_the_bound_is_capped_when_applied() -> None:
    """A row written before intervals were bounded still gets a storable retry."""
    from leasesched import limits
    from leasesched.model import RetryPolicy

    old = RetryPolicy(initial_interval_ms=10**15, backoff_coefficient=2.0, maximum_interval_ms=10**17)
    assert old.backoff_ms(1) == limits.YEAR_MS
