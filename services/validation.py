"""ScheduleTask validation: a request either becomes a complete ``Task`` or is
refused with a message that names the field and what was wrong.

Validation happens before any write, so a bad request can never leave a
half-written task behind.

Decision: "unknown task type" means malformed unless the operator configures
an allow-list (``allowed_task_types``); a scheduler must accept tasks for
workers that are not deployed yet, so the default accepts any well-formed type.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from google.protobuf.duration_pb2 import Duration

from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.model import RetryPolicy, Task, Timeouts, shard_of
from leasesched.v1 import scheduler_pb2 as pb

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,127}$")
KEY_RE = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces
MAX_NON_RETRYABLE = 32
MAX_LEASE_MS = 3600_000
MIN_LEASE_MS = 1000


def _duration_ms(d: Duration, field: str) -> int:
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        raise InvalidArgument(f"{field} must be a non-negative duration")
    return d.seconds * 1000 + d.nanos // 1_000_000


def check_namespace(namespace: str) -> str:
    if not namespace:
        raise InvalidArgument("namespace is required")
    if not NAMESPACE_RE.match(namespace):
        raise InvalidArgument(
            f"namespace {namespace[:80]!r} is invalid: 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return namespace


def check_task_id(task_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(task_id)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(f"task_id {task_id[:80]!r} is not a UUID") from None


def request_hash(request: pb.ScheduleTaskRequest) -> bytes:
    """Fingerprint of what was asked, to tell a retry from a different request."""
    return hashlib.sha256(request.task.SerializeToString(deterministic=True)).digest()


def validate_schedule(request: pb.ScheduleTaskRequest, cfg: Config, shards: int, now: int) -> Task:
    spec = request.task
    namespace = check_namespace(spec.namespace)

    if not spec.type:
        raise InvalidArgument("type is required")
    if not TYPE_RE.match(spec.type):
        raise InvalidArgument(
            f"type {spec.type[:80]!r} is invalid: start with a letter, then up to 127 of letters, digits, '_', '.', ':', '-'"
        )
    allowed = {t.strip() for t in cfg.allowed_task_types.split(",") if t.strip()}
    if allowed and spec.type not in allowed:
        raise InvalidArgument(f"type {spec.type!r} is unknown (allowed: {', '.join(sorted(allowed))})")

    if len(spec.payload) > cfg.max_payload_bytes:
        raise InvalidArgument(f"payload is {len(spec.payload)} bytes, over the limit of {cfg.max_payload_bytes}")

    if request.idempotency_key and not KEY_RE.match(request.idempotency_key):
        raise InvalidArgument("idempotency_key must be 1-256 printable ASCII characters without spaces")

    if spec.has_priority or spec.priority != 0:
        if not 0 <= spec.priority <= 9:
            raise InvalidArgument(f"priority {spec.priority} is out of range 0..9")
        priority = spec.priority
    else:
        priority = 5

    which = spec.WhichOneof("when")
    if which == "run_at":
        if spec.run_at.nanos < 0 or spec.run_at.nanos >= 1_000_000_000:
            raise InvalidArgument("run_at is not a valid timestamp")
        run_at = spec.run_at.seconds * 1000 + spec.run_at.nanos // 1_000_000
        if run_at < now - cfg.max_schedule_behind_s * 1000:
            raise InvalidArgument(
                f"run_at is more than {cfg.max_schedule_behind_s:.0f} s in the past; use a delay of 0 to run now"
            )
        if run_at > now + cfg.max_schedule_ahead_s * 1000:
            raise InvalidArgument(f"run_at is more than {cfg.max_schedule_ahead_s:.0f} s in the future")
    elif which == "delay":
        delay = _duration_ms(spec.delay, "delay")
        if delay > cfg.max_schedule_ahead_s * 1000:
            raise InvalidArgument(f"delay is more than {cfg.max_schedule_ahead_s:.0f} s")
        run_at = now + delay
    else:
        run_at = now

    retry = _validate_retry(spec.retry_policy, cfg)
    timeouts = Timeouts(
        schedule_to_start_ms=_duration_ms(spec.timeouts.schedule_to_start, "timeouts.schedule_to_start"),
        start_to_close_ms=_duration_ms(spec.timeouts.start_to_close, "timeouts.start_to_close"),
        schedule_to_close_ms=_duration_ms(spec.timeouts.schedule_to_close, "timeouts.schedule_to_close"),
    )
    lease_ms = _duration_ms(spec.lease_duration, "lease_duration") or int(cfg.default_lease_s * 1000)
    if not MIN_LEASE_MS <= lease_ms <= MAX_LEASE_MS:
        raise InvalidArgument(f"lease_duration must be between {MIN_LEASE_MS // 1000} s and {MAX_LEASE_MS // 1000} s")

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
    )


def _validate_retry(policy: pb.RetryPolicy, cfg: Config) -> RetryPolicy:
    attempts = policy.maximum_attempts or cfg.default_max_attempts
    if not 1 <= attempts <= cfg.max_attempts_limit:
        raise InvalidArgument(f"retry_policy.maximum_attempts {attempts} is out of range 1..{cfg.max_attempts_limit}")
    initial = _duration_ms(policy.initial_interval, "retry_policy.initial_interval") or 1000
    coefficient = policy.backoff_coefficient or 2.0
    if not 1.0 <= coefficient <= 100.0:
        raise InvalidArgument(f"retry_policy.backoff_coefficient {coefficient} is out of range 1..100")
    maximum = _duration_ms(policy.maximum_interval, "retry_policy.maximum_interval") or initial * 100
    if maximum < initial:
        raise InvalidArgument("retry_policy.maximum_interval is shorter than initial_interval")
    if len(policy.non_retryable_error_types) > MAX_NON_RETRYABLE:
        raise InvalidArgument(f"retry_policy.non_retryable_error_types has over {MAX_NON_RETRYABLE} entries")
    for name in policy.non_retryable_error_types:
        if not TYPE_RE.match(name):
            raise InvalidArgument(f"retry_policy.non_retryable_error_types entry {name[:80]!r} is not a valid name")
    return RetryPolicy(
        initial_interval_ms=initial,
        backoff_coefficient=coefficient,
        maximum_interval_ms=maximum,
        maximum_attempts=attempts,
        non_retryable_error_types=tuple(policy.non_retryable_error_types),
    )
