"""A schedule as the protobuf ``ScheduleDescription`` (and its parts)."""

from __future__ import annotations

import uuid

from leasesched.model import RetryPolicy, Timeouts
from leasesched.schedules import Schedule
from leasesched.server.schedule_validation import OVERLAP_TO_PB
from leasesched.states import TaskStatus
from leasesched.v1 import scheduler_pb2 as pb
from services.convert import dur, status_to_pb, ts

NEXT_FIRE_TIMES = 5


def next_fire_times(schedule: Schedule, count: int = NEXT_FIRE_TIMES) -> list[int]:
    """The next slots the schedule will fire (none while paused or out of actions)."""
    state = schedule.state
    if state.paused:
        return []
    if state.limited_actions:
        count = min(count, max(0, state.remaining_actions))
    found: list[int] = []
    slot = state.next_slot_ms
    while slot is not None and len(found) < count:
        found.append(slot)
        slot = schedule.spec.next_after(slot)
    return found


def _retry(policy: RetryPolicy) -> pb.RetryPolicy:
    return pb.RetryPolicy(
        initial_interval=dur(policy.initial_interval_ms),
        backoff_coefficient=policy.backoff_coefficient,
        maximum_interval=dur(policy.maximum_interval_ms),
        maximum_attempts=policy.maximum_attempts,
        non_retryable_error_types=list(policy.non_retryable_error_types),
    )


def _timeouts(t: Timeouts) -> pb.Timeouts:
    return pb.Timeouts(
        schedule_to_start=dur(t.schedule_to_start_ms),
        start_to_close=dur(t.start_to_close_ms),
        schedule_to_close=dur(t.schedule_to_close_ms),
    )


def schedule_to_pb(schedule: Schedule) -> pb.Schedule:
    spec, action, state = schedule.spec, schedule.action, schedule.state
    message = pb.Schedule(
        namespace=schedule.namespace,
        schedule_id=schedule.schedule_id,
        spec=pb.ScheduleSpec(cron=list(spec.cron), time_zone=spec.time_zone),
        action=pb.TaskSpec(
            namespace=schedule.namespace, type=action.type, payload=action.payload, priority=action.priority,
            has_priority=True, retry_policy=_retry(action.retry), timeouts=_timeouts(action.timeouts),
            lease_duration=dur(action.lease_ms), concurrency_key=action.concurrency_key, gate=action.gate,
        ),  # fmt: skip
        policy=pb.SchedulePolicy(
            overlap=OVERLAP_TO_PB[schedule.policy.overlap],
            catchup_window=dur(schedule.policy.catchup_window_ms),
            pause_on_failure=schedule.policy.pause_on_failure,
        ),
        paused=state.paused,
        note=state.note,
        limited_actions=state.limited_actions,
        remaining_actions=state.remaining_actions,
    )
    if spec.every_ms:
        message.spec.every.CopyFrom(dur(spec.every_ms))
        message.spec.offset.CopyFrom(dur(spec.offset_ms))
    if spec.jitter_ms:
        message.spec.jitter.CopyFrom(dur(spec.jitter_ms))
    if spec.start_at_ms is not None:
        message.spec.start_at.CopyFrom(ts(spec.start_at_ms))
    if spec.end_at_ms is not None:
        message.spec.end_at.CopyFrom(ts(spec.end_at_ms))
    return message


def describe(
    schedule: Schedule, statuses: dict[uuid.UUID, TaskStatus | None], with_runs: bool = True
) -> pb.ScheduleDescription:
    """``statuses``: the current status of each recent run (read by the caller)."""
    state = schedule.state
    description = pb.ScheduleDescription(
        schedule=schedule_to_pb(schedule),
        version=schedule.version,
        next_fire_times=[ts(t) for t in next_fire_times(schedule)],
        buffered=[ts(p.slot_ms) for p in state.buffered],
        fired_total=state.fired_total,
        skipped_total=state.skipped_total,
        created_at=ts(schedule.created_at_ms),
        updated_at=ts(schedule.updated_at_ms),
        backfills_pending=len(state.backfills),
    )
    if with_runs:
        for run in reversed(state.recent):
            status = statuses.get(run.task_id)
            description.recent_runs.append(
                pb.ScheduleRun(
                    nominal_time=ts(run.slot_ms), task_id=str(run.task_id),
                    status=status_to_pb(status) if status is not None else pb.TASK_STATUS_UNSPECIFIED,
                    fired_at=ts(run.fired_at_ms), cause=run.cause.value,
                )  # fmt: skip
            )
        for skipped in reversed(state.skipped):
            description.skipped.append(
                pb.SkippedSlots(
                    first=ts(skipped.first_ms), last=ts(skipped.last_ms), count=skipped.count,
                    reason=skipped.reason.value, recorded_at=ts(skipped.recorded_at_ms),
                )  # fmt: skip
            )
    return description
