"""Conversions between the core's values and the protobuf messages."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

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


def task_view(task: Task, with_payload: bool = False) -> pb.TaskView:
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
