"""TaskService: the user API (schedule, poll, cancel, list, count)."""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Awaitable, Callable

import grpc

from leasesched.auth import hiding_missing, require_namespace, require_payload_access, require_task_access
from leasesched.config import Config
from leasesched.model import Task
from leasesched import limits
from leasesched.errors import InvalidArgument, SchedulerError, Unavailable
from leasesched.lifecycle import Lifecycle
from leasesched.model import now_ms
from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.server.error_mapping import item_status
from leasesched.states import TaskStatus
from leasesched.store.base import ListQuery, StoreUnavailable
from leasesched.store.page_token import BadPageToken, decode_token
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.convert import history_entry_view, status_from_pb, status_to_pb, task_view, ts
from services.gate_service import GateBook
from services.page_tokens import PageTokens, list_filters
from services.poll_cache import FinishedTasks
from services.rate_limit import BATCH_IN_FLIGHT
from services.slot_use import SlotUse
from services.waiting_reasons import WaitingReasons
from leasesched.limits import MAX_STORED_TIME_MS
from leasesched.server.validation import (
    check_namespace,
    check_task_id,
    check_type,
    request_hash,
    timestamp_ms,
    validate_schedule,
)
from services.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)

# Called with (task_id, shard) after an immediate task is stored: a hint to the
# shard's trigger so the task is dispatched in milliseconds, not at the next scan.
PAGE_TOKEN_SECRET = "list_page_tokens"
# A ListTasks page ends early past this many bytes of tasks: results are up to
# 1 MiB each and a gRPC answer at most 4 MiB (leasesched/server/grpc_server.py), so a page of
# big results is shorter, never refused (it was RESOURCE_EXHAUSTED).
LIST_PAGE_BYTES = 3 * 1024 * 1024  # the name of the store's shared secret

# CountTasks of FAILED reads at most this many dead-letter entries (one
# partition, ~40 bytes each, read in pages of 5,000); past it the counts are
# lower bounds (exact=false).
COUNT_FAILED_MAX = 100_000
# CountTasks of any other status examines at most about this many listed
# tasks (each one a task-row read), newest first, in pages of COUNT_SCAN_PAGE.
COUNT_SCAN_ROWS = 10_000
COUNT_SCAN_PAGE = 500


def _time_range(request: pb.ListTasksRequest) -> tuple[int | None, int | None]:
    """(created_after, created_before) in ms, None when unset; INVALID_ARGUMENT
    for a time no task can have or a range that ends before it starts."""
    bounds: list[int | None] = []
    for name in ("created_after", "created_before"):
        if not request.HasField(name):
            bounds.append(None)
            continue
        ms = timestamp_ms(getattr(request, name), name)
        if not 0 <= ms <= MAX_STORED_TIME_MS:
            raise InvalidArgument(f"{name} must lie between 1970-01-01 and 9999-12-31")
        bounds.append(ms)
    after, before = bounds
    if after is not None and before is not None and after > before:
        raise InvalidArgument("created_after is later than created_before: the range is empty")
    return after, before


# Tells the shard's trigger about a task due now; with the write id of its
# creation by this call, the hint may carry its row (``DueNotifier``).
DueHint = Callable[[Task, uuid.UUID | None], Awaitable[None]]


class TaskService(pb_grpc.TaskServiceServicer):
    def __init__(
        self,
        cfg: Config,
        lifecycle: Lifecycle,
        shards: int,
        notify_due: DueHint | None = None,
        workers: WorkerDirectory | None = None,
        gates: GateBook | None = None,
        slots: SlotUse | None = None,
        on_key: Callable[[str, str], None] | None = None,
    ) -> None:
        """``gates``, ``slots``: the process's (shared with ScheduleService and
        LimitService, so a gate or a group is read once for all of them); new
        ones when not given. The limits table is the lifecycle's (its claims'
        ``Admission``): one read of the limits every 2 s per process. ``on_key``: told
        (namespace, concurrency key) of every task scheduled with a key
        (``services/limit_sampler.LimitSampler.note_key``)."""
        self._cfg = cfg
        self._on_key = on_key
        self._lifecycle = lifecycle
        self._shards = shards
        self._notify_due = notify_due
        self._workers = workers
        self._finished = FinishedTasks(cfg.poll_cache_mb * 1024 * 1024)
        self._tokens: PageTokens | None = None
        self._gates = gates if gates is not None else GateBook(lifecycle.store)
        self._reasons = WaitingReasons(
            self._gates, lifecycle.admission.table, slots if slots is not None else SlotUse(lifecycle.store)
        )

    async def ScheduleTask(self, request: pb.ScheduleTaskRequest, context: grpc.aio.ServicerContext) -> pb.ScheduleTaskResponse:
        return await self._schedule(request)

    async def ScheduleTasks(self, request: pb.ScheduleTasksRequest, context: grpc.aio.ServicerContext) -> pb.ScheduleTasksResponse:
        """Each task through the very path of ScheduleTask (``_schedule``), so
        validation, the namespace check, idempotency, the gate check and the
        due hint are the same code; a refusal is the task's own result, never
        the call's. At most ``BATCH_IN_FLIGHT`` tasks are in progress at once:
        the call holds that many of the service's concurrency slots
        (services/rate_limit.py), and one call must not flood Cassandra."""
        count = len(request.tasks)
        limits.SCHEDULE_BATCH.check(count)
        results: list[pb.ScheduleTaskResult] = [pb.ScheduleTaskResult() for _ in range(count)]
        pending = iter(range(count))

        async def drain() -> None:
            for index in pending:  # one iterator shared by the workers: each task is taken once
                await self._schedule_into(results[index], index, request.tasks[index])

        await asyncio.gather(*(drain() for _ in range(min(count, BATCH_IN_FLIGHT))))
        return pb.ScheduleTasksResponse(results=results)

    async def _schedule_into(self, result: pb.ScheduleTaskResult, index: int, request: pb.ScheduleTaskRequest) -> None:
        """One task of a ScheduleTasks call: its answer, or the status code and
        message ScheduleTask would have refused it with, naming the task. An
        unexpected error is INTERNAL for this task alone (logged, as the error
        mapping does for a whole call), so the others still get their answers."""
        try:
            result.scheduled.CopyFrom(await self._schedule(request))
        except Exception as exc:  # noqa: BLE001 - this task's own answer, as for any batch item
            code, message = item_status(exc, f"ScheduleTasks tasks[{index}]")
            result.error.code, result.error.message = code.value[0], f"tasks[{index}]: {message}"

    async def _schedule(self, request: pb.ScheduleTaskRequest) -> pb.ScheduleTaskResponse:
        """One task, for ScheduleTask and for each task of ScheduleTasks: the
        only copy of the schedule path. Raises a ``SchedulerError`` to refuse."""
        now = now_ms()
        require_namespace(check_namespace(request.task.namespace))
        task = validate_schedule(request, self._cfg, self._shards, now)
        if task.gate:
            # Decision (docs/design.md, "Gates"): a gate that does not exist is
            # refused here, not taken as "no gate" (a typo would run the task
            # unlimited). One read per gate per few seconds (GateBook's cache).
            await self._gates.require(task.namespace, task.gate)
        outcome = await self._lifecycle.schedule(task, request.idempotency_key, request_hash(request), self._shards)
        stored = outcome.task
        log.info(
            "task %s %s (type=%s, shard=%d)", stored.task_id, "scheduled" if outcome.created else "found by key",
            stored.type, stored.shard, extra=fields(task_id=str(stored.task_id), shard=stored.shard),
        )  # fmt: skip
        if outcome.created:
            metrics.tasks_scheduled.labels(metrics.type_label(stored.type)).inc()
            if stored.concurrency_key and self._on_key is not None:
                self._on_key(stored.namespace, stored.concurrency_key)
            if self._workers is not None and self._workers.serves(stored.namespace, stored.type) is False:
                metrics.tasks_scheduled_without_worker.labels(metrics.type_label(stored.type)).inc()
        if outcome.created and self._notify_due is not None and stored.run_at <= now_ms():
            await self._notify_due(stored, outcome.write_id)
        return pb.ScheduleTaskResponse(task_id=str(stored.task_id), run_at=ts(stored.run_at), created=outcome.created)

    async def PollTask(self, request: pb.PollTaskRequest, context: grpc.aio.ServicerContext) -> pb.PollTaskResponse:
        task_id = check_task_id(request.task_id)
        if request.include_payload:
            require_payload_access("include_payload")
        view = None if request.include_payload else self._finished.get(task_id)  # the cache holds no payloads
        if view is not None:
            require_task_access(view.namespace, task_id)
            return pb.PollTaskResponse(task=view)
        task = await self._visible(task_id)
        view = self._view(task)
        if request.include_payload:
            view.payload = task.payload
        # Its gate and its full limits, each read at most once a second (services/waiting_reasons.py).
        view.waiting_reason = await self._reasons.of(task, now_ms())
        if not request.include_payload:
            self._finished.remember(task_id, view, final=task.status.terminal)
        return pb.PollTaskResponse(task=view)

    def forget_finished(self, task_id: uuid.UUID) -> None:
        """An operator action changed the task: PollTask reads it again
        (services/poll_cache.py; OperatorService calls this)."""
        self._finished.forget(task_id)

    def _view(self, task: Task) -> pb.TaskView:
        view = task_view(task, stuck_lease_losses=self._cfg.stuck_lease_losses)
        if task.status == TaskStatus.SCHEDULED and self._workers is not None:
            view.no_worker_for_type = self._workers.serves(task.namespace, task.type) is False
        return view

    async def _visible(self, task_id: uuid.UUID) -> Task:
        """The task, if the caller may see it; foreign and missing look the same."""
        with hiding_missing(task_id):
            task = await self._lifecycle.get(task_id)
        require_task_access(task.namespace, task_id)
        return task

    async def CancelTask(self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext) -> pb.CancelTaskResponse:
        task_id = check_task_id(request.task_id)
        await self._visible(task_id)
        task = await self._lifecycle.cancel(task_id)
        log.info("task %s cancel: now %s", task.task_id, task.status.value)
        return pb.CancelTaskResponse(task=self._view(task))

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        namespace = check_namespace(request.namespace)
        require_namespace(namespace)
        if request.page_size < 0 or request.page_size > self._cfg.list_page_max:
            raise InvalidArgument(f"page_size must be between 0 and {self._cfg.list_page_max}")
        if request.status not in pb.TaskStatus.values():
            raise InvalidArgument(f"status {request.status} is not a TaskStatus")
        task_type = check_type(request.type) if request.type else ""
        after, before = _time_range(request)
        filters = list_filters(task_type, after, before)
        tokens = await self._page_tokens()
        cursor = tokens.verify(request.page_token, namespace, request.status, filters)
        try:
            decode_token(cursor)
        except BadPageToken:  # signed by a server but not a cursor: a bug, or a leaked key
            log.error("a correctly signed page token holds no cursor: %r", cursor[:100])
            raise InvalidArgument("page_token is not a token this server issued") from None
        query = ListQuery(
            namespace=namespace,
            status=status_from_pb(request.status),
            page_size=request.page_size or 100,
            page_token=cursor,
            extra={"list_days": self._cfg.list_days},
            max_bytes=LIST_PAGE_BYTES,
            type=task_type,
            created_after=after,
            created_before=before,
        )
        page = await self._lifecycle.list(query)
        next_token = tokens.sign(page.next_token, namespace, request.status, filters)
        return pb.ListTasksResponse(tasks=[self._view(t) for t in page.tasks], next_page_token=next_token)

    async def CountTasks(self, request: pb.CountTasksRequest, context: grpc.aio.ServicerContext) -> pb.CountTasksResponse:
        """FAILED: exact, from the dead-letter index. Anything else: a bounded
        scan of the newest listed tasks (see CountMethod in the proto)."""
        namespace = check_namespace(request.namespace)
        require_namespace(namespace)
        if request.status not in pb.TaskStatus.values():
            raise InvalidArgument(f"status {request.status} is not a TaskStatus")
        task_type = check_type(request.type) if request.type else ""
        status = status_from_pb(request.status)
        response = pb.CountTasksResponse()
        if status == TaskStatus.FAILED:
            try:
                failed = await self._lifecycle.store.count_failed(namespace, task_type, COUNT_FAILED_MAX)
            except StoreUnavailable as exc:
                raise Unavailable(str(exc)) from exc
            for name in sorted(failed.counts):
                response.rows.add(type=name, status=pb.FAILED, count=failed.counts[name])
            response.exact, response.method, response.scanned = failed.exact, pb.FAILED_INDEX, failed.scanned
            return response
        counts: collections.Counter[tuple[str, TaskStatus]] = collections.Counter()
        token, scanned = "", 0
        while True:
            query = ListQuery(
                namespace=namespace, status=status, type=task_type, page_size=COUNT_SCAN_PAGE, page_token=token,
                extra={"list_days": self._cfg.list_days},
            )  # fmt: skip
            page = await self._lifecycle.list(query)
            scanned += page.scanned
            counts.update((t.type, t.status) for t in page.tasks)
            token = page.next_token
            if not token or scanned >= COUNT_SCAN_ROWS:
                break
        for (name, task_status), count in sorted(counts.items(), key=lambda item: (item[0][0], item[0][1].value)):
            response.rows.add(type=name, status=status_to_pb(task_status), count=count)
        response.exact, response.method, response.scanned = not token, pb.RECENT_SCAN, scanned
        return response
    async def GetTaskHistory(
        self, request: pb.GetTaskHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTaskHistoryResponse:
        """A task's attempts and operator actions, newest first (docs/operations.md,
        "Attempt history"). Who may see the task may see its history: the same
        check as PollTask (a foreign task and a missing one look the same)."""
        task_id = check_task_id(request.task_id)
        if request.limit < 0:
            raise InvalidArgument(f"limit must be 0 (the bound, {self._cfg.history_max_entries}) or more, not {request.limit}")
        task = await self._visible(task_id)
        entries = await self._lifecycle.history.read(task_id, request.limit, current=task)
        return pb.GetTaskHistoryResponse(entries=[history_entry_view(e) for e in entries])

    async def _page_tokens(self) -> PageTokens:
        """The signer, with the cluster's shared key (read from the store once)."""
        if self._tokens is None:
            try:
                secret = await self._lifecycle.store.cluster_secret(PAGE_TOKEN_SECRET)
            except StoreUnavailable as exc:
                raise Unavailable(f"cannot read the page-token key: {exc}") from exc
            self._tokens = PageTokens(secret)
        return self._tokens
