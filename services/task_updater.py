"""TaskUpdater: the worker API (claim, heartbeat, complete, fail).

Kept apart from TaskService so that worker traffic never starves users. Every
call is one conditional write on the lease token; a stale token is answered
FAILED_PRECONDITION "lease lost" and the worker must stop.

Every field is checked against ``leasesched.limits`` before the store is
touched (INVALID_ARGUMENT naming the field and the limit): worker_id of
``WORKER_ID_RE``, lease tokens within ``LEASE_TOKEN`` (a forged 0 or negative
token is malformed, not a lost lease), the claimed attempt within
``CLAIM_ATTEMPT``, progress within ``PROGRESS_PERCENT`` and
``MAX_PROGRESS_MESSAGE``, a failure's ``retry_after`` within ``RETRY_INTERVAL``.
A failure's error text and type are cut to ``MAX_ERROR_MESSAGE`` /
``MAX_ERROR_TYPE`` instead: the report must land.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import Awaitable, Callable, Sequence, TypeVar

import grpc

from leasesched import limits
from leasesched.auth import caller_namespace, hiding_missing
from leasesched.config import Config
from leasesched.errors import InvalidArgument
from leasesched.lifecycle import Lifecycle
from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.states import TaskStatus
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.convert import dur, status_to_pb, ts
from leasesched.server.error_mapping import item_status
from leasesched.server.validation import check_task_id, check_worker_id, created_task, duration_ms

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Reply = TypeVar("Reply")

TYPE_CACHE_SIZE = 50_000


def _check_progress(progress: pb.Progress) -> tuple[float, str]:
    """A reported progress within ``limits``: (percent, message)."""
    percent = float(limits.PROGRESS_PERCENT.check(progress.percent))
    if len(progress.message) > limits.MAX_PROGRESS_MESSAGE:
        raise InvalidArgument(f"progress.message is {len(progress.message)} characters, over the limit of {limits.MAX_PROGRESS_MESSAGE}")
    return percent, progress.message


def _check_token(token: int) -> int:
    """Only ClaimTask hands out tokens, and they are positive: anything else is forged."""
    return int(limits.LEASE_TOKEN.check(token, "lease_token"))


class TaskUpdater(pb_grpc.TaskUpdaterServicer):
    def __init__(self, cfg: Config, lifecycle: Lifecycle) -> None:
        self._cfg = cfg
        self._lifecycle = lifecycle
        # task id -> type of the tasks claimed here, for the type label of the
        # CompleteTask/FailTask metrics: their requests do not name the type and
        # a read per call would cost the store. Bounded; a miss counts as "unknown".
        self._types: OrderedDict[uuid.UUID, str] = OrderedDict()

    def _type_of(self, task_id: uuid.UUID, forget: bool = False) -> str:
        found = self._types.pop(task_id, None) if forget else self._types.get(task_id)
        return metrics.type_label(found) if found is not None else "unknown"

    async def ClaimTask(self, request: pb.ClaimTaskRequest, context: grpc.aio.ServicerContext) -> pb.ClaimTaskResponse:
        return await self._claim(request)

    async def CompleteTask(self, request: pb.CompleteTaskRequest, context: grpc.aio.ServicerContext) -> pb.CompleteTaskResponse:
        return await self._complete(request)

    async def ClaimTasks(self, request: pb.ClaimTasksRequest, context: grpc.aio.ServicerContext) -> pb.ClaimTasksResponse:
        """Each claim exactly as ClaimTask, concurrently; one result each, in order."""
        outcomes = await _each(request.claims, "claims", self._claim)
        results = [
            pb.ClaimTaskResult(claimed=o) if isinstance(o, pb.ClaimTaskResponse) else pb.ClaimTaskResult(error=_error(o, "ClaimTasks"))
            for o in outcomes
        ]
        return pb.ClaimTasksResponse(results=results)

    async def CompleteTasks(self, request: pb.CompleteTasksRequest, context: grpc.aio.ServicerContext) -> pb.CompleteTasksResponse:
        """Each completion exactly as CompleteTask, concurrently; one result each, in order."""
        outcomes = await _each(request.completions, "completions", self._complete)
        results = [
            pb.CompleteTaskResult(completed=o)
            if isinstance(o, pb.CompleteTaskResponse)
            else pb.CompleteTaskResult(error=_error(o, "CompleteTasks"))
            for o in outcomes
        ]
        return pb.CompleteTasksResponse(results=results)

    async def _claim(self, request: pb.ClaimTaskRequest) -> pb.ClaimTaskResponse:
        task_id = check_task_id(request.task_id)
        worker_id = check_worker_id(request.worker_id)
        # 0 means "any attempt"; a negative one is malformed, not a stale dispatch.
        attempt = int(limits.CLAIM_ATTEMPT.check(request.attempt))
        created = created_task(task_id, request.created, self._cfg) if request.HasField("created") else None
        with hiding_missing(task_id):
            lease = await self._lifecycle.claim(task_id, worker_id, attempt, namespace=caller_namespace(), created=created)
        task = lease.task
        log.info(
            "task %s claimed by %s (token %d, attempt %d)", task_id, request.worker_id, lease.token, task.attempt,
            extra=fields(task_id=str(task_id), lease_token=lease.token, worker=request.worker_id, shard=task.shard, lease_event="claimed"),
        )  # fmt: skip
        self._types[task_id] = task.type
        if len(self._types) > TYPE_CACHE_SIZE:
            self._types.popitem(last=False)
        metrics.tasks_claimed.labels(metrics.type_label(task.type)).inc()
        if task.started_at is not None:
            metrics.dispatch_lag.observe(max(0.0, (task.started_at - task.run_at) / 1000))
        return pb.ClaimTaskResponse(
            task_id=str(task_id),
            lease_token=lease.token,
            lease_expires_at=ts(lease.expires_at),
            lease_duration=dur(task.lease_ms),
            payload=task.payload,
            attempt=task.attempt,
            type=task.type,
            namespace=task.namespace,
            start_to_close=dur(task.timeouts.start_to_close_ms),
        )

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        task_id = check_task_id(request.task_id)
        token = _check_token(request.lease_token)
        percent, message = _check_progress(request.progress)
        if request.worker_id:  # optional here: the lease token alone proves the lease
            check_worker_id(request.worker_id)
        with hiding_missing(task_id):
            ack = await self._lifecycle.heartbeat(task_id, token, percent, message, namespace=caller_namespace())
        return pb.HeartbeatResponse(lease_expires_at=ts(ack.expires_at), cancel_requested=ack.cancel_requested)

    async def _complete(self, request: pb.CompleteTaskRequest) -> pb.CompleteTaskResponse:
        task_id = check_task_id(request.task_id)
        token = _check_token(request.lease_token)
        if len(request.result) > self._cfg.max_result_bytes:
            raise InvalidArgument(f"result is {len(request.result)} bytes, over the limit of {self._cfg.max_result_bytes}")
        message = _check_progress(request.progress)[1] if request.HasField("progress") else None
        with hiding_missing(task_id):
            status = await self._lifecycle.complete(
                task_id, token, request.result, namespace=caller_namespace(), progress_message=message
            )
        log.info(
            "task %s completed under token %d", task_id, request.lease_token,
            extra=fields(task_id=str(task_id), lease_token=request.lease_token, lease_event="reported"),
        )  # fmt: skip
        metrics.tasks_completed.labels(self._type_of(task_id, forget=True)).inc()
        return pb.CompleteTaskResponse(status=status_to_pb(status))

    async def FailTask(self, request: pb.FailTaskRequest, context: grpc.aio.ServicerContext) -> pb.FailTaskResponse:
        task_id = check_task_id(request.task_id)
        token = _check_token(request.lease_token)
        # Cut, not refused: a failure report must land, or the task waits for
        # its lease to expire (limits.MAX_ERROR_MESSAGE).
        error, error_type = request.error[: limits.MAX_ERROR_MESSAGE], request.error_type[: limits.MAX_ERROR_TYPE]
        # Refused, not cut: a worker cuts it to the bound before sending (worker.handlers.RetryAfter),
        # so anything outside is malformed.
        retry_after_ms = (
            duration_ms(request.retry_after, limits.RETRY_INTERVAL, "retry_after") if request.HasField("retry_after") else 0
        )
        namespace = caller_namespace()
        with hiding_missing(task_id):
            if request.cancelled:  # wins over released: the user asked for the stop
                outcome = await self._lifecycle.acknowledge_cancel(task_id, token, error, error_type, namespace=namespace)
            elif request.released:
                outcome = await self._lifecycle.release(task_id, token, namespace=namespace)
            elif request.rate_limited:
                if retry_after_ms <= 0:
                    raise InvalidArgument("rate_limited needs a retry_after > 0 (until when the gate is closed)")
                outcome = await self._lifecycle.rate_limited(
                    task_id, token, retry_after_ms, error, error_type or "RateLimited", namespace=namespace,
                )  # fmt: skip
            else:
                outcome = await self._lifecycle.fail(
                    task_id, token, error, error_type, non_retryable=request.non_retryable, namespace=namespace,
                    retry_after_ms=retry_after_ms,
                )  # fmt: skip
        log.info(
            "task %s failed under token %d: now %s", task_id, request.lease_token, outcome.status.value,
            extra=fields(task_id=str(task_id), lease_token=request.lease_token, lease_event="reported"),
        )  # fmt: skip
        type_ = self._type_of(task_id, forget=True)
        if outcome.status == TaskStatus.SCHEDULED:
            reason = "released" if request.released else ("rate_limited" if request.rate_limited else "retry")
            metrics.tasks_requeued.labels(type_, reason).inc()
        elif outcome.status == TaskStatus.FAILED:
            metrics.tasks_failed.labels(type_, "error").inc()
        elif outcome.status == TaskStatus.CANCELLED:
            metrics.tasks_cancelled.labels(type_).inc()
        return pb.FailTaskResponse(status=status_to_pb(outcome.status), next_run_at=ts(outcome.next_run_at))


async def _each(
    items: Sequence[Request], field: str, one: Callable[[Request], Awaitable[Reply]]
) -> list[Reply | BaseException]:
    """``one`` for every item of a batch call, concurrently (each is its own
    conditional write; none waits for another), with each item's exception
    kept as its result instead of failing the call."""
    limits.BATCH_ITEMS.check(len(items), field)
    return await asyncio.gather(*(one(item) for item in items), return_exceptions=True)


def _error(exc: BaseException, method: str) -> pb.ItemError:
    code, message = item_status(exc, method)
    return pb.ItemError(code=code.value[0], message=message)
