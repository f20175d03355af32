"""OperatorService: a person's actions on tasks (retry, resume, mark failed,
terminate, and the same by filter).

Why a service of its own (not more TaskService methods): its audience and
rights differ. A ``client`` token schedules and cancels its own tasks; an
``operator`` token (or ``admin``) repairs tasks that went wrong, which a
client may not (leasesched/auth.py, the interceptor's ROLES_BY_METHOD). It
is served by the TaskService process (services/main.py), behind the same
interceptors.

Every action is one conditional write on the version the operator read
(``TaskView.version``, ``leasesched.versions``) made by the lifecycle, the
one writer of task state; this module validates, checks the caller's
namespace, and after a retry or resume that is due now nudges the shard's
trigger as ScheduleTask does for an immediate task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc

from leasesched.auth import caller_namespace, hiding_missing, operator_name, require_namespace
from leasesched.config import Config
from leasesched.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from leasesched.lifecycle import Lifecycle, OperatorAction
from leasesched.model import Task, now_ms
from leasesched.server.validation import check_namespace, check_task_id, check_type, schedule_ahead_ms, timestamp_ms
from leasesched.states import TaskStatus
from leasesched.store.base import ListQuery
from leasesched.token_bucket import TokenBucket
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from leasesched.versions import version_of
from services.convert import status_from_pb, task_view

log = logging.getLogger(__name__)

MAX_REASON = 500
MAX_VERSION = 64
BULK_MAX_COUNT = 10_000
BULK_DEFAULT_RATE = 50.0
BULK_MAX_RATE = 1000.0
BULK_LISTED_IDS = 1000  # applied ids named in a bulk answer (it stays one small message)
BULK_PAGE = 200
# A bulk call answers this long before its time runs out (a last write and the answer must fit).
BULK_TIME_MARGIN_S = 3.0

DueHint = Callable[[Task], Awaitable[None]]


@dataclass(frozen=True)
class BulkKind:
    """What one bulk operation acts on: the statuses it applies to and whether a
    listed task qualifies (resume: only a retry still waiting for its backoff)."""

    statuses: frozenset[TaskStatus]
    waiting_retry_only: bool = False


BULK_KINDS: dict[int, BulkKind] = {
    pb.BULK_RETRY: BulkKind(frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED})),
    pb.BULK_RESUME: BulkKind(frozenset({TaskStatus.SCHEDULED}), waiting_retry_only=True),
    pb.BULK_MARK_FAILED: BulkKind(frozenset({TaskStatus.SCHEDULED})),
    pb.BULK_TERMINATE: BulkKind(frozenset({TaskStatus.RUNNING})),
}


def check_reason(reason: str) -> str:
    """Required: it is what the task's history says about why a person acted."""
    reason = reason.strip()
    if not 1 <= len(reason) <= MAX_REASON:
        raise InvalidArgument(f"reason is required: 1 to {MAX_REASON} characters (got {len(reason)})")
    return reason


def check_version(version: str) -> str:
    if not version:
        raise InvalidArgument("expected_version is required: the task's version as read (TaskView.version)")
    if len(version) > MAX_VERSION:
        raise InvalidArgument(f"expected_version is longer than {MAX_VERSION} characters; it is no version")
    return version


class OperatorService(pb_grpc.OperatorServiceServicer):
    def __init__(
        self,
        cfg: Config,
        lifecycle: Lifecycle,
        notify_due: DueHint | None = None,
        on_changed: Callable[[uuid.UUID], None] | None = None,
    ) -> None:
        """``notify_due``: told of a retried or resumed task that is due now (the
        shard's trigger dispatches it in milliseconds). ``on_changed``: told of
        every task an action changed (TaskService forgets its cached final
        answer: a retried task is final no more)."""
        self._cfg = cfg
        self._lifecycle = lifecycle
        self._notify_due = notify_due
        self._on_changed = on_changed

    # ------------------------------------------------------------ one task

    async def RetryTask(self, request: pb.RetryTaskRequest, context: grpc.aio.ServicerContext) -> pb.RetryTaskResponse:
        task_id, version, action = self._common(request.task_id, request.expected_version, request.reason)
        now = now_ms()
        run_at: int | None = None
        if request.HasField("run_at"):
            run_at = timestamp_ms(request.run_at, "run_at")
            if run_at > now + schedule_ahead_ms(self._cfg):
                raise InvalidArgument(
                    f"run_at is more than {schedule_ahead_ms(self._cfg) // 1000} s in the future (the limit is max_schedule_ahead_s)"
                )
        payload: bytes | None = None
        if request.has_payload:
            if len(request.payload) > self._cfg.max_payload_bytes:
                raise InvalidArgument(
                    f"payload is {len(request.payload)} bytes, over the limit of {self._cfg.max_payload_bytes}"
                )
            payload = bytes(request.payload)
        elif request.payload:
            raise InvalidArgument("payload is set but has_payload is false (set has_payload to replace the payload)")
        with hiding_missing(task_id):
            task = await self._lifecycle.retry(task_id, version, action, run_at, payload, namespace=caller_namespace())
        await self._after(task)
        return pb.RetryTaskResponse(task=self._view(task))

    async def ResumeTask(self, request: pb.ResumeTaskRequest, context: grpc.aio.ServicerContext) -> pb.ResumeTaskResponse:
        task_id, version, action = self._common(request.task_id, request.expected_version, request.reason)
        with hiding_missing(task_id):
            task = await self._lifecycle.resume(task_id, version, action, namespace=caller_namespace())
        await self._after(task)
        return pb.ResumeTaskResponse(task=self._view(task))

    async def MarkTaskFailed(
        self, request: pb.MarkTaskFailedRequest, context: grpc.aio.ServicerContext
    ) -> pb.MarkTaskFailedResponse:
        task_id, version, action = self._common(request.task_id, request.expected_version, request.reason)
        with hiding_missing(task_id):
            task = await self._lifecycle.mark_failed(task_id, version, action, namespace=caller_namespace())
        await self._after(task)
        return pb.MarkTaskFailedResponse(task=self._view(task))

    async def TerminateTask(
        self, request: pb.TerminateTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TerminateTaskResponse:
        task_id, version, action = self._common(request.task_id, request.expected_version, request.reason)
        with hiding_missing(task_id):
            task = await self._lifecycle.terminate(task_id, version, action, namespace=caller_namespace())
        await self._after(task)
        return pb.TerminateTaskResponse(task=self._view(task))

    def _view(self, task: Task) -> pb.TaskView:
        return task_view(task, stuck_lease_losses=self._cfg.stuck_lease_losses)

    def _common(self, task_id: str, version: str, reason: str) -> tuple[uuid.UUID, str, OperatorAction]:
        return check_task_id(task_id), check_version(version), OperatorAction(operator_name(), check_reason(reason))

    async def _after(self, task: Task) -> None:
        if self._on_changed is not None:
            self._on_changed(task.task_id)
        if self._notify_due is not None and task.status == TaskStatus.SCHEDULED and task.run_at <= now_ms():
            await self._notify_due(task)

    # ------------------------------------------------------------ by filter

    async def BulkOperate(
        self, request: pb.BulkOperateRequest, context: grpc.aio.ServicerContext
    ) -> pb.BulkOperateResponse:
        """The operation on every task the filter matches, up to ``max_count``,
        at most ``rate_per_second`` writes a second. Each task's own current
        version (as listed) is the write's condition: a task that changed
        since it was listed is counted as a conflict and left alone, never
        retried blindly. Runs within the call, which the server cuts at
        ``rpc_timeout_s`` (and the caller at its deadline): it stops a few
        seconds before the earlier of the two and answers what it did, with
        ``stopped_at_time_limit`` (run it again for the rest), rather than be
        cut off with its counts lost."""
        kind = BULK_KINDS.get(request.operation)
        if kind is None:
            raise InvalidArgument("operation must be one of BULK_RETRY, BULK_RESUME, BULK_MARK_FAILED, BULK_TERMINATE")
        namespace = check_namespace(request.namespace)
        require_namespace(namespace)
        type_ = check_type(request.type) if request.type else ""
        if request.status not in pb.TaskStatus.values():
            raise InvalidArgument(f"status {request.status} is not a TaskStatus")
        status = status_from_pb(request.status)
        if status is not None and status not in kind.statuses:
            allowed = ", ".join(sorted(s.value for s in kind.statuses))
            raise InvalidArgument(f"status {status.value} is not one the operation applies to ({allowed})")
        if not 1 <= request.max_count <= BULK_MAX_COUNT:
            raise InvalidArgument(f"max_count is required: 1 to {BULK_MAX_COUNT}")
        rate = request.rate_per_second or BULK_DEFAULT_RATE
        if not 0 < rate <= BULK_MAX_RATE:
            raise InvalidArgument(f"rate_per_second must be more than 0 and at most {BULK_MAX_RATE:g} (0: {BULK_DEFAULT_RATE:g})")
        after = timestamp_ms(request.created_after, "created_after") if request.HasField("created_after") else None
        before = timestamp_ms(request.created_before, "created_before") if request.HasField("created_before") else None
        reason = check_reason(request.reason)
        action = OperatorAction(operator_name(), reason)
        statuses = frozenset({status}) if status is not None else kind.statuses

        def matches(task: Task, now: int) -> bool:
            # Type and time are filtered by the listing itself; status here too
            # (an operation's default covers several), and "waiting for a retry".
            if task.status not in statuses or (type_ and task.type != type_) or not query.in_range(task.created_at):
                return False
            if kind.waiting_retry_only and not (task.attempt > 1 and task.run_at > now):
                return False
            return True

        started = time.monotonic()
        budget = self._cfg.rpc_timeout_s
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            budget = min(budget, remaining)
        stop_at = started + max(budget - BULK_TIME_MARGIN_S, 0.5)
        answer = pb.BulkOperateResponse()
        bucket = TokenBucket(rate=rate, burst=1.0, tokens=1.0, updated=time.monotonic())
        cursor = ""
        done = False
        query = ListQuery(namespace=namespace, status=status, page_size=BULK_PAGE, extra={"list_days": self._cfg.list_days},
                          type=type_, created_after=after, created_before=before)  # fmt: skip
        while not done:
            query = dataclasses.replace(query, page_token=cursor)
            page = await self._lifecycle.list(query)
            for task in page.tasks:
                if not matches(task, now_ms()):
                    continue
                answer.matched += 1
                if not request.dry_run:
                    wait = bucket.take(time.monotonic())
                    if time.monotonic() + max(wait, 0.0) >= stop_at:
                        answer.matched -= 1  # not acted on: left for the next call
                        answer.stopped_at_time_limit = True
                        done = True
                        break
                    while wait > 0:
                        await asyncio.sleep(wait)
                        wait = bucket.take(time.monotonic())
                    await self._apply_one(request.operation, task, action, answer)
                if answer.matched >= request.max_count:
                    done = True
                    break
            cursor = page.next_token
            if done:
                break
            if not cursor:
                done = True
            elif time.monotonic() >= stop_at:  # the listing itself took the time
                answer.stopped_at_time_limit = done = True
        log.info(
            "bulk %s in %s by %r: matched %d, applied %d, conflicts %d, failed %d%s (%s)",
            pb.BulkOperation.Name(request.operation), namespace, action.operator, answer.matched, answer.applied,
            answer.conflicts, answer.failed, " (dry run)" if request.dry_run else "", reason,
        )  # fmt: skip
        return answer

    async def _apply_one(self, operation: int, task: Task, action: OperatorAction, answer: pb.BulkOperateResponse) -> None:
        version = version_of(task)
        try:
            if operation == pb.BULK_RETRY:
                done = await self._lifecycle.retry(task.task_id, version, action)
            elif operation == pb.BULK_RESUME:
                done = await self._lifecycle.resume(task.task_id, version, action)
            elif operation == pb.BULK_MARK_FAILED:
                done = await self._lifecycle.mark_failed(task.task_id, version, action)
            else:
                done = await self._lifecycle.terminate(task.task_id, version, action)
        except (FailedPrecondition, NotFound):
            answer.conflicts += 1  # it changed (or went) since it was listed: left to whoever moved it
            return
        except (PermissionDenied, InvalidArgument):
            raise
        except Exception as exc:  # noqa: BLE001 - one task's failure does not end the others
            log.warning("bulk: task %s not changed: %s", task.task_id, exc)
            answer.failed += 1
            return
        answer.applied += 1
        if len(answer.applied_task_ids) < BULK_LISTED_IDS:
            answer.applied_task_ids.append(str(done.task_id))
        await self._after(done)
