"""Every bound on what a request may carry, in one place.

Why a module of its own: a value that the API accepts but the store cannot
hold *after arithmetic* (now + delay + schedule_to_close, backoff growth, a
due-index TTL) used to be written half-way and fail later — a task row whose
deadline lay past year 9999 could not be decoded by any process, and an
accepted retry interval of 10^12 s made every FailTask of that task fail.
So each bound below is derived from what is stored and what is computed from
it, and the derivation is checked at import time (``_check_storage_fits``):
if someone raises a bound past what Cassandra can hold, the process does not
start.

What the store can hold (Cassandra, as the store uses it):

* ``timestamp`` columns: a signed 64-bit count of milliseconds, but the
  Python driver turns them into ``datetime``, which ends at year 9999 (the
  store reads them as integers, yet nothing is ever written past
  ``MAX_STORED_TIME_MS``);
* ``bigint`` columns (durations in ms, lease tokens): signed 64-bit;
* ``int`` columns (attempts, priority, shard): signed 32-bit;
* TTLs (due-index entries live until ``due_at + DUE_TTL_EXTRA``): at most
  20 years (``CASSANDRA_MAX_TTL_S``; the driver packs them in 32 bits).

Every check raises ``InvalidArgument`` whose message names the field, the
value and the limit, before anything is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from leasesched.errors import InvalidArgument

SECOND_MS = 1000
DAY_MS = 86_400_000
YEAR_MS = 366 * DAY_MS

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
CASSANDRA_MAX_TTL_S = 20 * 365 * 86_400  # Cassandra refuses a longer TTL
MAX_STORED_TIME_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z: the driver's datetime ceiling

# How long a due-index entry outlives its due time (the store's TTL margin).
DUE_TTL_EXTRA_MS = 30 * DAY_MS


@dataclass(frozen=True)
class Bound:
    """An inclusive range for one request field, with the reason it is what it is."""

    field: str
    low: int | float
    high: int | float
    unit: str  # "ms" for durations (shown in seconds), else the thing counted
    why: str

    def check(self, value: int | float, field: str | None = None) -> int | float:
        name = field or self.field
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{name} must be a finite number, not {value}")
        if not self.low <= value <= self.high:
            raise InvalidArgument(f"{name} {_show(value, self.unit)} is out of range {self.describe()}")
        return value

    def describe(self) -> str:
        """The range as a message shows it: '0..31622400 s', '1..10000'."""
        return f"{_number(self.low, self.unit)}..{_show(self.high, self.unit)}"


def _number(value: int | float, unit: str) -> str:
    if unit == "ms":
        return f"{value / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(value: int | float, unit: str) -> str:
    if unit == "ms":
        return f"{_number(value, unit)} s"
    return f"{_number(value, unit)}{' ' + unit if unit else ''}"


# ---------------------------------------------------------------- durations

# Hard ceiling for the configurable ``max_schedule_ahead_s`` (default 366 days).
SCHEDULE_AHEAD = Bound("delay / run_at ahead of now", 0, 10 * 365 * DAY_MS, "ms", "a due-index entry's TTL must stay under 20 years")
TIMEOUT = Bound("timeouts.*", 0, YEAR_MS, "ms", "deadline = run_at + schedule_to_close must stay a storable time")
RETRY_INTERVAL = Bound(
    "retry_policy.*_interval", 0, YEAR_MS, "ms", "a retry's due entry (now + interval) must fit a TTL"
)
LEASE = Bound("lease_duration", SECOND_MS, 3600 * SECOND_MS, "ms", "heartbeats every lease/3; an hour bounds a dead worker's hold")
BACKOFF_COEFFICIENT = Bound("retry_policy.backoff_coefficient", 1.0, 100.0, "", "growth per retry, capped by maximum_interval")

# ---------------------------------------------------------------- counts

PRIORITY = Bound("priority", 0, 9, "", "ten levels, higher first")
# Hard ceiling for the configurable ``max_attempts_limit`` (default 100).
MAX_ATTEMPTS = Bound("retry_policy.maximum_attempts", 1, 10_000, "", "attempt numbers are int columns; backoff stays finite")
NON_RETRYABLE_TYPES = Bound("retry_policy.non_retryable_error_types", 0, 32, "entries", "stored with the task, read on every failure")
LEASE_TOKEN = Bound("lease_token", 1, INT64_MAX, "", "a bigint column; ClaimTask hands out positive tokens")
CLAIM_ATTEMPT = Bound("attempt", 0, MAX_ATTEMPTS.high, "", "0 = any attempt; else the dispatch's attempt")
PROGRESS_PERCENT = Bound("progress.percent", 0.0, 100.0, "", "a percentage")
WORKER_SLOTS = Bound("slots", 0, 100_000, "", "free slots a worker grants a trigger")
SUBSCRIBE_TASK_TYPES = Bound("task_types", 1, 256, "entries", "types one Subscribe stream serves")
TASK_IDS_PER_MESSAGE = Bound("task ids per message", 0, 10_000, "entries", "one stream message stays small")
BATCH_ITEMS = Bound("items per batch call", 1, 256, "entries", "one batch call (ClaimTasks, CompleteTasks, NotifyDueBatch) stays small")
# ScheduleTasks (issue 17): one call is a bounded amount of work and answer.
SCHEDULE_BATCH = Bound("tasks", 1, 500, "entries", "one ScheduleTasks call stays a bounded amount of work")

# ---------------------------------------------------------------- periodic schedules (schedule_spec.py)

SCHEDULE_EVERY = Bound("spec.every", SECOND_MS, YEAR_MS, "ms", "a firing per second at most; a slot at least once a year")
SCHEDULE_JITTER = Bound("spec.jitter", 0, YEAR_MS, "ms", "a slot's task is due at most this much later (and before the next slot)")
SCHEDULE_TIME = Bound("spec.start_at / spec.end_at", 0, MAX_STORED_TIME_MS, "ms", "a slot must be a storable time")
SCHEDULE_CRONS = Bound("spec.cron", 0, 10, "entries", "every firing evaluates each expression")

# ---------------------------------------------------------------- sizes (characters)

MAX_WORKER_ID = 256
# A due hint and its dispatch carry a new task's payload up to this size (the
# worker's claim then needs no read, ``CreatedTask``); a larger one is read at the claim.
MAX_CREATED_PAYLOAD = 1024
MAX_PROGRESS_MESSAGE = 4096
MAX_ERROR_MESSAGE = 4096  # longer worker error texts are cut, not refused: the report must land
MAX_ERROR_TYPE = 256
MAX_PAGE_TOKEN = 512
MAX_CRON_EXPRESSION = 256
MAX_TIME_ZONE = 64

# Exact patterns: always used with ``fullmatch`` (``$`` would also match before
# a trailing newline, so "k\n" used to pass as the key "k").
NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,127}")
KEY_RE = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces
WORKER_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")
# A task's fair-share group (a partner or tenant id): a short name, shown in
# PollTask and (the busiest ones) as a metric label, so nothing exotic.
CONCURRENCY_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# IANA names ("Europe/Berlin", "Etc/GMT+5", "America/Port-au-Prince"): never '.', so never '..',
# never a leading '/': a name is looked up below the zone folders, not anywhere on disk.
TIME_ZONE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+/-]{0,63}")


def matches(pattern: re.Pattern[str], value: str) -> bool:
    """The whole value matches (never a prefix, never before a trailing newline)."""
    return pattern.fullmatch(value) is not None


def ttl_s(due_at_ms: int, now_ms: int) -> int:
    """The TTL of a due-index entry: until its due time plus the margin.

    Raises ``ValueError`` (a bug, not bad input) when validation let through a
    time the store cannot keep: every caller's time is bounded above."""
    ttl = max(0, due_at_ms - now_ms) // 1000 + DUE_TTL_EXTRA_MS // 1000
    if ttl > CASSANDRA_MAX_TTL_S:
        raise ValueError(f"due time {due_at_ms} is too far ahead for a TTL ({ttl} s)")
    return ttl


def _check_storage_fits() -> None:
    """The furthest any stored due time can lie ahead of now is a delay plus a
    retry interval (a retry is written at now + backoff, now ≤ the task's due
    time) or plus a lease (a lease check); the furthest deadline is that delay
    plus schedule_to_close. Both must fit: a TTL and the driver's datetime."""
    furthest_due = SCHEDULE_AHEAD.high + max(RETRY_INTERVAL.high, LEASE.high)
    assert (furthest_due + DUE_TTL_EXTRA_MS) // 1000 <= CASSANDRA_MAX_TTL_S, "due-index TTL would overflow"
    # Year 2200 as "now" leaves centuries of margin below the driver's ceiling.
    assert 7_258_118_400_000 + SCHEDULE_AHEAD.high + TIMEOUT.high < MAX_STORED_TIME_MS
    assert MAX_ATTEMPTS.high <= INT32_MAX


_check_storage_fits()

ALL_BOUNDS: tuple[Bound, ...] = (
    SCHEDULE_AHEAD,
    TIMEOUT,
    RETRY_INTERVAL,
    LEASE,
    BACKOFF_COEFFICIENT,
    PRIORITY,
    MAX_ATTEMPTS,
    NON_RETRYABLE_TYPES,
    LEASE_TOKEN,
    CLAIM_ATTEMPT,
    PROGRESS_PERCENT,
    WORKER_SLOTS,
    SUBSCRIBE_TASK_TYPES,
    TASK_IDS_PER_MESSAGE,
    BATCH_ITEMS,
    SCHEDULE_BATCH,
    SCHEDULE_EVERY,
    SCHEDULE_JITTER,
    SCHEDULE_TIME,
    SCHEDULE_CRONS,
)


# ---------------------------------------------------------------- schedules (the gRPC edge)

# A gate's name (leasesched.gates): like a schedule id.
GATE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
SCHEDULE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MAX_SCHEDULE_NOTE = 1024
# A spec's durations as they arrive (ScheduleSpec.check applies the exact bounds).
SCHEDULE_EVERY_FIELD = Bound("spec duration", 0, YEAR_MS, "ms", "a schedule's period, offset and jitter are at most a year")
CATCHUP_WINDOW = Bound(
    "policy.catchup_window", 10 * SECOND_MS, YEAR_MS, "ms",
    "shorter would skip slots that are only a little late (kubernetes#86647); the state records what it skips",
)  # fmt: skip
REMAINING_ACTIONS = Bound("remaining_actions", 0, INT32_MAX, "", "runs left before the schedule stops")
