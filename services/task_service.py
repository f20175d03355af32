"""TaskService: the user API (schedule, poll, cancel, list)."""

from __future__ import annotations

import logging
import uuid
from typing import Awaitable, Callable

import grpc

from leasesched.auth import hiding_missing, require_namespace, require_task_access
from leasesched.config import Config
from leasesched.model import Task
from leasesched.errors import InvalidArgument, Unavailable
from leasesched.lifecycle import Lifecycle
from leasesched.model import now_ms
from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.states import TaskStatus
from leasesched.store.base import ListQuery, StoreUnavailable
from leasesched.store.page_token import BadPageToken, decode_token
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.convert import status_from_pb, task_view, ts
from services.gate_service import GateBook
from services.page_tokens import PageTokens
from services.poll_cache import FinishedTasks
from services.slot_use import SlotUse
from services.waiting_reasons import WaitingReasons
from leasesched.server.validation import check_namespace, check_task_id, request_hash, validate_schedule
from services.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)

# Called with (task_id, shard) after an immediate task is stored: a hint to the
# shard's trigger so the task is dispatched in milliseconds, not at the next scan.
PAGE_TOKEN_SECRET = "list_page_tokens"
# A ListTasks page ends early past this many bytes of tasks: results are up to
# 1 MiB each and a gRPC answer at most 4 MiB (leasesched/server/grpc_server.py), so a page of
# big results is shorter, never refused (it was RESOURCE_EXHAUSTED).
LIST_PAGE_BYTES = 3 * 1024 * 1024  # the name of the store's shared secret

DueHint = Callable[[Task], Awaitable[None]]  # tells the shard's trigger about a task due now


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
            await self._notify_due(stored)
        return pb.ScheduleTaskResponse(task_id=str(stored.task_id), run_at=ts(stored.run_at), created=outcome.created)

    async def PollTask(self, request: pb.PollTaskRequest, context: grpc.aio.ServicerContext) -> pb.PollTaskResponse:
        task_id = check_task_id(request.task_id)
        view = self._finished.get(task_id)
        if view is not None:
            require_task_access(view.namespace, task_id)
            return pb.PollTaskResponse(task=view)
        task = await self._visible(task_id)
        view = self._view(task)
        # Its gate and its full limits, each read at most once a second (services/waiting_reasons.py).
        view.waiting_reason = await self._reasons.of(task, now_ms())
        self._finished.remember(task_id, view, final=task.status.terminal)
        return pb.PollTaskResponse(task=view)

    def forget_finished(self, task_id: uuid.UUID) -> None:
        """An operator action changed the task: PollTask reads it again
        (services/poll_cache.py; OperatorService calls this)."""
        self._finished.forget(task_id)

    def _view(self, task: Task) -> pb.TaskView:
        view = task_view(task)
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
        return pb.CancelTaskResponse(task=task_view(task))

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        namespace = check_namespace(request.namespace)
        require_namespace(namespace)
        if request.page_size < 0 or request.page_size > self._cfg.list_page_max:
            raise InvalidArgument(f"page_size must be between 0 and {self._cfg.list_page_max}")
        if request.status not in pb.TaskStatus.values():
            raise InvalidArgument(f"status {request.status} is not a TaskStatus")
        tokens = await self._page_tokens()
        cursor = tokens.verify(request.page_token, namespace, request.status)
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
        )
        page = await self._lifecycle.list(query)
        next_token = tokens.sign(page.next_token, namespace, request.status)
        return pb.ListTasksResponse(tasks=[self._view(t) for t in page.tasks], next_page_token=next_token)

    async def _page_tokens(self) -> PageTokens:
        """The signer, with the cluster's shared key (read from the store once)."""
        if self._tokens is None:
            try:
                secret = await self._lifecycle.store.cluster_secret(PAGE_TOKEN_SECRET)
            except StoreUnavailable as exc:
                raise Unavailable(f"cannot read the page-token key: {exc}") from exc
            self._tokens = PageTokens(secret)
        return self._tokens
