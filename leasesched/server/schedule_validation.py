"""Checking a schedule request before it has any effect.

Every field is checked whole before anything is written; a refusal is
INVALID_ARGUMENT naming the field (``spec.cron[1]``, ``schedule.action.type``,
``policy.catchup_window``, ...). The action is checked by the same code as a
ScheduleTask request (``validation.validate_schedule``), with ``schedule.action.``
in front of the field it names.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from leasesched import limits
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.schedule_spec import ScheduleSpec
from leasesched.schedules import Overlap, SchedulePolicy, TaskTemplate
from leasesched.server.validation import (
    check_concurrency_key,
    check_gate_name,
    check_name,
    check_namespace,
    duration_ms,
    timestamp_ms,
    validate_schedule,
)
from leasesched.v1 import scheduler_pb2 as pb

OVERLAP_FROM_PB = {
    pb.OVERLAP_SKIP: Overlap.SKIP,
    pb.OVERLAP_BUFFER_ONE: Overlap.BUFFER_ONE,
    pb.OVERLAP_BUFFER_ALL: Overlap.BUFFER_ALL,
    pb.OVERLAP_CANCEL_OTHER: Overlap.CANCEL_OTHER,
    pb.OVERLAP_ALLOW_ALL: Overlap.ALLOW_ALL,
}
OVERLAP_TO_PB = {v: k for k, v in OVERLAP_FROM_PB.items()}

DEFAULT_CATCHUP_MS = 3_600_000
ACTION = "schedule.action."  # how refusals name the action's fields: the path in Create/UpdateScheduleRequest


@dataclass(frozen=True)
class Definition:
    """A valid schedule request, as core values."""

    namespace: str
    schedule_id: str
    spec: ScheduleSpec
    action: TaskTemplate
    policy: SchedulePolicy
    paused: bool
    note: str
    limited_actions: bool
    remaining_actions: int


def check_schedule_id(value: str, field: str = "schedule_id") -> str:
    return check_name(
        value, field, limits.SCHEDULE_ID_RE, "1-128 characters of letters, digits, '_', '.', ':', '-', not starting with a symbol"
    )


def check_ref(ref: pb.ScheduleRef) -> tuple[str, str]:
    return check_namespace(ref.namespace, "ref.namespace"), check_schedule_id(ref.schedule_id, "ref.schedule_id")


def overlap_from_pb(value: int, field: str) -> Overlap | None:
    """None for UNSPECIFIED (the schedule's own policy)."""
    if value == pb.OVERLAP_POLICY_UNSPECIFIED:
        return None
    try:
        return OVERLAP_FROM_PB[pb.OverlapPolicy.ValueType(value)]
    except KeyError:
        raise InvalidArgument(f"{field} {value} is not an OverlapPolicy") from None


def check_note(note: str, field: str = "note") -> str:
    if len(note) > limits.MAX_SCHEDULE_NOTE:
        raise InvalidArgument(f"{field} is {len(note)} characters, over the limit of {limits.MAX_SCHEDULE_NOTE}")
    return note


def _optional_time(t: Timestamp, has: bool, field: str) -> int | None:
    if not has:
        return None
    ms = timestamp_ms(t, field)
    if not 0 <= ms <= limits.MAX_STORED_TIME_MS:
        raise InvalidArgument(f"{field} is out of range (1970 to 9999-12-31)")
    return ms


def spec_from_pb(spec: pb.ScheduleSpec) -> ScheduleSpec:
    """The spec, checked (``ScheduleSpec.check`` names the field)."""
    every = duration_ms(spec.every, limits.SCHEDULE_EVERY_FIELD, "spec.every") if spec.HasField("every") else 0
    offset = duration_ms(spec.offset, limits.SCHEDULE_EVERY_FIELD, "spec.offset") if spec.HasField("offset") else 0
    jitter = duration_ms(spec.jitter, limits.SCHEDULE_EVERY_FIELD, "spec.jitter") if spec.HasField("jitter") else 0
    result = ScheduleSpec(
        cron=tuple(spec.cron),
        time_zone=spec.time_zone or "UTC",
        every_ms=every,
        offset_ms=offset,
        start_at_ms=_optional_time(spec.start_at, spec.HasField("start_at"), "spec.start_at"),
        end_at_ms=_optional_time(spec.end_at, spec.HasField("end_at"), "spec.end_at"),
        jitter_ms=jitter,
    )
    result.check()
    return result


def action_from_pb(action: pb.TaskSpec, namespace: str, cfg: Config, now: int) -> TaskTemplate:
    """The task template, checked as ScheduleTask checks a task; a refusal
    names the field as the request holds it (``schedule.action.type``).

    Whether ``gate`` exists is not checked here (that is a read): the service
    does it, as ScheduleTask does."""
    if action.namespace and action.namespace != namespace:
        raise InvalidArgument(f"{ACTION}namespace {action.namespace[:80]!r} differs from the schedule's namespace {namespace!r}")
    if action.WhichOneof("when") is not None:
        raise InvalidArgument(f"{ACTION}{action.WhichOneof('when')} must be unset: each slot says when its task runs")
    # The rules of ScheduleTask's (the same functions), named as this request names them.
    concurrency_key = check_concurrency_key(action.concurrency_key, f"{ACTION}concurrency_key")
    gate = check_gate_name(action.gate, f"{ACTION}gate") if action.gate else ""
    request = pb.ScheduleTaskRequest(task=action)
    request.task.namespace = namespace
    try:
        task = validate_schedule(request, cfg, shards=1, now=now)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{ACTION}{exc}") from None
    return TaskTemplate(
        type=task.type, payload=task.payload, priority=task.priority, retry=task.retry, timeouts=task.timeouts,
        lease_ms=task.lease_ms, concurrency_key=concurrency_key, gate=gate,
    )  # fmt: skip


def policy_from_pb(policy: pb.SchedulePolicy) -> SchedulePolicy:
    overlap = overlap_from_pb(policy.overlap, "policy.overlap") or Overlap.SKIP
    window = DEFAULT_CATCHUP_MS
    if policy.HasField("catchup_window"):
        window = duration_ms(policy.catchup_window, limits.CATCHUP_WINDOW, "policy.catchup_window")
    return SchedulePolicy(overlap=overlap, catchup_window_ms=window, pause_on_failure=policy.pause_on_failure)


def definition_from_pb(schedule: pb.Schedule, cfg: Config, now: int) -> Definition:
    namespace = check_namespace(schedule.namespace, "schedule.namespace")
    schedule_id = check_schedule_id(schedule.schedule_id, "schedule.schedule_id")
    spec = spec_from_pb(schedule.spec)
    action = action_from_pb(schedule.action, namespace, cfg, now)
    policy = policy_from_pb(schedule.policy)
    note = check_note(schedule.note, "schedule.note")
    if schedule.limited_actions:
        limits.REMAINING_ACTIONS.check(schedule.remaining_actions, "schedule.remaining_actions")
    elif schedule.remaining_actions:
        raise InvalidArgument("schedule.remaining_actions is set without schedule.limited_actions")
    return Definition(
        namespace=namespace, schedule_id=schedule_id, spec=spec, action=action, policy=policy,
        paused=schedule.paused, note=note, limited_actions=schedule.limited_actions,
        remaining_actions=schedule.remaining_actions,
    )  # fmt: skip
