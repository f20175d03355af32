"""A schedule's definition and state as JSON text, for the ``schedules`` table.

Both are read and written whole (the state with every conditional write),
never queried by their parts, so two text columns hold them instead of
dozens of columns that would each need a migration. Every field is named
explicitly here, in both directions: a field added to a dataclass without a
line here fails the round-trip test (tests/unit/test_schedule_codec.py), and
a stored document from an older version reads with the defaults of the
fields it lacks.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from leasesched.model import RetryPolicy, Timeouts
from leasesched.schedule_spec import ScheduleSpec
from leasesched.schedules import (
    Backfill,
    Cause,
    Overlap,
    Pending,
    Run,
    SchedulePolicy,
    ScheduleState,
    Skipped,
    SkipReason,
    TaskTemplate,
)


class BadScheduleDocument(ValueError):
    """A stored definition or state that cannot be read (a bug or a hand edit)."""


def dump_definition(spec: ScheduleSpec, action: TaskTemplate, policy: SchedulePolicy) -> str:
    return json.dumps(
        {
            "spec": {
                "cron": list(spec.cron),
                "time_zone": spec.time_zone,
                "every_ms": spec.every_ms,
                "offset_ms": spec.offset_ms,
                "start_at_ms": spec.start_at_ms,
                "end_at_ms": spec.end_at_ms,
                "jitter_ms": spec.jitter_ms,
            },
            "action": {
                "type": action.type,
                "payload": base64.b64encode(action.payload).decode(),
                "priority": action.priority,
                "retry": {
                    "initial_interval_ms": action.retry.initial_interval_ms,
                    "backoff_coefficient": action.retry.backoff_coefficient,
                    "maximum_interval_ms": action.retry.maximum_interval_ms,
                    "maximum_attempts": action.retry.maximum_attempts,
                    "non_retryable_error_types": list(action.retry.non_retryable_error_types),
                },
                "timeouts": {
                    "schedule_to_start_ms": action.timeouts.schedule_to_start_ms,
                    "start_to_close_ms": action.timeouts.start_to_close_ms,
                    "schedule_to_close_ms": action.timeouts.schedule_to_close_ms,
                },
                "lease_ms": action.lease_ms,
                "concurrency_key": action.concurrency_key,
                "gate": action.gate,
            },
            "policy": {
                "overlap": policy.overlap.value,
                "catchup_window_ms": policy.catchup_window_ms,
                "pause_on_failure": policy.pause_on_failure,
            },
        },
        separators=(",", ":"),
    )


def load_definition(text: str) -> tuple[ScheduleSpec, TaskTemplate, SchedulePolicy]:
    try:
        doc = json.loads(text)
        s, a, p = doc["spec"], doc["action"], doc["policy"]
        spec = ScheduleSpec(
            cron=tuple(s.get("cron", ())),
            time_zone=s.get("time_zone", "UTC"),
            every_ms=int(s.get("every_ms", 0)),
            offset_ms=int(s.get("offset_ms", 0)),
            start_at_ms=s.get("start_at_ms"),
            end_at_ms=s.get("end_at_ms"),
            jitter_ms=int(s.get("jitter_ms", 0)),
        )
        r, t = a.get("retry", {}), a.get("timeouts", {})
        action = TaskTemplate(
            type=a["type"],
            payload=base64.b64decode(a.get("payload", "")),
            priority=int(a.get("priority", 5)),
            retry=RetryPolicy(
                initial_interval_ms=int(r.get("initial_interval_ms", 1000)),
                backoff_coefficient=float(r.get("backoff_coefficient", 2.0)),
                maximum_interval_ms=int(r.get("maximum_interval_ms", 100_000)),
                maximum_attempts=int(r.get("maximum_attempts", 3)),
                non_retryable_error_types=tuple(r.get("non_retryable_error_types", ())),
            ),
            timeouts=Timeouts(
                schedule_to_start_ms=int(t.get("schedule_to_start_ms", 0)),
                start_to_close_ms=int(t.get("start_to_close_ms", 0)),
                schedule_to_close_ms=int(t.get("schedule_to_close_ms", 0)),
            ),
            lease_ms=int(a.get("lease_ms", 30_000)),
            # Absent from documents written before schedules carried them: none.
            concurrency_key=str(a.get("concurrency_key") or ""),
            gate=str(a.get("gate") or ""),
        )
        policy = SchedulePolicy(
            overlap=Overlap(p.get("overlap", Overlap.SKIP.value)),
            catchup_window_ms=int(p.get("catchup_window_ms", 3_600_000)),
            pause_on_failure=bool(p.get("pause_on_failure", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadScheduleDocument(f"stored schedule definition is unreadable: {exc}") from exc
    return spec, action, policy


def _run(run: Run) -> list[Any]:
    return [run.slot_ms, str(run.task_id), run.fired_at_ms, run.cause.value]


def _load_run(raw: list[Any]) -> Run:
    return Run(int(raw[0]), uuid.UUID(raw[1]), int(raw[2]), Cause(raw[3]))


def _overlap(value: Overlap | None) -> str | None:
    return None if value is None else value.value


def _load_overlap(value: str | None) -> Overlap | None:
    return None if value is None else Overlap(value)


def dump_state(state: ScheduleState) -> str:
    return json.dumps(
        {
            "next_slot_ms": state.next_slot_ms,
            "paused": state.paused,
            "note": state.note,
            "limited_actions": state.limited_actions,
            "remaining_actions": state.remaining_actions,
            "running": [_run(r) for r in state.running],
            "creating": [_run(r) for r in state.creating],
            "buffered": [[p.slot_ms, p.cause.value, _overlap(p.overlap)] for p in state.buffered],
            "backfills": [[b.next_ms, b.end_ms, _overlap(b.overlap)] for b in state.backfills],
            "recent": [_run(r) for r in state.recent],
            "skipped": [[k.first_ms, k.last_ms, k.count, k.reason.value, k.recorded_at_ms] for k in state.skipped],
            "fired_total": state.fired_total,
            "skipped_total": state.skipped_total,
        },
        separators=(",", ":"),
    )


def load_state(text: str) -> ScheduleState:
    try:
        d = json.loads(text)
        return ScheduleState(
            next_slot_ms=d.get("next_slot_ms"),
            paused=bool(d.get("paused", False)),
            note=str(d.get("note", "")),
            limited_actions=bool(d.get("limited_actions", False)),
            remaining_actions=int(d.get("remaining_actions", 0)),
            running=tuple(_load_run(r) for r in d.get("running", ())),
            creating=tuple(_load_run(r) for r in d.get("creating", ())),
            buffered=tuple(Pending(int(p[0]), Cause(p[1]), _load_overlap(p[2])) for p in d.get("buffered", ())),
            backfills=tuple(Backfill(int(b[0]), int(b[1]), _load_overlap(b[2])) for b in d.get("backfills", ())),
            recent=tuple(_load_run(r) for r in d.get("recent", ())),
            skipped=tuple(
                Skipped(int(k[0]), int(k[1]), int(k[2]), SkipReason(k[3]), int(k[4])) for k in d.get("skipped", ())
            ),
            fired_total=int(d.get("fired_total", 0)),
            skipped_total=int(d.get("skipped_total", 0)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BadScheduleDocument(f"stored schedule state is unreadable: {exc}") from exc
