"""Conversions between the core's values and the protobuf messages."""

from __future__ import annotations

import uuid

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from leasesched.history import HistoryEntry, HistoryKind
from leasesched.model import Task
from leasesched.states import TaskStatus
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.versions import version_of


def ts(ms: int | None) -> Timestamp | None:
    if ms is None:
        return None
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def dur(ms: int) -> Duration:
    return Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def status_to_pb(status: TaskStatus) -> pb.TaskStatus:
    return pb.TaskStatus.Value(status.value)


def status_from_pb(value: int) -> TaskStatus | None:
    if value == pb.TASK_STATUS_UNSPECIFIED:
        return None
    return TaskStatus(pb.TaskStatus.Name(value))


def task_view(task: Task, with_payload: bool = False, stuck_lease_losses: int = 0) -> pb.TaskView:
    """``stuck_lease_losses``: ``Config.stuck_lease_losses`` (0: never stuck)."""
    view = pb.TaskView(
        task_id=str(task.task_id),
        namespace=task.namespace,
        type=task.type,
        status=status_to_pb(task.status),
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        priority=task.priority,
        progress=pb.Progress(percent=task.progress_percent, message=task.progress_message),
        result=task.result,
        error=task.error,
        error_type=task.error_type,
        cancel_requested=task.cancel_requested,
        lease_owner=task.lease_owner or "",
        lease_token=task.lease_token,
        created_at=ts(task.created_at),
        run_at=ts(task.run_at),
        started_at=ts(task.started_at),
        finished_at=ts(task.finished_at),
        lease_expires_at=ts(task.lease_expires_at),
        lease_losses=task.lease_losses,
        stuck=stuck_lease_losses > 0 and task.lease_losses >= stuck_lease_losses,
        version=version_of(task),
    )
    if task.schedule_id:
        view.schedule_id = task.schedule_id
        view.nominal_time.CopyFrom(ts(task.nominal_time))
    if task.concurrency_key:
        view.concurrency_key = task.concurrency_key
    if task.gate:
        view.gate = task.gate
    if with_payload:
        view.payload = task.payload
    return view


_KIND_TO_PB = {HistoryKind.ATTEMPT: pb.HISTORY_ENTRY_KIND_ATTEMPT, HistoryKind.OPERATION: pb.HISTORY_ENTRY_KIND_OPERATION}


def history_entry_view(entry: HistoryEntry) -> pb.TaskHistoryEntry:
    """One history entry as GetTaskHistory answers it (the enums by name:
    ``AttemptOutcome.X`` is ``HISTORY_OUTCOME_X``, ``Operation.X`` is
    ``HISTORY_OPERATION_X``; a test keeps the two lists equal)."""
    view = pb.TaskHistoryEntry(
        kind=_KIND_TO_PB[entry.kind],
        attempt=entry.attempt,
        lease_token=entry.lease_token,
        worker_id=entry.worker_id,
        started_at=ts(entry.started_at),
        ended_at=ts(entry.ended_at),
        error_type=entry.error_type,
        error=entry.error,
        operator=entry.operator,
        reason=entry.reason,
    )
    if entry.outcome is not None:
        view.outcome = pb.HistoryOutcome.Value(f"HISTORY_OUTCOME_{entry.outcome.value}")
    if entry.operation is not None:
        view.operation = pb.HistoryOperation.Value(f"HISTORY_OPERATION_{entry.operation.value}")
    if entry.kind is HistoryKind.ATTEMPT:
        view.progress.CopyFrom(pb.Progress(percent=entry.progress_percent, message=entry.progress_message))
    return view


def created_pb(task: Task, write_id: uuid.UUID) -> pb.CreatedTask:
    """A new task's creation row and write id as a due hint carries them (``CreatedTask``)."""
    created = pb.CreatedTask(
        write_id=str(write_id), shard=task.shard, namespace=task.namespace, type=task.type, priority=task.priority,
        payload=task.payload,
        lease_duration=dur(task.lease_ms), schedule_to_start=dur(task.timeouts.schedule_to_start_ms),
        start_to_close=dur(task.timeouts.start_to_close_ms),
    )  # fmt: skip
    created.run_at.FromMilliseconds(task.run_at)
    if task.deadline_at is not None:
        created.deadline_at.FromMilliseconds(task.deadline_at)
    return created
