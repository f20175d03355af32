"""Working one owned shard: read its due index, act on each entry at its time.

Reading. Each pass reads the shard's bucket partitions from
``max(checkpoint, min(read_cursor, last_successful_read - settle))`` up to
``now + lookahead``: new entries since the last pass, plus a window behind the
last successful read that catches entries written late (a slow write, a
writer's clock slightly behind, an outage between two reads). Entries
already seen are skipped by key; entries due within the lookahead are timed in
memory so they start on time, not at the next pass.

Checkpoint. The shard's durable checkpoint is the oldest entry not yet fully
handled (or ``now - settle`` when none is pending). A new owner after a crash
re-reads from there, so an entry can be handled twice but never skipped;
buckets behind the checkpoint are never read again, which keeps tombstones
and expired entries out of every read.

Every task read goes through ``Lifecycle.read``: a row that cannot be read is
quarantined there (FAILED, "Unreadable") and comes back as a final task, so
its entries are resolved like any finished task's instead of being retried
forever.

Acting. A RUN entry whose task is still SCHEDULED at the same attempt and token
goes to the dispatcher; a LEASE entry whose task still runs under the same
token is either re-queued (expired + grace, one conditional write on that
token) or followed by a new LEASE entry at the renewed expiry. Deadlines
(schedule-to-start, schedule-to-close) fail the task with that reason. An
entry pointing at no task is dropped after ``orphan_grace`` (the schedule that
wrote it died before writing the task).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

from leasesched.errors import SchedulerError
from leasesched.lifecycle import Lifecycle, deadline_passed, lease_entry, run_entry
from leasesched.model import DueEntry, Task, now_ms
from leasesched.observability import metrics
from leasesched.observability.logs import bind, fields
from leasesched.states import TaskStatus
from leasesched.store.base import StoreError
from leasesched.v1 import scheduler_pb2 as pb
from trigger.dispatcher import Dispatcher

log = logging.getLogger(__name__)

ScheduleHandler = Callable[[DueEntry, "ShardScanner"], Awaitable[None]]

RETRY_DELAY_S = 1.0
MAX_PENDING = 20_000


@dataclass(frozen=True)
class ScanSettings:
    bucket_s: int
    interval_s: float
    lookahead_ms: int
    settle_ms: int
    orphan_grace_ms: int
    lease_grace_ms: int
    start_ms: int  # where to begin when the shard has no checkpoint yet
    checkpoint_every_s: float = 5.0  # how often the checkpoint is saved


def _version(item: DueEntry | Task) -> tuple[int, int]:
    """Where a task is in its life: every claim raises the token, every
    re-queue the attempt, so this pair only ever grows."""
    return (item.lease_token, item.attempt)


def _ahead_of(entry: DueEntry, task: Task) -> bool:
    return _version(entry) > _version(task)


def entry_key(entry: DueEntry) -> Hashable:
    """Two entries with this key ask for the same action. RUN entries are
    unique per (attempt, token): every re-queue changes one of them. LEASE
    entries are re-written at each renewal, so their time is part of the key."""
    if entry.kind == DueEntry.RUN:
        return (entry.task_id, entry.kind, entry.attempt, entry.lease_token)
    return (entry.task_id, entry.kind, entry.lease_token, entry.due_at)  # LEASE, SCHEDULE: one per time


class ShardScanner:
    def __init__(
        self, shard: int, lifecycle: Lifecycle, dispatcher: Dispatcher, settings: ScanSettings,
        on_schedule: ScheduleHandler | None = None,
    ) -> None:
        """``on_schedule``: evaluates a periodic schedule when its entry comes
        due (``trigger/schedule_firer.py``); the entry is resolved when it returns."""
        self.shard = shard
        self._on_schedule = on_schedule
        self._lifecycle = lifecycle
        self._store = lifecycle.store
        self._dispatcher = dispatcher
        self._s = settings
        self._seen: dict[Hashable, int] = {}
        self._pending: dict[Hashable, int] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._waiting: dict[Hashable, int] = {}  # key → retries of an entry ahead of its task
        self._checkpoint = 0
        self._saved_checkpoint = 0
        self._saved_at = 0.0
        self._stopped = False
        self.read_at = time.monotonic()  # the last complete read of the due index (monotonic)

    # ------------------------------------------------------------ loop

    async def run(self) -> None:
        bind(shard=self.shard)  # every line this scanner's tasks and timers log names its shard
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        finally:
            self._stop_timers()

    async def _run(self) -> None:
        while not self._stopped:
            try:
                saved = await self._store.get_checkpoint(self.shard)
                break
            except StoreError as exc:
                log.warning("shard %d: cannot read checkpoint: %s", self.shard, exc)
                await asyncio.sleep(RETRY_DELAY_S)
        self._checkpoint = self._saved_checkpoint = saved if saved is not None else self._s.start_ms
        cursor = self._checkpoint
        # Entries due up to (last successful read - settle) are certainly seen:
        # one due at d is visible by d + settle. The next read starts there at
        # the latest, however long ago that read was (an outage, a pause).
        complete_until = self._checkpoint
        while not self._stopped:
            now = now_ms()
            upto = now + self._s.lookahead_ms
            low = max(self._checkpoint, min(cursor, complete_until))
            if len(self._pending) < MAX_PENDING:
                try:
                    entries = await self._store.read_due(self.shard, low, upto, self._s.bucket_s)
                except StoreError as exc:
                    log.warning("shard %d: due-index read failed: %s", self.shard, exc)
                    await asyncio.sleep(RETRY_DELAY_S)
                    continue
                for entry in entries:
                    self._consider(entry)
                self.read_at = time.monotonic()
                cursor = upto
                complete_until = now - self._s.settle_ms
            await self._advance_checkpoint(now)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._s.interval_s)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._stop_timers()

    def _stop_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------ entries

    def notify(self, task: Task) -> None:
        """A hint that ``task`` just became due: act now, without waiting for the scan."""
        if task.status == TaskStatus.SCHEDULED:
            self.notify_entry(run_entry(task, now_ms()))

    def offer_created(
        self, entry: DueEntry, namespace: str, run_at: int, group: str = "", gate: str = "",
        created: pb.CreatedTask | None = None,
    ) -> None:
        """A hint from TaskService about a task it has just created, carrying
        the whole entry: the row exists and is SCHEDULED at exactly this
        version, so the task goes to the dispatcher without a read. (Had it
        been cancelled meanwhile, the claim is refused and the claim check
        settles it.) ``group``: the task's concurrency key, from the hint;
        ``created``: its whole creation row, passed on to the worker's claim."""
        key = entry_key(entry)
        if self._stopped or (key in self._seen and key not in self._waiting):
            return  # already being handled
        self._seen[key] = entry.due_at
        self._pending[key] = entry.due_at
        self._waiting.pop(key, None)
        self._offer(
            key, entry.task_id, namespace, entry.type, entry.attempt, entry.lease_token, entry.priority, run_at, group, gate,
            created,
        )  # fmt: skip

    def _offer(
        self, key: Hashable, task_id: uuid.UUID, namespace: str, type_: str, attempt: int, lease_token: int, priority: int,
        run_at: int, group: str, gate: str = "", created: pb.CreatedTask | None = None,
    ) -> None:
        """Hand a due task (at this version) to the dispatcher; ``key`` is resolved once it is settled.
        ``group``: its concurrency key (fair share), known without a read on both paths. A task with
        a ``gate`` waits there for a token of it (``trigger/gates.py``)."""
        ready = self._dispatcher.make_ready(
            task_id, namespace, type_, attempt, lease_token, priority, run_at, self.shard, on_done=lambda: self._resolve(key),
            group=group, gate=gate, created=created,
        )
        self._dispatcher.offer(ready)

    def notify_entry(self, entry: DueEntry) -> None:
        """A hint carrying the entry itself (from TaskService: no read needed).
        An entry already waiting for its row is looked at again at once."""
        key = entry_key(entry)
        if key in self._waiting and not self._stopped:
            self._spawn(entry, key)
        else:
            self._consider(entry)

    def _consider(self, entry: DueEntry) -> None:
        key = entry_key(entry)
        if key in self._seen or self._stopped:
            return
        self._seen[key] = entry.due_at
        self._pending[key] = entry.due_at
        delay_s = (entry.due_at - now_ms()) / 1000
        if delay_s <= 0:
            self._spawn(entry, key)
        else:
            self._retry_later(entry, key, delay_s)

    def _spawn(self, entry: DueEntry, key: Hashable) -> None:
        if self._stopped:
            return
        task = asyncio.ensure_future(self._handle(entry, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resolve(self, key: Hashable) -> None:
        self._pending.pop(key, None)
        self._waiting.pop(key, None)

    def _retry_soon(self, entry: DueEntry, key: Hashable) -> None:
        """Look again shortly: 50 ms, doubling up to RETRY_DELAY_S. For an entry
        whose task row or state change is still on its way (usually ms away),
        so an immediate task is not parked for a whole second."""
        tries = self._waiting.get(key, 0)
        self._waiting[key] = tries + 1
        self._retry_later(entry, key, min(RETRY_DELAY_S, 0.05 * 2**tries))

    def _retry_later(self, entry: DueEntry, key: Hashable, delay_s: float = RETRY_DELAY_S) -> None:
        """Handle ``entry`` after ``delay_s``; the timer is dropped if the shard is released."""
        if self._stopped:
            return
        loop = asyncio.get_running_loop()
        holder: list[asyncio.TimerHandle] = []

        def fire() -> None:
            self._timers.discard(holder[0])
            self._spawn(entry, key)

        holder.append(loop.call_later(delay_s, fire))
        self._timers.add(holder[0])

    async def _handle(self, entry: DueEntry, key: Hashable) -> None:
        try:
            if entry.kind == DueEntry.RUN:
                await self._handle_run(entry, key)
            elif entry.kind == DueEntry.LEASE:
                await self._handle_lease(entry, key)
            elif entry.kind == DueEntry.SCHEDULE and self._on_schedule is not None:
                await self._on_schedule(entry, self)
                self._resolve(key)
            else:
                log.warning("shard %d: unknown due entry kind %r", self.shard, entry.kind)
                self._resolve(key)
        except (StoreError, SchedulerError) as exc:
            log.warning("task %s: %s entry not handled yet: %s", entry.task_id, entry.kind, exc)
            self._retry_later(entry, key)

    async def _missing(self, entry: DueEntry, key: Hashable) -> None:
        if now_ms() - entry.due_at > self._s.orphan_grace_ms:
            log.info("task %s: dropping due entry that points at no task", entry.task_id)
            await self._store.delete_due(entry, self._s.bucket_s)
            self._resolve(key)
            # Forgotten, not only resolved: the task may still come (a client
            # whose ScheduleTask had an unknown outcome retries with its
            # idempotency key and finishes the reserved id), and its new entry
            # has this key; remembered as seen, it would be ignored and the
            # task would stay SCHEDULED for good (replicated chaos, 2 of 3
            # nodes down: the retry came 2 s after the drop).
            self._seen.pop(key, None)
        else:
            self._retry_soon(entry, key)  # the task row may still be on its way

    async def _deadline_passed(self, task: Task, now: int) -> bool:
        reason = deadline_passed(task, now)
        if reason is None:
            return False
        if await self._lifecycle.fail_deadline(task, reason):
            log.info("task %s failed: %s", task.task_id, reason, extra=fields(task_id=str(task.task_id)))
            metrics.tasks_failed.labels(metrics.type_label(task.type), "deadline").inc()
        return True

    async def _handle_run(self, entry: DueEntry, key: Hashable) -> None:
        task = await self._lifecycle.read(entry.task_id)
        if task is None:
            await self._missing(entry, key)
            return
        now = now_ms()
        if _ahead_of(entry, task) or (task.status == TaskStatus.RUNNING and _version(task) == _version(entry)):
            # Written just before the conditional write that makes it true
            # (retry, expiry, release): that write has not landed yet, or it
            # failed and the task will move past this entry. Look again.
            self._retry_soon(entry, key)
            return
        if task.status != TaskStatus.SCHEDULED or _version(task) != _version(entry) or task.run_at > now + 1000:
            self._resolve(key)  # the task moved on; a newer entry covers it
            return
        if await self._deadline_passed(task, now):
            self._resolve(key)
            return
        self._offer(
            key, task.task_id, task.namespace, task.type, task.attempt, task.lease_token, task.priority, task.run_at,
            task.concurrency_key, task.gate,
        )

    async def _handle_lease(self, entry: DueEntry, key: Hashable) -> None:
        if self._dispatcher.lease_finished(entry.task_id, entry.lease_token):
            self._resolve(key)  # its worker's report was accepted: the lease ended normally
            return
        task = await self._lifecycle.read(entry.task_id)
        if task is None:
            await self._missing(entry, key)
            return
        if task.lease_token < entry.lease_token:
            self._retry_later(entry, key)  # the claim that wrote it has not landed yet
            return
        if task.status != TaskStatus.RUNNING or task.lease_token != entry.lease_token:
            self._resolve(key)  # that lease ended normally
            return
        now = now_ms()
        if await self._deadline_passed(task, now):
            self._resolve(key)
            return
        expires = task.lease_expires_at or 0
        if now >= expires + self._s.lease_grace_ms:
            status = await self._lifecycle.expire_lease(task, now)
            if status is not None:
                log.info(
                    "task %s: lease %d expired; now %s", task.task_id, task.lease_token, status.value,
                    extra=fields(task_id=str(task.task_id), lease_token=task.lease_token, worker=task.lease_owner),
                )  # fmt: skip
                type_ = metrics.type_label(task.type)
                metrics.lease_expirations.labels(type_).inc()
                if status == TaskStatus.CANCELLED:
                    metrics.tasks_cancelled.labels(type_).inc()
                elif status != TaskStatus.SCHEDULED:
                    metrics.tasks_failed.labels(type_, "lease_expired").inc()
                else:
                    metrics.tasks_requeued.labels(type_, "lease_expired").inc()
                    requeued = await self._lifecycle.read(task.task_id)
                    if requeued is not None:
                        self.notify(requeued)
            self._resolve(key)
            return
        # Renewed by heartbeats: look again when the renewed lease could expire.
        follow = lease_entry(task, expires, self._s.lease_grace_ms, task.lease_token)
        if entry_key(follow) == key:
            # Not renewed, only looked at early (this clock behind the one that
            # wrote the entry): the follow-up would be this very entry, which
            # counts as seen, and resolving it would end the lease's checks.
            self._retry_later(entry, key, max(0.05, (follow.due_at - now) / 1000))
            return
        await self._store.add_due(follow)
        self._consider(follow)
        self._resolve(key)

    # ------------------------------------------------------------ checkpoint

    async def _advance_checkpoint(self, now: int) -> None:
        target = now - self._s.settle_ms
        if self._pending:
            # Settle behind the oldest pending entry too: a pending entry's time
            # may be a few ms later than its stored copy's (a creation hint is
            # timed by this trigger's clock when it arrives), and a checkpoint
            # just past the stored copy made a new owner skip it (replicated
            # chaos, ZooKeeper quorum lost: 4 tasks stayed SCHEDULED).
            target = min(target, min(self._pending.values()) - self._s.settle_ms)
        if target > self._checkpoint:
            self._checkpoint = target
            horizon = target - self._s.settle_ms
            self._seen = {k: v for k, v in self._seen.items() if v >= horizon or k in self._pending}
        if self._checkpoint > self._saved_checkpoint and time.monotonic() - self._saved_at >= self._s.checkpoint_every_s:
            try:
                await self._store.set_checkpoint(self.shard, self._checkpoint)
                self._saved_checkpoint = self._checkpoint
                self._saved_at = time.monotonic()
            except StoreError as exc:
                log.warning("shard %d: checkpoint not saved: %s", self.shard, exc)

    def stats(self) -> dict[str, int]:
        return {"pending": len(self._pending), "checkpoint": self._checkpoint}
