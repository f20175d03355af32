"""Every change of a task's state, as the services and the trigger perform it.

Each operation reads the task, builds the write as a ``changes.TaskChange``
(whose constructor per transition asks ``states`` whether it is legal), and
writes it with one conditional write on the status (and lease token) it
read, so two actors can never both win one transition. The loser learns it
from the write's answer: a cancel re-reads and decides again; a worker's
claim, heartbeat or report is answered FAILED_PRECONDITION (its lease is
gone); the trigger's lease-expiry and deadline writes report "not applied"
and leave the task to whoever moved it.

Write order keeps crashes harmless: a due-index entry is written *before* the
task row (or the status) that makes it meaningful. A crash in between leaves
an entry that points at nothing or at a task in another state, which the
trigger recognises and drops; it never leaves a task that no trigger will find.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from leasesched.admission import Admission
from leasesched.attempt_history import AttemptHistory, failure_outcome
from leasesched.concurrency import LIMIT_REACHED
from leasesched.changes import UNSET, TaskChange
from leasesched.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from leasesched.history import AttemptOutcome, Operation
from leasesched.limits import MAX_ERROR_MESSAGE, RETRY_INTERVAL
from leasesched.model import DueEntry, Task, now_ms, shard_of
from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.states import TRANSITIONS, TaskStatus, Transition, allowed, quarantined_status
from leasesched.versions import TaskVersion, version_of
from leasesched.store.base import (
    CasResult,
    Expect,
    IdempotencyRecord,
    ListQuery,
    Page,
    StoreUnavailable,
    TaskStore,
    UnreadableTask,
    Untouched,
    creation_write_id,
)

log = logging.getLogger(__name__)

MAX_RACE_RETRIES = 5


@dataclass(frozen=True)
class Scheduled:
    task: Task
    created: bool
    # The write id the creation wrote (None: not created by this call): with
    # the task, what a claim without a read is conditional on (``Untouched``).
    write_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Lease:
    task: Task
    token: int
    expires_at: int


@dataclass(frozen=True)
class HeartbeatAck:
    expires_at: int
    cancel_requested: bool


@dataclass(frozen=True)
class OperatorAction:
    """Who performs an operator action and why: recorded in the task's history.
    ``operator``: the calling token's name or id ("" with auth off)."""

    operator: str
    reason: str


@dataclass(frozen=True)
class FailOutcome:
    status: TaskStatus
    next_run_at: int | None = None


def deadline_passed(task: Task, now: int) -> str | None:
    """Why ``task`` may no longer run at ``now`` (its schedule_to_close passed, or it
    waited past schedule_to_start), or None. Checked by the trigger when it handles
    a due entry and by every claim."""
    if task.deadline_at is not None and now >= task.deadline_at:
        return f"schedule_to_close of {task.timeouts.schedule_to_close_ms} ms exceeded"
    if (
        task.status == TaskStatus.SCHEDULED
        and task.timeouts.schedule_to_start_ms
        and now >= task.run_at + task.timeouts.schedule_to_start_ms
    ):
        return f"schedule_to_start of {task.timeouts.schedule_to_start_ms} ms exceeded"
    return None


def _entry(task: Task, kind: str, due_at: int, token: int) -> DueEntry:
    return DueEntry(
        shard=task.shard,
        due_at=due_at,
        task_id=task.task_id,
        kind=kind,
        attempt=task.attempt,
        priority=task.priority,
        type=task.type,
        lease_token=token,
    )


def run_entry(task: Task, due_at: int) -> DueEntry:
    """An entry saying: dispatch this task at due_at, under the token it has now."""
    return _entry(task, DueEntry.RUN, due_at, task.lease_token)


def lease_entry(task: Task, expires_at: int, grace_ms: int, token: int) -> DueEntry:
    """An entry saying: check lease ``token`` once it may have expired (expiry + grace)."""
    return _entry(task, DueEntry.LEASE, expires_at + grace_ms, token)


class Lifecycle:
    """The one place that turns requests into conditional writes."""

    def __init__(
        self,
        store: TaskStore,
        lease_grace_ms: int = 2000,
        admission: Admission | None = None,
        history_max_entries: int = 100,
    ) -> None:
        self.store = store
        self.lease_grace_ms = lease_grace_ms
        # Concurrency limits (leasesched/admission.py): slots taken at a claim, given back when the attempt ends.
        self.admission = admission if admission is not None else Admission(store)
        # Each attempt's record (leasesched/attempt_history.py): written after the state change applied, never failing it.
        self.history = AttemptHistory(store, history_max_entries)

    # ------------------------------------------------------------------ users

    async def schedule(
        self, task: Task, idempotency_key: str = "", request_hash: bytes = b"", shards: int | None = None
    ) -> Scheduled:
        """Create ``task`` (or return the one its idempotency key already names).

        ``task.task_id`` must have been drawn at random for this call (as
        validation does): without a key the row is created without a
        conditional round, which is only safe for an id nobody else knows.
        ``shards``: the cluster's logical shard count, to place a task whose id
        an idempotency key reserved earlier."""
        try:
            if idempotency_key:
                record = IdempotencyRecord(task.task_id, request_hash)
                existing = await self.store.claim_idempotency_key(task.namespace, idempotency_key, record)
                if existing is not None:
                    if existing.request_hash != request_hash:
                        raise AlreadyExists(
                            f"idempotency_key {idempotency_key!r} was already used for a different request "
                            f"(task {existing.task_id})"
                        )
                    found = await self.read(existing.task_id)
                    if found is not None:
                        return Scheduled(found, created=False)
                    # An earlier attempt bound the key and died before the task
                    # row: finish its work under the id it reserved.
                    if shards is None:
                        raise ValueError("shards is needed to finish a task reserved by an idempotency key")
                    task = task.replace(task_id=existing.task_id, shard=shard_of(existing.task_id, shards))
            # Index entry first: a crash after it leaves only an orphan entry.
            await self.store.add_due(run_entry(task, max(task.run_at, now_ms())))
            # Without a key the id is the one validation just drew: nobody can
            # have used it, so no conditional round is needed (and its write id
            # is its own id). With one, a write id of its own.
            write_id = uuid.uuid4() if idempotency_key else creation_write_id(task.task_id)
            if not await self.store.insert_task(task, new_id=not idempotency_key, write_id=write_id):
                found = await self.read(task.task_id, serial=True)
                if found is None:
                    raise Aborted("task insert raced and could not be read back; retry")
                return Scheduled(found, created=False)
            return Scheduled(task, created=True, write_id=write_id)
        except (StoreUnavailable, UnreadableTask) as exc:
            raise Unavailable(str(exc)) from exc

    async def create_slot_task(self, task: Task, may_exist: bool = False) -> bool:
        """Create the task of a schedule's slot, or leave it as it is.

        A plain insert, without a conditional round, like a task whose id was
        just drawn, and for the same reason it is safe: the row is written
        with the creation timestamp that every later change outranks
        (``CREATION_TIMESTAMP_US``), and everyone who writes it writes the
        same values (the id is derived from the slot, ``created_at`` is the
        time the firing was decided, recorded with the run). So a second
        insert, by an evaluator finishing a firing whose creator may have
        died, changes nothing: not a claim, not a completion, not a cancel
        made since. That saves a Paxos round per run (measured: 5 LWTs per
        scheduled run before, 3 now: the schedule's write, claim, complete).

        ``may_exist``: the task may have been made by another firing at
        another time (a backfilled slot the regular firing ran): then its
        ``created_at`` differs, and a plain insert would list it twice, so it
        is a conditional insert. Returns False when it existed (only known
        with ``may_exist``)."""
        try:
            await self.store.add_due(run_entry(task, max(task.run_at, now_ms())))
            if may_exist:
                return await self.store.insert_task(task, new_id=False)
            await self.store.insert_task(task, new_id=True)
            return True
        except (StoreUnavailable, UnreadableTask) as exc:
            raise Unavailable(str(exc)) from exc

    async def read(self, task_id: uuid.UUID, serial: bool = False) -> Task | None:
        """The task as stored, or None: every reader's way to a task row.

        A row the store finds unreadable (``UnreadableTask``: a time past year
        9999, an unknown status, ...) is quarantined here and read again, so
        every reader (services, trigger) sees a plain FAILED task instead of
        an error it would meet again on every read. Raises the store's errors:
        ``StoreUnavailable``, or ``UnreadableTask`` when the row stays
        unreadable after ``MAX_RACE_RETRIES`` tries (it kept changing)."""
        for _ in range(MAX_RACE_RETRIES):
            try:
                return await self.store.get_task(task_id, serial=serial)
            except UnreadableTask as bad:
                await self._quarantine(bad)
        return await self.store.get_task(task_id, serial=serial)

    async def get(self, task_id: uuid.UUID, namespace: str | None = None) -> Task:
        """The task; with ``namespace``, a task of another namespace is refused."""
        try:
            task = await self.read(task_id)
        except (StoreUnavailable, UnreadableTask) as exc:
            raise Unavailable(str(exc)) from exc
        if task is None:
            raise NotFound(f"task {task_id} not found")
        if namespace is not None and task.namespace != namespace:
            raise PermissionDenied(f"task {task_id} is not in namespace {namespace!r} or does not exist")
        return task

    async def list(self, query: ListQuery) -> Page:
        """A page of tasks; unreadable rows on it are quarantined and listed
        (as the FAILED tasks they now are) in their places."""
        try:
            page = await self.store.list_tasks(query)
            if not page.unreadable:
                return page
            tasks = list(page.tasks)
            dropped = 0
            for position, bad in page.unreadable:
                await self._quarantine(bad)
                task = await self.read(bad.task_id)
                if task is None or not query.matches(task):
                    dropped += 1
                    continue
                tasks.insert(min(position - dropped, len(tasks)), task)
            return Page(tasks, page.next_token, scanned=page.scanned)
        except (StoreUnavailable, UnreadableTask) as exc:
            raise Unavailable(str(exc)) from exc

    async def cancel(self, task_id: uuid.UUID) -> Task:
        """SCHEDULED → CANCELLED at once; RUNNING → cancel requested for its worker."""
        for _ in range(MAX_RACE_RETRIES):
            task = await self.get(task_id)
            now = now_ms()
            if task.status.terminal:
                raise FailedPrecondition(f"task {task_id} is already {task.status.value}; nothing to cancel")
            if task.status == TaskStatus.SCHEDULED:
                change = TaskChange.cancel(task, now)
                expect = Expect(TaskStatus.SCHEDULED, lease_token=task.lease_token)
            else:
                if task.cancel_requested:
                    return task
                change = TaskChange.request_cancel(task)
                expect = Expect(TaskStatus.RUNNING, lease_token=task.lease_token)
            if (await self._write(task_id, expect, change)).applied:
                return change.apply(task)
        raise Aborted(f"task {task_id} kept changing while cancelling; retry")

    # ---------------------------------------------------------------- workers

    async def claim(
        self, task_id: uuid.UUID, worker_id: str, attempt: int, now: int | None = None, namespace: str | None = None,
        created: Untouched | None = None,
    ) -> Lease:
        """SCHEDULED → RUNNING with a new, larger lease token.

        ``created``: the task as its creation hint described it (``CreatedTask``
        on the dispatch) and the write id of its creation. A task that is still
        exactly that row is claimed by one conditional write on it, without
        reading it first; if the row is not that any more (claimed, cancelled,
        changed), or anything about it needs a look (not due yet, past its
        deadline, another attempt asked for), the claim goes the usual way
        below, from a read."""
        if created is not None and created.task.task_id == task_id:
            lease = await self._claim_created(created, worker_id, attempt, namespace, now)
            if lease is not None:
                return lease
        task = await self.get(task_id, namespace)
        now = now_ms() if now is None else now
        if task.status != TaskStatus.SCHEDULED:
            raise FailedPrecondition(f"task {task_id} is {task.status.value}, not claimable")
        if attempt and attempt != task.attempt:
            raise FailedPrecondition(f"task {task_id} is at attempt {task.attempt}, the dispatch was for {attempt}")
        if task.run_at > now + 1000:
            raise FailedPrecondition(f"task {task_id} is not due until {task.run_at}")
        if task.cancel_requested:
            raise FailedPrecondition(f"task {task_id} has a cancel request")
        late = deadline_passed(task, now)
        if late is not None:
            # Never started past its deadline, however long it waited in a
            # dispatcher queue or behind re-dispatches since the trigger looked.
            if await self.fail_deadline(task, late):
                log.info("task %s failed at its claim: %s", task.task_id, late, extra=fields(task_id=str(task.task_id)))
                metrics.tasks_failed.labels(metrics.type_label(task.type), "deadline").inc()
            raise FailedPrecondition(f"task {task_id} is past its deadline: {late}")
        lease = await self._lease(task, worker_id, now, Expect(TaskStatus.SCHEDULED, lease_token=task.lease_token))
        if lease is None:
            raise FailedPrecondition(f"task {task_id} was claimed by someone else")
        return lease

    async def _claim_created(
        self, created: Untouched, worker_id: str, attempt: int, namespace: str | None, now: int | None
    ) -> Lease | None:
        """The claim of a task untouched since its creation, as ``created``
        says: None when the usual way must decide."""
        task = created.task
        now = now_ms() if now is None else now
        usual = (
            task.status != TaskStatus.SCHEDULED or task.lease_token != 0 or task.attempt != 1 or task.cancel_requested
            or (attempt and attempt != task.attempt) or (namespace is not None and namespace != task.namespace)
            or task.run_at > now + 1000 or deadline_passed(task, now) is not None
        )  # fmt: skip
        if usual:
            return None
        expect = Expect(TaskStatus.SCHEDULED, lease_token=0, namespace=task.namespace, untouched=created)
        lease = await self._lease(task, worker_id, now, expect)
        if lease is not None:
            metrics.claims_unread.labels(metrics.type_label(task.type)).inc()
        return lease

    async def _lease(self, task: Task, worker_id: str, now: int, expect: Expect) -> Lease | None:
        """Take the lease of ``task`` (as read, or as created) under ``expect``:
        the claim's conditional write, with the lease check entry before it
        and the concurrency slots around it. None: the write did not apply."""
        token = task.lease_token + 1
        # A slot of every concurrency limit first (LimitReached: the task stays
        # SCHEDULED, its attempt unused), confirmed once the claim landed.
        held = await self.admission.take(task, token, now)
        if held:
            now = now_ms()  # the lease runs from the claim's write, not from before the slots were taken
        expires_at = now + task.lease_ms
        try:
            # The lease check entry goes first: if we crash after the claim, the
            # trigger still finds the lease and re-queues it once it expires.
            await self._add_due(lease_entry(task, expires_at, self.lease_grace_ms, token))
            change = TaskChange.claim(task, worker_id, token, expires_at, now)
            result = await self._write(task.task_id, expect, change)
            if not result.applied:
                await self.admission.give_back(held)
                return None
            claimed = change.apply(task)
            # The attempt's history beside the slots' confirmation (history never raises);
            # no slots (the usual case): no gather, whose two tasks cost more than the work.
            if held:
                _, confirmed = await asyncio.gather(
                    self.history.started(claimed), self.admission.confirm(task.task_id, token, held)
                )
            else:
                await self.history.started(claimed)
                confirmed = True
            if not confirmed:
                # A slot was taken over while this claim was in flight (it took
                # longer than concurrency.SLOT_CLAIM_MS): give the claim back
                # unrun, so that two runners never share one slot.
                await self.release(task.task_id, token)
                raise ResourceExhausted(
                    f"{LIMIT_REACHED}slot of task {task.task_id} was taken over during the claim; it waits again"
                )
        except BaseException:
            await self.admission.give_back(held)
            raise
        return Lease(claimed, token, expires_at)

    async def heartbeat(
        self,
        task_id: uuid.UUID,
        token: int,
        percent: float,
        message: str,
        now: int | None = None,
        namespace: str | None = None,
    ) -> HeartbeatAck:
        """Extend the caller's lease; its answer carries a pending cancel request.

        A cancel request does not stop the renewal: the worker keeps its lease
        until the handler has really stopped (a handler may ignore the cancel
        for a while, and a lease that lapsed meanwhile would let another
        worker start the task beside it). The cancel flag comes from the read
        before the write; a request that lands between the two is seen by the
        next heartbeat, a third of a lease later. One conditional write either
        way."""
        now = now_ms() if now is None else now
        task = await self.get(task_id, namespace)
        expires_at = now + task.lease_ms
        change = TaskChange.heartbeat(expires_at, percent, message)
        result = await self._write(task_id, Expect(TaskStatus.RUNNING, lease_token=token), change)
        if result.applied:
            return HeartbeatAck(expires_at, cancel_requested=task.cancel_requested)
        raise FailedPrecondition(f"lease lost: task {task_id} no longer runs under token {token}")

    async def complete(
        self,
        task_id: uuid.UUID,
        token: int,
        result: bytes,
        namespace: str | None = None,
        progress_message: str | None = None,
    ) -> TaskStatus:
        """RUNNING → SUCCEEDED under lease ``token``: one conditional write,
        nothing read. ``progress_message``: the attempt's last progress
        message as the worker reports it with the completion, written into
        the row (None: the row keeps the last heartbeat's). The succeeded
        attempt needs no history entry: the row, SUCCEEDED for good, is it
        (``attempt_history.row_entry``)."""
        now = now_ms()
        change = TaskChange.complete(TaskStatus.RUNNING, result, now, progress_message)
        outcome = await self._write(task_id, Expect(TaskStatus.RUNNING, lease_token=token, namespace=namespace), change)
        if outcome.applied:
            await self._release_slots(task_id, token)
            return TaskStatus.SUCCEEDED
        if namespace is not None and outcome.exists and outcome.current_namespace != namespace:
            raise PermissionDenied(f"task {task_id} is not in namespace {namespace!r} or does not exist")
        if outcome.current_status == TaskStatus.SUCCEEDED and outcome.current_lease_token == token:
            return TaskStatus.SUCCEEDED  # our own earlier completion, retried
        raise self._stale(task_id, token, outcome.exists)

    async def fail(
        self,
        task_id: uuid.UUID,
        token: int,
        error: str,
        error_type: str = "",
        non_retryable: bool = False,
        namespace: str | None = None,
        retry_after_ms: int = 0,
    ) -> FailOutcome:
        """The handler failed: retried with backoff, or FAILED (permanent, deadline passed, attempts used up).

        ``retry_after_ms``: the remote side asked us to wait (an HTTP
        Retry-After, ``worker.handlers.RetryAfter``); the retry is due no
        earlier than that (see ``_failure``)."""

        async def decide(task: Task, now: int) -> tuple[TaskChange, FailOutcome]:
            return await self._failure(task, now, error, error_type, non_retryable, retry_after_ms)

        return await self._end_attempt(task_id, token, namespace, decide, lambda change: failure_outcome(error_type))

    async def acknowledge_cancel(
        self, task_id: uuid.UUID, token: int, error: str, error_type: str = "", namespace: str | None = None
    ) -> FailOutcome:
        """The handler stopped after a cancel request: CANCELLED. Without a pending
        request the report is an ordinary failure (there was nothing to acknowledge)."""

        async def decide(task: Task, now: int) -> tuple[TaskChange, FailOutcome]:
            if not task.cancel_requested:
                return await self._failure(task, now, error, error_type, non_retryable=False)
            return TaskChange.cancel_ack(task, error, error_type, now), FailOutcome(TaskStatus.CANCELLED)

        def ended_as(change: TaskChange) -> AttemptOutcome:
            return AttemptOutcome.CANCELLED if change.new_status == TaskStatus.CANCELLED else failure_outcome(error_type)

        return await self._end_attempt(task_id, token, namespace, decide, ended_as)

    async def release(self, task_id: uuid.UUID, token: int, namespace: str | None = None) -> FailOutcome:
        """Given back unrun (worker shutdown, a claim answered too late): due again now,
        the attempt not charged, and no error kept (it is not a failure)."""

        async def decide(task: Task, now: int) -> tuple[TaskChange, FailOutcome]:
            change = TaskChange.release(task, now)
            await self._add_due(run_entry(task, now))
            return change, FailOutcome(TaskStatus.SCHEDULED, now)

        return await self._end_attempt(task_id, token, namespace, decide, lambda change: AttemptOutcome.RELEASED)

    async def rate_limited(
        self,
        task_id: uuid.UUID,
        token: int,
        retry_after_ms: int,
        error: str,
        error_type: str = "RateLimited",
        namespace: str | None = None,
    ) -> FailOutcome:
        """The handler was rate limited (``worker.handlers.RateLimited``): the
        task's gate is closed until now + ``retry_after_ms`` (so the gate's
        other tasks wait too) and the task is due again then, as the same
        attempt: being refused by the remote side is no failure of the task.

        The close is written first (a max, so a repeat is harmless): once the
        task is SCHEDULED again, its gate already holds it. A task without a
        gate has nothing to close: its report is an ordinary ``RetryAfter``
        failure (an attempt is charged; otherwise a handler that always answers
        "rate limited" would retry for ever). A wait ending at or past the
        task's schedule_to_close fails it now, as for ``RetryAfter``."""

        async def decide(task: Task, now: int) -> tuple[TaskChange, FailOutcome]:
            if not task.gate:
                return await self._failure(task, now, error, error_type, False, retry_after_ms)
            until = now + min(max(retry_after_ms, 1), int(RETRY_INTERVAL.high))
            if task.deadline_at is not None and until >= task.deadline_at:
                why = f"{error} (not retried: rate limited until past the task's schedule_to_close)"
                return TaskChange.fail(task, why, error_type, now), FailOutcome(TaskStatus.FAILED)
            try:
                await self.store.close_gate(task.namespace, task.gate, until)
            except StoreUnavailable as exc:
                raise Unavailable(str(exc)) from exc
            await self._add_due(run_entry(task, until))
            return TaskChange.rate_limited(task, error, error_type, until), FailOutcome(TaskStatus.SCHEDULED, until)

        def ended_as(change: TaskChange) -> AttemptOutcome:
            # Waiting again (its gate closed, or an ordinary retry without a gate): rate limited; FAILED: failed.
            return AttemptOutcome.RATE_LIMITED if change.new_status == TaskStatus.SCHEDULED else AttemptOutcome.FAILED

        return await self._end_attempt(task_id, token, namespace, decide, ended_as)

    async def _end_attempt(
        self,
        task_id: uuid.UUID,
        token: int,
        namespace: str | None,
        decide: Callable[[Task, int], Awaitable[tuple[TaskChange, FailOutcome]]],
        ended_as: Callable[[TaskChange], AttemptOutcome],
    ) -> FailOutcome:
        """The common frame of a worker's unsuccessful report: the caller must hold the
        lease (a retried report of an already final task answers its status again).
        ``ended_as``: the attempt's outcome in the history, from the change written."""
        task = await self.get(task_id, namespace)
        if task.status != TaskStatus.RUNNING or task.lease_token != token:
            if task.lease_token == token and task.status.terminal:
                if task.status == TaskStatus.FAILED:
                    # Our report made it FAILED, but its dead-letter entry may
                    # not have been written (the store refused it, we died):
                    # the retried report writes it (idempotent).
                    await self._entered_failed(task)
                return FailOutcome(task.status)  # a retried report of ours
            raise self._stale(task_id, token, True)
        now = now_ms()
        change, outcome = await decide(task, now)
        result = await self._write(task_id, Expect(TaskStatus.RUNNING, lease_token=token), change, task)
        if not result.applied:
            raise self._stale(task_id, token, result.exists)
        await asyncio.gather(self._release_slots(task_id, token, task), self._record_end(task, change, ended_as(change), now))
        return outcome

    async def _failure(
        self, task: Task, now: int, error: str, error_type: str, non_retryable: bool, retry_after_ms: int = 0
    ) -> tuple[TaskChange, FailOutcome]:
        """FAILED, or SCHEDULED again after max(backoff, ``retry_after_ms``).

        The wait is bounded by ``limits.RETRY_INTERVAL`` like any backoff (the
        due entry's TTL must hold it). A remote side's wait that would end at
        or past the task's schedule_to_close fails the task now: retrying
        earlier would ignore what the remote side asked for, and waiting would
        only meet the deadline (the same FAILED, later, with a dispatch spent)."""
        permanent = non_retryable or error_type in task.retry.non_retryable_error_types
        deadline_passed = task.deadline_at is not None and now >= task.deadline_at
        if permanent or deadline_passed or task.attempt >= task.max_attempts:
            return TaskChange.fail(task, error, error_type, now), FailOutcome(TaskStatus.FAILED)
        backoff = task.retry.backoff_ms(task.attempt, jitter=random.random())
        next_run = now + min(max(backoff, retry_after_ms), int(RETRY_INTERVAL.high))
        if retry_after_ms and task.deadline_at is not None and next_run >= task.deadline_at:
            why = f"{error} (not retried: Retry-After of {retry_after_ms / 1000:g} s ends past the task's schedule_to_close)"
            return TaskChange.fail(task, why, error_type, now), FailOutcome(TaskStatus.FAILED)
        change = TaskChange.retry(task, error, error_type, next_run)
        retried = task.replace(attempt=task.attempt + 1)
        await self._add_due(run_entry(retried, next_run))
        return change, FailOutcome(TaskStatus.SCHEDULED, next_run)

    # ---------------------------------------------------------------- operators
    #
    # Each operator action is ONE conditional write on every column of the
    # version the operator read (``Expect.version``; ``leasesched.versions``):
    # a stale version, or a change landing between the read and the write,
    # is answered FAILED_PRECONDITION naming ``expected_version`` and the
    # current version, with nothing written. Its history entry is written
    # after the write applied, and never fails the action (a record for
    # people, see leasesched/history.py).

    async def retry(
        self,
        task_id: uuid.UUID,
        expected_version: str,
        action: OperatorAction,
        run_at: int | None = None,
        payload: bytes | None = None,
        namespace: str | None = None,
    ) -> Task:
        """A FAILED or CANCELLED task runs again (``TaskChange.operator_retry``:
        attempt 1 of its own budget, a raised lease token), at ``run_at`` (now
        when None), with ``payload`` when given. Its due entry is written
        before the status, as for a new task (``schedule``)."""

        async def build(task: Task, now: int) -> TaskChange:
            due = now if run_at is None else max(run_at, now)
            change = TaskChange.operator_retry(task, due, payload)
            await self._add_due(run_entry(change.apply(task), due))
            return change

        return await self._operate(task_id, expected_version, action, Operation.RETRY, Transition.OPERATOR_RETRY,
                                   build, namespace)  # fmt: skip

    async def resume(
        self, task_id: uuid.UUID, expected_version: str, action: OperatorAction, namespace: str | None = None
    ) -> Task:
        """A task waiting for its retry backoff (SCHEDULED, attempt > 1, not due
        yet) is due now, as the same attempt."""

        async def build(task: Task, now: int) -> TaskChange:
            if task.attempt <= 1:
                raise FailedPrecondition(
                    f"task {task_id} is SCHEDULED at attempt 1: it waits for its first run, not for a retry backoff"
                )
            if task.run_at <= now:
                raise FailedPrecondition(f"task {task_id} is SCHEDULED and due already: nothing to resume")
            change = TaskChange.resume(task, now)
            await self._add_due(run_entry(task, now))
            return change

        return await self._operate(task_id, expected_version, action, Operation.RESUME, Transition.RESUME, build, namespace)

    async def mark_failed(
        self, task_id: uuid.UUID, expected_version: str, action: OperatorAction, namespace: str | None = None
    ) -> Task:
        """A SCHEDULED task (typically one waiting to be retried) stops: FAILED,
        error type "MarkedFailed", the reason as its error. Its due entries
        are left to the trigger, which drops an entry whose task is no longer
        SCHEDULED."""

        async def build(task: Task, now: int) -> TaskChange:
            return TaskChange.mark_failed(task, action.reason, now)

        return await self._operate(task_id, expected_version, action, Operation.MARK_FAILED, Transition.MARK_FAILED,
                                   build, namespace)  # fmt: skip

    async def terminate(
        self, task_id: uuid.UUID, expected_version: str, action: OperatorAction, namespace: str | None = None
    ) -> Task:
        """A RUNNING task's lease is revoked now: FAILED ("Terminated") under a
        new lease token. The worker's next heartbeat under the old token is
        answered "lease lost" and the worker stops the execution exactly as
        for any lost lease (worker/heartbeats.py); a completion or failure
        report under the old token is refused (fenced). The attempt's
        concurrency slots are given back, and its history entry ends as
        TERMINATED."""

        async def build(task: Task, now: int) -> TaskChange:
            return TaskChange.terminate(task, action.reason, now)

        return await self._operate(task_id, expected_version, action, Operation.TERMINATE, Transition.TERMINATE,
                                   build, namespace)  # fmt: skip

    async def _operate(
        self,
        task_id: uuid.UUID,
        expected_version: str,
        action: OperatorAction,
        operation: Operation,
        transition: Transition,
        build: Callable[[Task, int], Awaitable[TaskChange]],
        namespace: str | None,
    ) -> Task:
        """The common frame of an operator action: the version check, the state
        check, one conditional write on the version, then the side effects of
        the ended attempt (terminate) and the history."""
        task = await self.get(task_id, namespace)
        current = version_of(task)
        if current != expected_version:
            raise _stale_version(task_id, expected_version, task)
        if not allowed(transition, task.status):
            sources = " or ".join(sorted(s.value for s in TRANSITIONS[transition][0]))
            raise FailedPrecondition(
                f"task {task_id} is {task.status.value}; {operation.value} needs a {sources} task"
            )
        now = now_ms()
        change = await build(task, now)
        expect = Expect(task.status, lease_token=task.lease_token, version=TaskVersion.of(task))
        # ``task`` given: a change to FAILED (mark-failed, terminate) enters the
        # dead-letter index; a failure of that second write is only logged (the
        # action is done, and its version has moved on).
        result = await self._write(task_id, expect, change, task, must_index=False)
        if not result.applied:
            if not result.exists:
                raise NotFound(f"task {task_id} not found")
            try:
                moved = await self.read(task_id, serial=True)
            except (StoreUnavailable, UnreadableTask) as exc:
                raise Unavailable(str(exc)) from exc
            if moved is None:
                raise NotFound(f"task {task_id} not found")
            raise _stale_version(task_id, expected_version, moved)
        done = change.apply(task)
        log.info(
            "task %s: operator action %s by %r (%s → %s): %s", task_id, operation.value, action.operator,
            task.status.value, done.status.value, action.reason, extra=fields(task_id=str(task_id)),
        )  # fmt: skip
        if task.status == TaskStatus.FAILED:  # a retry: it leaves the dead letters
            try:
                await self._left_failed(task)
            except Unavailable as exc:
                log.warning("task %s left FAILED but its dead-letter entry was not removed: %s", task_id, exc,
                            extra=fields(task_id=str(task_id)))  # fmt: skip
        ended: list[Awaitable[None]] = []
        if transition == Transition.TERMINATE:
            ended = [
                self._release_slots(task_id, task.lease_token, task),
                self.history.ended(task, AttemptOutcome.TERMINATED, now, "Terminated", done.error),
            ]
        await asyncio.gather(*ended, self.history.operated(done, operation, action.operator, action.reason, now))
        return done

    # ---------------------------------------------------------------- trigger

    async def expire_lease(self, task: Task, now: int | None = None) -> TaskStatus | None:
        """Re-queue (or fail) a RUNNING task whose lease expired plus grace.

        Returns the new status, or None when the lease turned out to be alive
        or someone else moved the task first.
        """
        now = now_ms() if now is None else now
        if task.status != TaskStatus.RUNNING or task.lease_expires_at is None:
            return None
        if now < task.lease_expires_at + self.lease_grace_ms:
            return None
        expect = Expect(TaskStatus.RUNNING, lease_token=task.lease_token)
        if task.cancel_requested:
            # A re-queued task with a cancel request could never be claimed
            # again (claims refuse it): it would stay SCHEDULED for ever. The
            # user asked for it to stop, and its worker is gone: it is cancelled.
            change = TaskChange.lease_expired_cancel(task, now)
        elif task.attempt >= task.max_attempts:
            change = TaskChange.lease_expired_fail(task, now)
        else:
            change = TaskChange.lease_expired_retry(task, now)
            retried = task.replace(attempt=task.attempt + 1)
            await self._add_due(run_entry(retried, now))
        result = await self._write(task.task_id, expect, change, task, must_index=False)
        if not result.applied:
            return None
        await asyncio.gather(
            self._release_slots(task.task_id, task.lease_token, task),
            self._record_end(task, change, AttemptOutcome.LEASE_LOST, now),
        )
        return change.new_status

    async def fail_deadline(self, task: Task, reason: str) -> bool:
        """Fail a task that waited or ran past its deadline (schedule-to-close / -start)."""
        if not allowed(Transition.DEADLINE, task.status):
            return False
        now = now_ms()
        change = TaskChange.deadline(task, reason, now)
        expect = Expect(task.status, lease_token=task.lease_token)
        applied = (await self._write(task.task_id, expect, change, task, must_index=False)).applied
        if applied and task.status == TaskStatus.RUNNING:  # a SCHEDULED task had no attempt running: nothing ended
            await asyncio.gather(
                self._release_slots(task.task_id, task.lease_token, task),
                self._record_end(task, change, AttemptOutcome.TIMED_OUT, now),
            )
        return applied

    # ---------------------------------------------------------------- quarantine

    async def _quarantine(self, bad: UnreadableTask) -> bool:
        """Make an unreadable row readable with ONE conditional write, on the
        raw status, lease token and write id that were read (never over a
        change made since): a live task (or one whose status is unreadable)
        becomes FAILED with error type "Unreadable" and the problems as its
        error; every bad column gets its repair (out-of-range time → null,
        bad priority → 5, ...). A terminal task keeps its status and outcome.

        Logged at ERROR and counted only by the writer whose write applied, so
        each task is reported once however many readers meet it at once."""
        status = quarantined_status(bad.status)
        problems = "; ".join(p.describe() for p in bad.problems)
        columns: dict[str, Any] = {**bad.repairs, "status": status.value}
        if bad.status is None or not bad.status.terminal:
            columns.update(
                error=f"unreadable: {problems}"[:MAX_ERROR_MESSAGE],
                error_type="Unreadable",
                finished_at=now_ms(),
                lease_expires_at=None,
            )
        applied = await self.store.quarantine_task(bad.task_id, bad.expect, columns)
        if applied and status == TaskStatus.FAILED and (bad.status is None or not bad.status.terminal):
            try:  # the repaired row names its namespace and type (repairs included)
                repaired = await self.store.get_task(bad.task_id)
                if repaired is not None and repaired.status == TaskStatus.FAILED:
                    await self.store.add_failed(repaired)
            except (StoreUnavailable, UnreadableTask) as exc:
                log.warning("task %s: quarantined as FAILED, dead-letter entry not written: %s", bad.task_id, exc)
        if applied:
            log.error(
                "task %s is unreadable and was quarantined (now %s): %s", bad.task_id, status.value, problems,
                extra=fields(task_id=str(bad.task_id)),
            )  # fmt: skip
            metrics.tasks_quarantined.labels(bad.reason).inc()
        else:
            log.warning(
                "task %s: unreadable row changed before its quarantine applied; reading it again", bad.task_id,
                extra=fields(task_id=str(bad.task_id)),
            )  # fmt: skip
        return applied

    # ---------------------------------------------------------------- helpers

    async def _record_end(self, task: Task, change: TaskChange, outcome: AttemptOutcome, now: int) -> None:
        """The history entry of the attempt ``task`` ran, ended by ``change``
        (its error and error type, as written). Never raises."""
        error_type = "" if change.error_type is UNSET else change.error_type
        error = "" if change.error is UNSET else change.error
        await self.history.ended(task, outcome, now, error_type, error)

    async def _release_slots(self, task_id: uuid.UUID, token: int, task: Task | None = None) -> None:
        """The attempt under ``token`` ended: give back its concurrency slots.
        Never fails the report that ended it: a slot not given back is found
        free by the next claim that needs it (``concurrency.holder_is_free``)."""
        try:
            if task is None:
                await self.admission.release_known(task_id, token)
            else:
                await self.admission.release(task, token)
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("task %s: concurrency slots of lease %d not given back: %s", task_id, token, exc,
                        extra=fields(task_id=str(task_id)))  # fmt: skip

    async def _write(
        self, task_id: uuid.UUID, expect: Expect, change: TaskChange, task: Task | None = None, must_index: bool = True
    ) -> CasResult:
        """One conditional write. ``task``: the task as read, for a change that
        may make it FAILED: once such a write applied, its dead-letter entry
        is written (``_entered_failed``); ``must_index`` False only logs a
        failure of that second write (the trigger's writes: nobody retries
        them), True raises it (a worker retries its report, and the retry
        writes the entry)."""
        try:
            result = await self.store.update_task(task_id, expect, change)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        if result.applied and task is not None and change.new_status == TaskStatus.FAILED:
            try:
                await self._entered_failed(change.apply(task))
            except Unavailable as exc:
                if must_index:
                    raise
                log.warning("task %s is FAILED but its dead-letter entry was not written: %s", task_id, exc,
                            extra=fields(task_id=str(task_id)))  # fmt: skip
        return result

    async def _entered_failed(self, task: Task) -> None:
        """``task`` became FAILED (its conditional write applied): note it in
        the dead-letter index that CountTasks reads (``TaskStore.add_failed``).

        After the write, never before: an entry then never names a task that
        is not FAILED. The window between the two writes (a crash, a refused
        write) can leave a FAILED task uncounted; a worker's retried report
        closes it for worker failures (``_end_attempt``)."""
        try:
            await self.store.add_failed(task)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def _left_failed(self, task: Task) -> None:
        """``task`` (as read while FAILED: namespace, type and id are what
        matter) has just left FAILED: its conditional write applied. Call
        this from any transition out of FAILED (RetryTask: FAILED →
        SCHEDULED) AFTER that write, so CountTasks stops counting it.

        A failure of this delete leaves a stale entry (counted, though the
        task runs again): it raises ``Unavailable`` so the caller can answer
        an error and the operator's retry deletes it (the delete is
        idempotent). Also safe to call for a task that has no entry."""
        try:
            await self.store.remove_failed(task)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def _add_due(self, entry: DueEntry) -> None:
        try:
            await self.store.add_due(entry)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    @staticmethod
    def _stale(task_id: uuid.UUID, token: int, exists: bool) -> Exception:
        if not exists:
            return NotFound(f"task {task_id} not found")
        return FailedPrecondition(f"lease lost: task {task_id} no longer runs under token {token}")


def _stale_version(task_id: uuid.UUID, expected: str, task: Task) -> FailedPrecondition:
    return FailedPrecondition(
        f"expected_version {expected!r} is not the current version of task {task_id}: it is {version_of(task)!r} "
        f"(now {task.status.value}, attempt {task.attempt}); read the task again and decide again"
    )
