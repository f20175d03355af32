"""Plain values shared by every process: a task, its retry policy, its progress.

Times are integers of milliseconds since the Unix epoch (UTC) everywhere in
the core; only the store and the gRPC edge convert them, so no component ever
compares a naive datetime with an aware one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field

from leasesched.limits import RETRY_INTERVAL
from leasesched.states import TaskStatus


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RetryPolicy:
    """Temporal's vocabulary: the n-th retry waits initial × coefficient^(n-1), capped."""

    initial_interval_ms: int = 1000
    backoff_coefficient: float = 2.0
    maximum_interval_ms: int = 100_000
    maximum_attempts: int = 3
    non_retryable_error_types: tuple[str, ...] = ()

    def backoff_ms(self, failed_attempt: int, jitter: float = 0.0) -> int:
        """Delay before the attempt after ``failed_attempt`` (1-based).

        ``jitter`` in [0, 1) shortens the delay by up to 20 %, so a burst of
        tasks failing together does not retry in lock-step; tests pass 0.
        """
        try:
            raw = self.initial_interval_ms * self.backoff_coefficient ** max(0, failed_attempt - 1)
        except OverflowError:  # coefficient ** attempts past a float: the cap applies anyway
            raw = math.inf
        # The hard bound too: a row written before intervals were bounded must
        # still get a retry the due index can hold (limits.RETRY_INTERVAL).
        capped = min(raw, float(self.maximum_interval_ms), float(RETRY_INTERVAL.high))
        return int(capped * (1.0 - 0.2 * jitter))


@dataclass(frozen=True)
class Timeouts:
    """Zero means "no limit"."""

    schedule_to_start_ms: int = 0
    start_to_close_ms: int = 0
    schedule_to_close_ms: int = 0


@dataclass
class Task:
    """One row of the ``tasks`` table."""

    task_id: uuid.UUID
    namespace: str
    type: str
    payload: bytes
    shard: int
    priority: int = 5
    status: TaskStatus = TaskStatus.SCHEDULED
    attempt: int = 1  # the attempt that runs next, or is running; 1-based
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    lease_ms: int = 30_000
    lease_owner: str | None = None
    lease_expires_at: int | None = None
    lease_token: int = 0  # grows by one with every claim: the fencing number
    progress_percent: float = 0.0
    progress_message: str = ""
    result: bytes = b""
    error: str = ""
    error_type: str = ""
    cancel_requested: bool = False
    created_at: int = 0
    run_at: int = 0  # when it is, or last was, due
    first_run_at: int = 0  # the first due time: schedule-to-close counts from here
    started_at: int | None = None
    finished_at: int | None = None
    deadline_at: int | None = None  # first_run_at + schedule_to_close, if set
    schedule_id: str = ""  # set when a schedule created the task (leasesched.schedules)
    nominal_time: int | None = None  # the schedule's slot it was created for
    concurrency_key: str = ""  # fair-share group within the namespace; "" = none
    gate: str = ""  # the gate (leasesched.gates) it waits for before each dispatch; "" = none
    lease_losses: int = 0  # how many of its leases expired unreported (the trigger took it back)

    @property
    def max_attempts(self) -> int:
        return self.retry.maximum_attempts

    def replace(self, **changes: object) -> "Task":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DueEntry:
    """A row of the due index: "something must happen to this task at due_at".

    ``kind`` says what: RUN (dispatch it), LEASE (check its lease) or
    SCHEDULE (evaluate a periodic schedule: ``task_id`` is then the
    schedule's uid and ``ref`` names it, ``namespace/schedule_id``).
    """

    shard: int
    due_at: int
    task_id: uuid.UUID
    kind: str
    attempt: int = 1
    priority: int = 5
    type: str = ""
    lease_token: int = 0  # the task's token when written: tells re-queues apart
    ref: str = ""

    RUN = "run"
    LEASE = "lease"
    SCHEDULE = "schedule"


def listed_size(task: Task) -> int:
    """About how many bytes ``task`` adds to a ListTasks answer: its variable
    fields plus a generous allowance for the fixed ones (ids, times, numbers)."""
    variable = (task.result, task.error, task.error_type, task.progress_message, task.lease_owner or "", task.type, task.namespace)
    return 256 + sum(len(v) if isinstance(v, bytes) else len(v.encode()) for v in variable)


def shard_of(task_id: uuid.UUID, shards: int) -> int:
    """Stable across processes, machines and Python versions (unlike hash())."""
    digest = hashlib.blake2b(task_id.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def bucket_of(at_ms: int, bucket_s: int) -> int:
    """The due-index bucket (partition) holding time ``at_ms``: its start in ms."""
    width = bucket_s * 1000
    return at_ms - at_ms % width
