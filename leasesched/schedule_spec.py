"""When a periodic schedule fires: pure logic over int milliseconds, no I/O.

A schedule is either a set of cron expressions read in one IANA time zone, or
a fixed interval. Either way it defines *slots*: the instants at which the
schedule fires. The firing engine asks for the next slot after the last one it
fired (``next_after``), for the slots of a window (``slots``), and for how many
slots an outage skipped (``count``); ``jitter_for`` spreads the tasks of many
schedules that share a slot, deterministically, so two trigger processes that
evaluate the same slot create identical tasks.

Cron expressions are evaluated by cronsim (never by a parser of ours); they
have 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds
first. Slots are whole seconds.

Daylight saving time (the defined behaviour, as Debian/Vixie cron):

* An expression whose minute *and* hour fields are both fixed (do not start
  with ``*``, e.g. ``30 2 * * *``, ``0 9-17 * * 1-5``) names wall-clock times.
  Spring forward (Europe/Berlin 2026-03-29, 02:00 CET -> 03:00 CEST): a time
  in the skipped hour runs once, at the first minute that exists after the jump
  (02:30 -> 03:00 CEST = 01:00 UTC), never skipped. Fall back (2026-10-25,
  03:00 CEST -> 02:00 CET): a time in the repeated hour runs once, at its first
  occurrence (02:30 CEST = 00:30 UTC), never twice.
* An expression with a wildcard or stepped minute or hour (``*/30 * * * *``,
  ``0 * * * *``) runs by real time: at every wall time of both passes of the
  repeated hour (every real 30 minutes), and at none of the skipped hour.

cronsim applies the wall-clock rule only to 5-field expressions; here it
applies to 6-field ones as well (``0 30 2 * * *`` behaves as ``30 2 * * *``),
because a seconds field should not change whether a daily job is skipped or
doubled. Intervals (``every``) are in absolute time, aligned to the epoch, and
not affected by DST (their ``time_zone`` must be valid, and is not used).

Every method other than ``check`` assumes a spec that passed ``check``.
Nothing is ever later than ``limits.MAX_STORED_TIME_MS``; slots in the last
hours of year 9999 that a local time zone cannot express are not produced.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

from leasesched import limits
from leasesched.errors import InvalidArgument

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SECOND = timedelta(seconds=1)
_MINUTE = timedelta(minutes=1)
# The seconds field of a 6-field expression: numbers, '*', lists, ranges, steps; nothing else.
_SECONDS_FIELD_RE = re.compile(r"[0-9*,/-]+")
# Where check() looks for a first match: any expression that fires at all fires
# within cronsim's 50-year horizon from here (the calendar repeats every 28 years
# between 1901 and 2099).
_NEVER_FIRES_PROBE = datetime(2000, 1, 1)


@dataclass(frozen=True)
class ScheduleSpec:
    """When a schedule fires. Times are int milliseconds since the epoch (UTC), as everywhere in the core."""

    cron: tuple[str, ...] = ()  # 5 fields (minute hour dom month dow) or 6 (seconds first); the union of all
    time_zone: str = "UTC"  # IANA name; cron fields are read in this zone
    every_ms: int = 0  # interval: slots at k*every_ms + offset_ms (aligned to the epoch)
    offset_ms: int = 0
    start_at_ms: int | None = None  # no slot before this (inclusive)
    end_at_ms: int | None = None  # no slot after this (inclusive)
    jitter_ms: int = 0  # each slot's task is due up to this much later, never at or past the next slot

    # ------------------------------------------------------------ validation

    def check(self) -> None:
        """Raise ``InvalidArgument`` naming the field when the spec is not one
        the scheduler can keep firing: checked before a schedule is stored, so
        a stored schedule never fails to compute its next slot."""
        if not isinstance(self.cron, tuple) or not all(isinstance(e, str) for e in self.cron):
            raise InvalidArgument("spec.cron must be a tuple of strings")
        for name in ("every_ms", "offset_ms", "jitter_ms", "start_at_ms", "end_at_ms"):
            value = getattr(self, name)
            if (value is not None or not name.endswith("at_ms")) and (type(value) is not int):
                raise InvalidArgument(f"spec.{name.removesuffix('_ms')} must be an integer number of ms")
        if self.cron and self.every_ms:
            raise InvalidArgument("spec: set cron or every, not both")
        if not self.cron and not self.every_ms:
            raise InvalidArgument("spec: set cron or every")
        self._check_time_zone()
        limits.SCHEDULE_JITTER.check(self.jitter_ms)
        for field, at in (("spec.start_at", self.start_at_ms), ("spec.end_at", self.end_at_ms)):
            if at is not None:
                limits.SCHEDULE_TIME.check(at, field)
        if self.start_at_ms is not None and self.end_at_ms is not None and self.end_at_ms < self.start_at_ms:
            raise InvalidArgument("spec.end_at is before spec.start_at")
        if self.every_ms:
            self._check_interval()
        else:
            self._check_cron()

    def _check_time_zone(self) -> None:
        zone = self.time_zone
        if not isinstance(zone, str):
            raise InvalidArgument("spec.time_zone must be a string")
        if len(zone) > limits.MAX_TIME_ZONE or not limits.matches(limits.TIME_ZONE_RE, zone):
            raise InvalidArgument(f"spec.time_zone {zone[:80]!r} is not an IANA time zone")
        try:
            ZoneInfo(zone)
        except (ValueError, OSError, LookupError):  # not found (a KeyError), a folder, not a TZif file
            raise InvalidArgument(f"spec.time_zone {zone!r} is not an IANA time zone") from None

    def _check_interval(self) -> None:
        limits.SCHEDULE_EVERY.check(self.every_ms)
        if not 0 <= self.offset_ms < self.every_ms:
            raise InvalidArgument(
                f"spec.offset must be in 0..every (got {_seconds(self.offset_ms)}, spec.every is {_seconds(self.every_ms)})"
            )
        if self.jitter_ms >= self.every_ms:
            raise InvalidArgument(
                f"spec.jitter ({_seconds(self.jitter_ms)}) must be shorter than spec.every ({_seconds(self.every_ms)})"
            )

    def _check_cron(self) -> None:
        limits.SCHEDULE_CRONS.check(len(self.cron))
        if self.offset_ms:
            raise InvalidArgument("spec.offset applies only to spec.every")
        zone = ZoneInfo(self.time_zone)
        for i, expr in enumerate(self.cron):
            field = f"spec.cron[{i}]"
            shown = expr[:80]
            if len(expr) > limits.MAX_CRON_EXPRESSION:
                raise InvalidArgument(f"{field} is {len(expr)} characters, over the limit of {limits.MAX_CRON_EXPRESSION}")
            parts = expr.split()
            if len(parts) not in (5, 6):
                raise InvalidArgument(
                    f"{field} {shown!r} is not a valid cron expression: it has {len(parts)} fields, not 5 or 6"
                )
            if len(parts) == 6 and not limits.matches(_SECONDS_FIELD_RE, parts[0]):
                raise InvalidArgument(
                    f"{field} {shown!r} is not a valid cron expression: Bad second (numbers, '*', ',', '-', '/' only)"
                )
            try:
                first = next(_cron_iter(expr, zone, _NEVER_FIRES_PROBE.replace(tzinfo=zone)), None)
            except CronSimError as e:
                if _fits_no_month(expr):
                    raise InvalidArgument(f"{field} {shown!r} never fires") from None
                raise InvalidArgument(f"{field} {shown!r} is not a valid cron expression: {e}") from None
            except Exception as e:  # cronsim is not ours: whatever it raises on odd input is still bad input
                raise InvalidArgument(f"{field} {shown!r} is not a valid cron expression: {type(e).__name__}") from None
            if first is None:
                raise InvalidArgument(f"{field} {shown!r} never fires")

    # ------------------------------------------------------------ slots

    def next_after(self, after_ms: int) -> int | None:
        """The first slot strictly after after_ms (respecting start/end), or None when there is none."""
        if self.every_ms:
            return self._interval_next(after_ms)
        return next(self._cron_slots(after_ms), None)

    def slots(self, after_ms: int, until_ms: int, limit: int) -> list[int]:
        """Slots s with after_ms < s <= until_ms, ascending, at most `limit` of them."""
        found: list[int] = []
        if limit <= 0:
            return found
        if self.every_ms:
            slot = self._interval_next(after_ms)
            last = min(until_ms, self._end())
            while slot is not None and slot <= last and len(found) < limit:
                found.append(slot)
                slot += self.every_ms
            return found
        for slot in self._cron_slots(after_ms):
            if slot > until_ms:
                break
            found.append(slot)
            if len(found) >= limit:
                break
        return found

    def count(self, after_ms: int, until_ms: int, cap: int) -> int:
        """How many slots lie in (after_ms, until_ms], counting at most `cap`.

        Records how many slots an outage skipped: intervals count in O(1)
        (a year of every-second slots is one division), cron iterates and
        stops at the cap."""
        if cap <= 0:
            return 0
        if self.every_ms:
            low = max(after_ms, self._start() - 1)
            high = min(until_ms, self._end())
            if high <= low:
                return 0
            n = (high - self.offset_ms) // self.every_ms - (low - self.offset_ms) // self.every_ms
            return min(max(n, 0), cap)
        n = 0
        for slot in self._cron_slots(after_ms):
            if slot > until_ms:
                break
            n += 1
            if n >= cap:
                break
        return n

    def jitter_for(self, key: bytes, slot_ms: int) -> int:
        """Deterministic delay in [0, jitter_ms) for this slot, also strictly
        less than the gap to the next slot, so a slot's task is never due at
        or after the next slot's.

        Deterministic (a hash of key and slot, no randomness) because two
        trigger processes evaluating the same slot must create identical
        tasks; keyed so that schedules sharing a slot spread out."""
        span = self.jitter_ms
        following = self.next_after(slot_ms)
        if following is not None:
            span = min(span, following - slot_ms)
        span = min(span, limits.MAX_STORED_TIME_MS - slot_ms + 1)  # the due time stays storable
        if span <= 1:
            return 0
        digest = hashlib.blake2b(
            slot_ms.to_bytes(8, "big", signed=True) + key, digest_size=8, person=b"leasesched.jit"
        ).digest()
        return int.from_bytes(digest, "big") % span

    def describe(self) -> str:
        """One line for logs and the CLI, e.g. "cron '30 2 * * *' in Europe/Berlin" or "every 10 s (offset 2 s)"."""
        if self.every_ms:
            text = f"every {_seconds(self.every_ms)}"
            if self.offset_ms:
                text += f" (offset {_seconds(self.offset_ms)})"
        else:
            text = "cron " + ", ".join(repr(e) for e in self.cron) + f" in {self.time_zone}"
        if self.jitter_ms:
            text += f", jitter up to {_seconds(self.jitter_ms)}"
        if self.start_at_ms is not None:
            text += f", from {_iso(self.start_at_ms)}"
        if self.end_at_ms is not None:
            text += f", until {_iso(self.end_at_ms)}"
        return text

    # ------------------------------------------------------------ internals

    def _start(self) -> int:
        """The earliest possible slot: start_at, and never before the epoch."""
        return max(self.start_at_ms or 0, 0)

    def _end(self) -> int:
        """The latest possible slot: end_at, and never past what the store can hold."""
        return limits.MAX_STORED_TIME_MS if self.end_at_ms is None else min(self.end_at_ms, limits.MAX_STORED_TIME_MS)

    def _interval_next(self, after_ms: int) -> int | None:
        low = max(after_ms, self._start() - 1)
        slot = ((low - self.offset_ms) // self.every_ms + 1) * self.every_ms + self.offset_ms
        return slot if slot <= self._end() else None

    def _cron_slots(self, after_ms: int) -> Iterator[int]:
        """Every slot after after_ms up to the end, ascending, the union of all
        expressions without duplicates."""
        low = max(after_ms, self._start() - 1)
        end = self._end()
        if low >= end:
            return
        zone = ZoneInfo(self.time_zone)
        try:
            # Cron slots are whole seconds: a match strictly after the whole
            # second at or before low is strictly after low itself.
            start = datetime.fromtimestamp(low // 1000, zone)
        except (OverflowError, ValueError, OSError):
            return
        merged = heapq.merge(*(_cron_iter(expr, zone, start) for expr in self.cron))
        previous = low
        for slot in merged:
            if slot > end:
                return
            if slot > previous:
                previous = slot
                yield slot


def _cron_iter(expr: str, zone: ZoneInfo, start: datetime) -> Iterator[int]:
    """One expression's matches strictly after ``start`` (an aware datetime in
    ``zone``), as ascending ms; the DST rule of the module docstring.

    Raises ``CronSimError`` (at the first ``next``) for an invalid expression."""
    parts = expr.split()
    wall_clock = not parts[-5].startswith("*") and not parts[-4].startswith("*")
    matches = CronSim(expr, start.replace(tzinfo=None) if wall_clock else start)
    last = _to_ms(start)
    while True:
        try:
            found = next(matches)
        except (StopIteration, OverflowError, ValueError):  # none in 50 years, or past year 9999
            return
        if wall_clock:
            # A naive wall time: its first occurrence (fold=0) when it is repeated,
            # the first whole minute after the jump when it was skipped (as cronsim
            # does for 5 fields, and Debian cron).
            found = found.replace(tzinfo=zone, fold=0)
            while _is_imaginary(found):
                found = (found.replace(tzinfo=None) + _MINUTE).replace(tzinfo=zone, fold=0)
        slot = _to_ms(found)
        # A wall time in the second pass of a repeated hour maps to the first
        # pass, before the start; a skipped time maps to the same instant as
        # others: keep the sequence strictly ascending.
        if slot > last:
            last = slot
            yield slot


def _is_imaginary(dt: datetime) -> bool:
    """A wall time that never happened (in the hour a spring-forward skips)."""
    return dt.replace(tzinfo=None) != dt.astimezone(timezone.utc).astimezone(dt.tzinfo).replace(tzinfo=None)


def _to_ms(dt: datetime) -> int:
    return (dt - _EPOCH) // _SECOND * 1000 + dt.microsecond // 1000


def _fits_no_month(expr: str) -> bool:
    """cronsim refuses a day of month that no named month has ('0 0 30 2 *')
    as a bad field; with any month the expression would be valid, so what is
    wrong is that it never fires."""
    parts = expr.split()
    parts[-2] = "*"
    try:
        CronSim(" ".join(parts), _NEVER_FIRES_PROBE)
    except CronSimError:
        return False
    return True


def _seconds(ms: int) -> str:
    """A duration as messages and describe() show it: '10 s', '1.5 s'."""
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + " s"


def _iso(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%SZ")
