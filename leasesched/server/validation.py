"""ScheduleTask validation: a request either becomes a complete ``Task`` or is
refused with a message that names the field, the value and the limit.

Validation happens before any write, so a bad request can never leave a
half-written task behind, nor use up its idempotency key. Every bound comes
from ``leasesched.limits``, where each is derived from what the store can hold
after the arithmetic done on it (now + delay + schedule_to_close, backoff
growth, due-index TTLs).

Decision: "unknown task type" means malformed unless the operator configures
an allow-list (``allowed_task_types``); a scheduler must accept tasks for
workers that are not deployed yet, so the default accepts any well-formed type.
"""

from __future__ import annotations

import re
import hashlib
import uuid

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from leasesched import limits
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.model import RetryPolicy, Task, Timeouts, shard_of
from leasesched.store.base import Untouched
from leasesched.v1 import scheduler_pb2 as pb

def duration_ms(d: Duration, bound: limits.Bound, field: str) -> int:
    """A protobuf Duration in ms, within ``bound`` (a proto Duration's seconds
    and nanos must have the same sign, nanos below one second)."""
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        raise InvalidArgument(f"{field} must be a non-negative duration (seconds >= 0, 0 <= nanos < 1e9)")
    ms = d.seconds * 1000 + d.nanos // 1_000_000
    bound.check(ms, field)
    return ms


def timestamp_ms(t: Timestamp, field: str) -> int:
    if t.nanos < 0 or t.nanos >= 1_000_000_000:
        raise InvalidArgument(f"{field} is not a valid timestamp (0 <= nanos < 1e9)")
    return t.seconds * 1000 + t.nanos // 1_000_000


def check_name(value: str, field: str, pattern: re.Pattern[str], rule: str) -> str:
    """A required name matching ``pattern`` whole; else INVALID_ARGUMENT naming
    ``field``, the value (cut to 80 characters) and ``rule`` in words."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not limits.matches(pattern, value):
        raise InvalidArgument(f"{field} {value[:80]!r} is invalid: {rule}")
    return value


def check_namespace(namespace: str, field: str = "namespace") -> str:
    return check_name(namespace, field, limits.NAMESPACE_RE, "1-64 characters of letters, digits, '_', '.', '-'")


def check_worker_id(worker_id: str, field: str = "worker_id") -> str:
    """A worker's name is logged, stored as the lease owner and shown by
    ``cluster status``: a short printable name, nothing else."""
    if not limits.matches(limits.WORKER_ID_RE, worker_id):
        raise InvalidArgument(
            f"{field} {worker_id[:80]!r} is invalid: 1-{limits.MAX_WORKER_ID} printable ASCII characters without spaces"
        )
    return worker_id


def check_type(value: str, field: str = "type") -> str:
    return check_name(
        value, field, limits.TYPE_RE, "start with a letter, then up to 127 of letters, digits, '_', '.', ':', '-'"
    )


def check_concurrency_key(value: str, field: str = "concurrency_key") -> str:
    """Optional: empty means "no group" (the namespace's default fair-share group)."""
    if not value:
        return ""
    return check_name(
        value, field, limits.CONCURRENCY_KEY_RE, "empty, or 1-64 of letters, digits, '_', '.', ':', '-' starting with a letter or digit"
    )


def check_gate_name(value: str, field: str = "gate") -> str:
    return check_name(value, field, limits.GATE_RE, "start with a letter or digit, then up to 127 of letters, digits, '_', '.', ':', '-'")


def check_task_id(task_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(task_id)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(f"task_id {task_id[:80]!r} is not a UUID") from None


def request_hash(request: pb.ScheduleTaskRequest) -> bytes:
    """Fingerprint of what was asked, to tell a retry from a different request.
    The whole TaskSpec, so every field counts (``concurrency_key`` too: the
    same key with another group is another request); an unset field is not
    serialized, so hashes of requests without the newer fields do not change."""
    return hashlib.sha256(request.task.SerializeToString(deterministic=True)).digest()


def schedule_ahead_ms(cfg: Config) -> int:
    """How far ahead a task may be scheduled: the operator's setting, never past the hard bound."""
    return min(int(cfg.max_schedule_ahead_s * 1000), int(limits.SCHEDULE_AHEAD.high))


def validate_schedule(request: pb.ScheduleTaskRequest, cfg: Config, shards: int, now: int) -> Task:
    spec = request.task
    namespace = check_namespace(spec.namespace)
    check_type(spec.type)
    concurrency_key = check_concurrency_key(spec.concurrency_key)
    allowed = {t.strip() for t in cfg.allowed_task_types.split(",") if t.strip()}
    if allowed and spec.type not in allowed:
        raise InvalidArgument(f"type {spec.type!r} is unknown (allowed: {', '.join(sorted(allowed))})")

    if len(spec.payload) > cfg.max_payload_bytes:
        raise InvalidArgument(f"payload is {len(spec.payload)} bytes, over the limit of {cfg.max_payload_bytes}")

    if request.idempotency_key and not limits.matches(limits.KEY_RE, request.idempotency_key):
        raise InvalidArgument("idempotency_key must be 1-256 printable ASCII characters without spaces")

    if spec.has_priority or spec.priority != 0:
        priority = int(limits.PRIORITY.check(spec.priority))
    else:
        priority = 5

    ahead = schedule_ahead_ms(cfg)
    which = spec.WhichOneof("when")
    if which == "run_at":
        run_at = timestamp_ms(spec.run_at, "run_at")
        if run_at < now - cfg.max_schedule_behind_s * 1000:
            raise InvalidArgument(
                f"run_at is more than {cfg.max_schedule_behind_s:.0f} s in the past; use a delay of 0 to run now"
            )
        if run_at > now + ahead:
            raise InvalidArgument(f"run_at is more than {ahead // 1000} s in the future (the limit is max_schedule_ahead_s)")
    elif which == "delay":
        delay = duration_ms(spec.delay, limits.Bound("delay", 0, ahead, "ms", "max_schedule_ahead_s"), "delay")
        run_at = now + delay
    else:
        run_at = now

    retry = _validate_retry(spec.retry_policy, cfg)
    timeouts = Timeouts(
        schedule_to_start_ms=duration_ms(spec.timeouts.schedule_to_start, limits.TIMEOUT, "timeouts.schedule_to_start"),
        start_to_close_ms=duration_ms(spec.timeouts.start_to_close, limits.TIMEOUT, "timeouts.start_to_close"),
        schedule_to_close_ms=duration_ms(spec.timeouts.schedule_to_close, limits.TIMEOUT, "timeouts.schedule_to_close"),
    )
    lease_ms = _lease_ms(spec.lease_duration, cfg)
    gate = check_gate_name(spec.gate, "task.gate") if spec.gate else ""

    task_id = uuid.uuid4()
    return Task(
        task_id=task_id,
        namespace=namespace,
        type=spec.type,
        payload=bytes(spec.payload),
        shard=shard_of(task_id, shards),
        priority=priority,
        retry=retry,
        timeouts=timeouts,
        lease_ms=lease_ms,
        created_at=now,
        run_at=run_at,
        first_run_at=run_at,
        deadline_at=run_at + timeouts.schedule_to_close_ms if timeouts.schedule_to_close_ms else None,
        concurrency_key=concurrency_key,
        gate=gate,
    )


def _lease_ms(d: Duration, cfg: Config) -> int:
    if d.seconds == 0 and d.nanos == 0:
        return int(cfg.default_lease_s * 1000)
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        raise InvalidArgument("lease_duration must be a non-negative duration")
    ms = d.seconds * 1000 + d.nanos // 1_000_000
    if not limits.LEASE.low <= ms <= limits.LEASE.high:
        raise InvalidArgument(
            f"lease_duration must be between {limits.LEASE.low // 1000} s and {limits.LEASE.high // 1000} s,"
            f" not {d.seconds + d.nanos / 1e9:g} s"
        )
    return ms


def max_attempts_limit(cfg: Config) -> int:
    return min(cfg.max_attempts_limit, int(limits.MAX_ATTEMPTS.high))


def _validate_retry(policy: pb.RetryPolicy, cfg: Config) -> RetryPolicy:
    attempts = policy.maximum_attempts or cfg.default_max_attempts
    ceiling = max_attempts_limit(cfg)
    if not 1 <= attempts <= ceiling:
        raise InvalidArgument(f"retry_policy.maximum_attempts {attempts} is out of range 1..{ceiling}")
    initial = duration_ms(policy.initial_interval, limits.RETRY_INTERVAL, "retry_policy.initial_interval") or 1000
    coefficient = policy.backoff_coefficient or 2.0
    limits.BACKOFF_COEFFICIENT.check(coefficient)  # also refuses NaN and ±inf
    maximum = duration_ms(policy.maximum_interval, limits.RETRY_INTERVAL, "retry_policy.maximum_interval")
    if not maximum:
        # Default: 100 × initial, but never past what a retry's due entry can hold.
        maximum = min(initial * 100, int(limits.RETRY_INTERVAL.high))
    if maximum < initial:
        raise InvalidArgument("retry_policy.maximum_interval is shorter than initial_interval")
    limits.NON_RETRYABLE_TYPES.check(len(policy.non_retryable_error_types), "retry_policy.non_retryable_error_types (entries)")
    for name in policy.non_retryable_error_types:
        check_type(name, "retry_policy.non_retryable_error_types entry")
    return RetryPolicy(
        initial_interval_ms=initial,
        backoff_coefficient=coefficient,
        maximum_interval_ms=maximum,
        maximum_attempts=attempts,
        non_retryable_error_types=tuple(policy.non_retryable_error_types),
    )


# A shard number in a CreatedTask: the claim's write is conditional on the
# real one; this only keeps a forged one from writing its lease check entry far away.
CREATED_SHARD = limits.Bound("created.shard", 0, 65_535, "", "a logical shard number")


def created_task(task_id: uuid.UUID, created: pb.CreatedTask, cfg: Config) -> Untouched:
    """The task a ClaimTaskRequest's ``created`` describes (``CreatedTask``),
    checked field by field (INVALID_ARGUMENT naming the first bad one). It is
    what the claim expects the row to be, not trusted: the claim's write is
    conditional on every field but the payload, so a ticket that lies makes
    the claim go the usual way (a read), and a forged payload only reaches
    the worker that sent it."""
    if len(created.payload) > cfg.max_payload_bytes:
        raise InvalidArgument(f"created.payload is {len(created.payload)} bytes, over the limit of {cfg.max_payload_bytes}")
    run_at = timestamp_ms(created.run_at, "created.run_at")
    limits.SCHEDULE_TIME.check(run_at, "created.run_at")
    try:
        write_id = uuid.UUID(created.write_id)
    except ValueError:
        raise InvalidArgument(f"created.write_id {created.write_id[:80]!r} is not a UUID") from None
    deadline_at = None
    if created.HasField("deadline_at"):
        deadline_at = timestamp_ms(created.deadline_at, "created.deadline_at")
        limits.SCHEDULE_TIME.check(deadline_at, "created.deadline_at")
    task = Task(
        task_id=task_id,
        namespace=check_namespace(created.namespace, "created.namespace"),
        type=check_type(created.type, "created.type"),
        payload=bytes(created.payload),
        shard=int(CREATED_SHARD.check(created.shard)),
        priority=int(limits.PRIORITY.check(created.priority, "created.priority")),
        lease_ms=duration_ms(created.lease_duration, limits.LEASE, "created.lease_duration"),
        timeouts=Timeouts(
            schedule_to_start_ms=duration_ms(created.schedule_to_start, limits.TIMEOUT, "created.schedule_to_start"),
            start_to_close_ms=duration_ms(created.start_to_close, limits.TIMEOUT, "created.start_to_close"),
        ),
        run_at=run_at,
        first_run_at=run_at,
        deadline_at=deadline_at,
    )
    return Untouched(task, write_id)
