"""When a periodic schedule fires (leasesched/schedule_spec.py): exact slots
across DST changes, intervals, start/end, unions, counts, jitter, and every
refusal naming its field."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leasesched import limits
from leasesched.errors import InvalidArgument
from leasesched.schedule_spec import ScheduleSpec

S = 1000
MIN = 60 * S
HOUR = 60 * MIN
DAY = 24 * HOUR


def utc(*args: int) -> int:
    """ms since the epoch of a UTC date and time."""
    return int(datetime(*args, tzinfo=timezone.utc).timestamp()) * 1000  # type: ignore[misc]


def spec(**kw: object) -> ScheduleSpec:
    s = ScheduleSpec(**kw)  # type: ignore[arg-type]
    s.check()
    return s


# ---------------------------------------------------------------- DST


def test_daily_0230_berlin_across_spring_forward_runs_once_at_0300_cest() -> None:
    # 2026-03-29 02:00 CET -> 03:00 CEST: 02:30 does not exist that day.
    s = spec(cron=("30 2 * * *",), time_zone="Europe/Berlin")
    assert s.slots(utc(2026, 3, 26, 12), utc(2026, 4, 1), 100) == [
        utc(2026, 3, 27, 1, 30),  # 02:30 CET
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, the first minute after the jump
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        utc(2026, 3, 31, 0, 30),  # 02:30 CEST
    ]


def test_daily_0230_berlin_across_fall_back_runs_once_at_the_first_0230() -> None:
    # 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 happens twice that day.
    s = spec(cron=("30 2 * * *",), time_zone="Europe/Berlin")
    assert s.slots(utc(2026, 10, 22, 12), utc(2026, 10, 28), 100) == [
        utc(2026, 10, 23, 0, 30),  # 02:30 CEST
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # the first 02:30 (CEST); not 01:30Z, the second (CET)
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
        utc(2026, 10, 27, 1, 30),  # 02:30 CET
    ]


def test_daily_0230_berlin_asked_during_the_repeated_hour_waits_for_the_next_day() -> None:
    """After the first 02:30 has fired, the second pass of the hour (02:10 CET)
    must not bring it back: a fixed-time job never runs twice."""
    s = spec(cron=("30 2 * * *",), time_zone="Europe/Berlin")
    second_pass_0210 = utc(2026, 10, 25, 1, 10)
    assert s.next_after(second_pass_0210) == utc(2026, 10, 26, 1, 30)
    assert s.next_after(utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 26, 1, 30)


def test_daily_berlin_over_all_of_2026_has_one_slot_per_day() -> None:
    s = spec(cron=("30 2 * * *",), time_zone="Europe/Berlin")
    found = s.slots(utc(2025, 12, 31, 12), utc(2026, 12, 31, 12), 1000)
    assert len(found) == 365
    berlin = ZoneInfo("Europe/Berlin")
    days = [datetime.fromtimestamp(x / 1000, berlin).date() for x in found]
    assert len(set(days)) == 365


def test_new_york_spring_forward_and_fall_back() -> None:
    # 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    spring = spec(cron=("30 2 * * *",), time_zone="America/New_York")
    assert spring.slots(utc(2026, 3, 7), utc(2026, 3, 10), 10) == [
        utc(2026, 3, 7, 7, 30),  # 02:30 EST
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT
        utc(2026, 3, 9, 6, 30),  # 02:30 EDT
    ]
    fall = spec(cron=("30 1 * * *",), time_zone="America/New_York")
    assert fall.slots(utc(2026, 10, 31), utc(2026, 11, 3), 10) == [
        utc(2026, 10, 31, 5, 30),  # 01:30 EDT
        utc(2026, 11, 1, 5, 30),  # the first 01:30 (EDT), once
        utc(2026, 11, 2, 6, 30),  # 01:30 EST
    ]


def test_wildcard_hour_runs_every_real_half_hour_through_both_changes() -> None:
    s = spec(cron=("*/30 * * * *",), time_zone="Europe/Berlin")
    # Fall back: 02:00 CEST, 02:30 CEST, 02:00 CET, 02:30 CET, 03:00 CET.
    assert s.slots(utc(2026, 10, 24, 23, 59), utc(2026, 10, 25, 2), 10) == [
        utc(2026, 10, 25, 0, 0),
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 0),
        utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 25, 2, 0),
    ]
    # Spring forward: 01:00 CET, 01:30 CET, 03:00 CEST, 03:30 CEST.
    assert s.slots(utc(2026, 3, 28, 23, 59), utc(2026, 3, 29, 1, 30), 10) == [
        utc(2026, 3, 29, 0, 0),
        utc(2026, 3, 29, 0, 30),
        utc(2026, 3, 29, 1, 0),
        utc(2026, 3, 29, 1, 30),
    ]


def test_six_fields_with_a_fixed_time_follow_the_same_dst_rule() -> None:
    """cronsim itself skips '0 30 2 * * *' on the spring day and runs it twice in
    autumn; a seconds field must not change that, so the spec applies the rule."""
    six = spec(cron=("0 30 2 * * *",), time_zone="Europe/Berlin")
    five = spec(cron=("30 2 * * *",), time_zone="Europe/Berlin")
    for after, until in ((utc(2026, 3, 27), utc(2026, 3, 31)), (utc(2026, 10, 23), utc(2026, 10, 27))):
        assert six.slots(after, until, 10) == five.slots(after, until, 10)
    assert six.next_after(utc(2026, 3, 29)) == utc(2026, 3, 29, 1, 0)


@pytest.mark.parametrize(
    "expr", ["30 2 * * *", "0,30 2 * * *", "15 1-3 * * *", "*/20 * * * *", "0 */2 * * *", "59 2 * 3,10 SUN", "0 0 L * *"]
)
@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
def test_five_fields_give_exactly_cronsims_slots(expr: str, zone: str) -> None:
    """For 5 fields the spec's own DST handling is cronsim's (Debian cron's)."""
    s = spec(cron=(expr,), time_zone=zone)
    start = datetime(2025, 12, 31, 23, 0, tzinfo=ZoneInfo(zone))
    expected = []
    for found in CronSim(expr, start):
        ms = int(found.timestamp()) * 1000
        if ms > utc(2027, 1, 1):
            break
        expected.append(ms)
    # cronsim repeats a wall time pushed out of a skipped hour; the spec keeps each instant once.
    expected = sorted(set(expected))
    assert s.slots(int(start.timestamp()) * 1000, utc(2027, 1, 1), 100_000) == expected


def test_intervals_ignore_dst() -> None:
    s = spec(every_ms=HOUR, time_zone="Europe/Berlin")
    assert s.slots(utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 3), 10) == [
        utc(2026, 3, 29, 1),
        utc(2026, 3, 29, 2),
        utc(2026, 3, 29, 3),
    ]


# ---------------------------------------------------------------- intervals, start/end, unions, seconds


def test_interval_with_offset_is_aligned_to_the_epoch() -> None:
    s = spec(every_ms=10 * S, offset_ms=2 * S)
    assert s.next_after(0) == 2 * S
    assert s.next_after(1999) == 2 * S
    assert s.next_after(2 * S) == 12 * S
    assert s.next_after(utc(2026, 1, 1) + 1) == utc(2026, 1, 1) + 2 * S
    assert s.slots(0, 45 * S, 100) == [2 * S, 12 * S, 22 * S, 32 * S, 42 * S]
    assert s.slots(0, 45 * S, 2) == [2 * S, 12 * S]
    assert s.slots(0, 45 * S, 0) == []


def test_start_and_end_are_inclusive_for_intervals() -> None:
    s = spec(every_ms=10 * S, start_at_ms=20 * S, end_at_ms=50 * S)
    assert s.next_after(0) == 20 * S
    assert s.next_after(-5) == 20 * S
    assert s.slots(0, 100 * S, 100) == [20 * S, 30 * S, 40 * S, 50 * S]
    assert s.next_after(49_999) == 50 * S
    assert s.next_after(50 * S) is None
    assert spec(every_ms=10 * S, start_at_ms=25 * S).next_after(0) == 30 * S


def test_start_and_end_are_inclusive_for_cron() -> None:
    s = spec(cron=("0 * * * *",), start_at_ms=utc(2026, 1, 1, 5), end_at_ms=utc(2026, 1, 1, 8))
    assert s.next_after(0) == utc(2026, 1, 1, 5)
    assert s.slots(0, utc(2027, 1, 1), 100) == [utc(2026, 1, 1, h) for h in (5, 6, 7, 8)]
    assert s.next_after(utc(2026, 1, 1, 8)) is None
    assert s.count(0, utc(2027, 1, 1), 100) == 4


def test_union_of_two_crons_is_sorted_without_duplicates() -> None:
    # Monday 2026-01-05: both fire at 09:00; a weekday-only 09:30 besides.
    s = spec(cron=("0 9 * * *", "0,30 9 * * 1-5"))
    assert s.slots(utc(2026, 1, 3), utc(2026, 1, 6), 100) == [
        utc(2026, 1, 3, 9),  # Saturday: the daily one only
        utc(2026, 1, 4, 9),  # Sunday
        utc(2026, 1, 5, 9),  # Monday: once, though both match
        utc(2026, 1, 5, 9, 30),
    ]
    assert s.next_after(utc(2026, 1, 5, 9)) == utc(2026, 1, 5, 9, 30)


def test_six_fields_have_seconds_and_strictly_after_holds_below_a_second() -> None:
    s = spec(cron=("*/15 * * * * *",))
    base = utc(2026, 5, 1, 12)
    assert s.next_after(base) == base + 15 * S
    assert s.next_after(base - 1) == base
    assert s.next_after(base + 500) == base + 15 * S
    assert s.next_after(base + 14_999) == base + 15 * S
    assert s.slots(base, base + MIN, 10) == [base + 15 * S, base + 30 * S, base + 45 * S, base + MIN]
    # Five fields: whole minutes, strictly after also from a sub-second time.
    five = spec(cron=("* * * * *",))
    assert five.next_after(base + 1) == base + MIN
    assert five.next_after(base - 1) == base


def test_no_slot_past_what_the_store_holds() -> None:
    s = spec(cron=("* * * * *",), time_zone="Pacific/Kiritimati")
    last = limits.MAX_STORED_TIME_MS
    assert s.next_after(last) is None
    assert s.next_after(last - 10 * DAY) is not None
    assert spec(every_ms=S).next_after(last) is None


# ---------------------------------------------------------------- count


def test_count_intervals_is_arithmetic_and_capped() -> None:
    s = spec(every_ms=S)
    began = time.monotonic()
    assert s.count(0, limits.YEAR_MS, 10**12) == limits.YEAR_MS // S
    assert s.count(0, limits.MAX_STORED_TIME_MS, 10**15) == limits.MAX_STORED_TIME_MS // S
    assert time.monotonic() - began < 0.1  # no loop over a year of every-second slots
    assert s.count(0, 10 * S, 3) == 3
    assert s.count(10 * S, 10 * S, 5) == 0
    assert s.count(10 * S, 0, 5) == 0
    assert s.count(0, 10 * S, 0) == 0
    t = spec(every_ms=10 * S, offset_ms=2 * S, start_at_ms=12 * S, end_at_ms=42 * S)
    for after in range(-1, 50 * S, 500):
        for until in (after, after + 999, after + 10 * S, after + 40 * S):
            assert t.count(after, until, 100) == len(t.slots(after, until, 100)), (after, until)


def test_count_cron_stops_at_the_cap() -> None:
    s = spec(cron=("* * * * * *",))
    began = time.monotonic()
    assert s.count(0, limits.YEAR_MS, 500) == 500
    assert time.monotonic() - began < 2
    assert s.count(utc(2026, 1, 1), utc(2026, 1, 1, 0, 1), 1000) == 60
    daily = spec(cron=("30 2 * * *",), time_zone="Europe/Berlin")
    assert daily.count(utc(2026, 3, 26), utc(2026, 4, 1), 100) == 6
    assert daily.count(utc(2026, 3, 26), utc(2026, 4, 1), 4) == 4


# ---------------------------------------------------------------- jitter


def test_jitter_is_deterministic_and_within_bounds() -> None:
    s = spec(every_ms=HOUR, jitter_ms=10 * MIN)
    same = ScheduleSpec(every_ms=HOUR, jitter_ms=10 * MIN)
    slot = utc(2026, 1, 1, 5)
    values = {s.jitter_for(f"schedule-{i}".encode(), slot) for i in range(200)}
    assert all(0 <= v < 10 * MIN for v in values)
    assert len(values) > 150  # spread, not one delay for all
    assert s.jitter_for(b"k", slot) == same.jitter_for(b"k", slot) == s.jitter_for(b"k", slot)
    assert s.jitter_for(b"k", slot) != s.jitter_for(b"k", slot + HOUR) or s.jitter_for(b"k", slot + 2 * HOUR) != s.jitter_for(
        b"k", slot
    )
    assert spec(every_ms=HOUR).jitter_for(b"k", slot) == 0


def test_jitter_pinned_value() -> None:
    """The hash is part of the contract between trigger processes (and versions):
    two of them must compute the same due time for the same slot."""
    s = spec(every_ms=HOUR, jitter_ms=10 * MIN)
    assert s.jitter_for(b"ns/nightly", utc(2026, 1, 1)) == 183_464


def test_jitter_never_reaches_the_next_slot() -> None:
    # Every minute with a 10-minute jitter: each task still due before the next slot.
    s = spec(cron=("* * * * *", "30 * * * * *"), jitter_ms=10 * MIN)
    slots = s.slots(utc(2026, 1, 1), utc(2026, 1, 1, 1), 1000)
    for slot, following in zip(slots, slots[1:]):
        for key in (b"a", b"b", b"c", b"d"):
            assert slot + s.jitter_for(key, slot) < following
    delays = {s.jitter_for(b"k", x) for x in slots}
    assert max(delays) >= 20 * S  # the whole gap is used, not just a sliver
    # The last slot before end_at has no next: only jitter bounds it.
    end = spec(every_ms=HOUR, jitter_ms=30 * MIN, end_at_ms=HOUR)
    assert all(0 <= end.jitter_for(bytes([i]), HOUR) < 30 * MIN for i in range(50))


# ---------------------------------------------------------------- describe


def test_describe() -> None:
    assert spec(cron=("30 2 * * *",), time_zone="Europe/Berlin").describe() == "cron '30 2 * * *' in Europe/Berlin"
    assert spec(every_ms=10 * S, offset_ms=2 * S).describe() == "every 10 s (offset 2 s)"
    assert spec(every_ms=1500).describe() == "every 1.5 s"
    text = spec(cron=("0 9 * * *", "0 17 * * *"), jitter_ms=MIN, start_at_ms=0, end_at_ms=DAY).describe()
    assert text == "cron '0 9 * * *', '0 17 * * *' in UTC, jitter up to 60 s, from 1970-01-01T00:00:00Z, until 1970-01-02T00:00:00Z"


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"cron": ("0 * * * *", "61 * * * *")}, "spec.cron[1] '61 * * * *' is not a valid cron expression: Bad minute"),
        ({"cron": ("* * * *",)}, "spec.cron[0] '* * * *' is not a valid cron expression"),
        ({"cron": ("* * * * * * *",)}, "spec.cron[0]"),
        ({"cron": ("",)}, "spec.cron[0]"),
        ({"cron": ("0 0 30 2 *",)}, "spec.cron[0] '0 0 30 2 *' never fires"),
        ({"cron": ("0 0 31 4,6,9,11 *",)}, "spec.cron[0] '0 0 31 4,6,9,11 *' never fires"),
        ({"cron": ("0 0 32 * *",)}, "spec.cron[0] '0 0 32 * *' is not a valid cron expression: Bad day-of-month"),
        ({"cron": ("L * * * * *",)}, "spec.cron[0] 'L * * * * *' is not a valid cron expression: Bad second"),
        ({"cron": ("MON * * * * *",)}, "spec.cron[0]"),
        ({"cron": ("1#2 * * * * *",)}, "spec.cron[0]"),
        ({"cron": ("0 0 * * 8",)}, "spec.cron[0]"),
        ({"cron": ("*/0 * * * *",)}, "spec.cron[0]"),
        ({"cron": ("5-1 * * * *",)}, "spec.cron[0]"),
        ({"cron": ("@daily",)}, "spec.cron[0]"),
        ({"cron": ("0 " * 200 + "* * *",)}, "spec.cron[0] is 405 characters, over the limit of 256"),
        ({"cron": ("* * * * *",) * 11}, "spec.cron 11 entries is out of range 0..10 entries"),
        ({"cron": "* * * * *"}, "spec.cron must be a tuple of strings"),
        ({"cron": ("* * * * *",), "time_zone": "Mars/Base"}, "spec.time_zone 'Mars/Base' is not an IANA time zone"),
        ({"cron": ("* * * * *",), "time_zone": ""}, "spec.time_zone '' is not an IANA time zone"),
        ({"cron": ("* * * * *",), "time_zone": "../etc/passwd"}, "spec.time_zone"),
        ({"cron": ("* * * * *",), "time_zone": "/etc/localtime"}, "spec.time_zone"),
        ({"cron": ("* * * * *",), "time_zone": "Europe/../Europe/Berlin"}, "spec.time_zone"),
        ({"cron": ("* * * * *",), "time_zone": "America"}, "spec.time_zone 'America' is not an IANA time zone"),
        ({"cron": ("* * * * *",), "time_zone": "zone1970"}, "spec.time_zone"),
        ({"cron": ("* * * * *",), "time_zone": "A" * 65}, "spec.time_zone"),
        ({"cron": ("* * * * *",), "time_zone": "Europe/Berlin\n"}, "spec.time_zone"),
        ({"every_ms": 999}, "spec.every 0.999 s is out of range 1..31622400 s"),
        ({"every_ms": -S}, "spec.every"),
        ({"every_ms": limits.YEAR_MS + 1}, "spec.every"),
        ({"every_ms": 1.5 * S}, "spec.every must be an integer number of ms"),
        ({"every_ms": MIN, "cron": ("* * * * *",)}, "spec: set cron or every, not both"),
        ({}, "spec: set cron or every"),
        ({"every_ms": MIN, "offset_ms": MIN}, "spec.offset must be in 0..every"),
        ({"every_ms": MIN, "offset_ms": -1}, "spec.offset must be in 0..every"),
        ({"cron": ("* * * * *",), "offset_ms": S}, "spec.offset applies only to spec.every"),
        ({"every_ms": MIN, "jitter_ms": MIN}, "spec.jitter (60 s) must be shorter than spec.every (60 s)"),
        ({"cron": ("* * * * *",), "jitter_ms": -1}, "spec.jitter"),
        ({"cron": ("* * * * *",), "jitter_ms": limits.YEAR_MS + 1}, "spec.jitter"),
        ({"every_ms": MIN, "start_at_ms": 10, "end_at_ms": 9}, "spec.end_at is before spec.start_at"),
        ({"every_ms": MIN, "start_at_ms": -1}, "spec.start_at"),
        ({"every_ms": MIN, "end_at_ms": limits.MAX_STORED_TIME_MS + 1}, "spec.end_at"),
        ({"every_ms": MIN, "end_at_ms": True}, "spec.end_at"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ScheduleSpec(**kw).check()  # type: ignore[arg-type]
    assert message in str(refused.value)
    assert str(refused.value).startswith("spec")


@pytest.mark.parametrize(
    "kw",
    [
        {"cron": ("0 0 29 2 *",)},  # leap years only
        {"cron": ("0 0 * 2 MON#5",)},  # a fifth Monday in February: 2016, 2044
        {"cron": ("0 0 LW * *", "0 12 * * 5L", "0 0 1 JAN,jul *")},
        {"cron": ("0,30 */5 1-10/2 * * 0-7",), "time_zone": "Etc/GMT+5"},
        {"cron": ("0 9 * * *",), "time_zone": "Factory"},
        {"every_ms": S, "jitter_ms": S - 1, "start_at_ms": 0, "end_at_ms": limits.MAX_STORED_TIME_MS},
        {"every_ms": limits.YEAR_MS, "offset_ms": limits.YEAR_MS - 1},
        {"every_ms": MIN, "time_zone": "Asia/Tokyo"},
    ],
)
def test_valid_specs_pass(kw: dict[str, object]) -> None:
    s = ScheduleSpec(**kw)  # type: ignore[arg-type]
    s.check()
    assert s.next_after(utc(2026, 1, 1)) is not None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789*/,-LW#?@ MONJASUNDECxyz\t\u0663", max_size=40))
def test_any_text_as_cron_is_accepted_or_refused_with_invalid_argument(expr: str) -> None:
    s = ScheduleSpec(cron=(expr,))
    try:
        s.check()
    except InvalidArgument as e:
        assert str(e).startswith("spec.cron[0]")
        return
    s.next_after(utc(2026, 1, 1))


# ---------------------------------------------------------------- properties

CRONS = [
    "30 2 * * *",
    "*/30 * * * *",
    "0 30 2 * * *",
    "*/7 * * * * *",
    "0,15 1-3 * * 0",
    "0 0 L * *",
    "0 12 * * MON-FRI",
]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


@st.composite
def specs(draw: st.DrawFn) -> ScheduleSpec:
    window = (utc(2026, 1, 1), utc(2027, 1, 1))
    start = draw(st.none() | st.integers(*window))
    end = draw(st.none() | st.integers(start or window[0], window[1] + 30 * DAY))
    if draw(st.booleans()):
        every = draw(st.integers(S, 3 * DAY))
        return spec(
            every_ms=every,
            offset_ms=draw(st.integers(0, every - 1)),
            jitter_ms=draw(st.integers(0, every - 1)),
            start_at_ms=start,
            end_at_ms=end,
        )
    crons = draw(st.lists(st.sampled_from(CRONS), min_size=1, max_size=3, unique=True))
    return spec(cron=tuple(crons), time_zone=draw(st.sampled_from(ZONES)), start_at_ms=start, end_at_ms=end,
                jitter_ms=draw(st.integers(0, 2 * HOUR)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.integers(utc(2025, 12, 1), utc(2027, 1, 1)), st.integers(0, 20 * DAY), st.integers(0, 40))
def test_slots_are_ascending_in_range_and_equal_repeated_next_after(
    s: ScheduleSpec, after: int, span: int, limit: int
) -> None:
    until = after + span
    found = s.slots(after, until, limit)
    assert len(found) <= limit
    assert all(after < x <= until for x in found)
    assert all(a < b for a, b in zip(found, found[1:]))
    if s.start_at_ms is not None:
        assert all(x >= s.start_at_ms for x in found)
    if s.end_at_ms is not None:
        assert all(x <= s.end_at_ms for x in found)
    stepped: list[int] = []
    at: int | None = after
    while len(stepped) < limit:
        at = s.next_after(at) if at is not None else None
        if at is None or at > until:
            break
        stepped.append(at)
    assert found == stepped
    assert s.count(after, until, limit) == len(found)
    for slot in found:
        following = s.next_after(slot)
        delay = s.jitter_for(b"key", slot)
        assert 0 <= delay <= max(s.jitter_ms - 1, 0)
        assert following is None or slot + delay < following
