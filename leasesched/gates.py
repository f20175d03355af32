"""Gates: named, cluster-wide rate limits for tasks (issue 15, docs/gates.md).

A gate is one row per (namespace, gate) holding its definition (rate, burst,
warm-up), its switches (paused, closed until) and the state of a GCRA
("generic cell rate algorithm") limiter: the *theoretical arrival time*
``tat_us``. Why GCRA and not a token bucket with a refill timestamp: its whole
state is one number that only grows, so a trigger can reserve tokens with one
conditional write on that number (``IF tat_us = <read>``), and the rate holds
for the whole cluster however many triggers take tokens.

Reserving ``n`` tokens at ``now``::

    start = max(TAT, now)
    TAT'  = start + n × interval          (interval = 1 / effective rate)
    allowed while TAT' − now ≤ tolerance  (tolerance = effective burst × interval)

so over any window of length w at most ``rate × w + burst`` tokens are handed
out. The *warm-up* ramps the effective rate linearly from ``RAMP_FLOOR``
(10 %) to 100 % of ``rate`` over ``warmup`` after an unpause or after the gate
was idle for at least ``warmup`` (no token taken): no flood after an outage.
The burst ramps with it (never below one token), so the tolerance in time
stays ``burst / rate``.

Everything here is pure arithmetic over a ``Gate`` and a clock value: the
store keeps the row, the trigger (``trigger/gates.py``) takes the tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

# The effective rate right after an unpause or a long idle, as a share of the rate.
RAMP_FLOOR = 0.1
US_PER_S = 1_000_000
# Bounds of a definition (INVALID_ARGUMENT outside): a rate of at most a
# million tasks a second, a burst of at most a million, a warm-up of a day.
MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000
MAX_WARMUP_MS = 86_400_000
MAX_IN_FLIGHT = 1_000  # as concurrency.MAX_RUNNING: its slots are one partition


class GateState(enum.Enum):
    """What a gate does now to its tasks (the ``state`` label of the gate metric)."""

    OPEN = "open"  # tokens are handed out at its rate
    PAUSED = "paused"  # an operator paused it: no token until unpaused
    CLOSED = "closed"  # a handler was rate limited: no token until closed_until


@dataclass(frozen=True)
class Gate:
    """One gate row. Times in ms since the epoch, ``tat_us`` in µs."""

    namespace: str
    name: str
    rate: float  # tokens a second, > 0
    burst: int  # tokens that may be taken at once, >= 1
    warmup_ms: int = 0  # 0: no ramp
    max_in_flight: int = 0  # its tasks running at once at most; 0: no cap (concurrency slots, leasesched/admission.py)
    paused: bool = False
    closed_until_ms: int = 0  # no token before this (a RateLimited handler); 0: never closed
    tat_us: int = 0  # GCRA theoretical arrival time
    ramp_from_ms: int = 0  # the ramp's start (unpause or the end of an idle time); 0: no ramp
    version: int = 1  # grows with every change of definition or switches (SetGate's expected_version)
    created_at_ms: int = 0
    updated_at_ms: int = 0

    def replace(self, **changes: object) -> "Gate":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def state(self, now_ms: int) -> GateState:
        if self.paused:
            return GateState.PAUSED
        if self.closed_until_ms > now_ms:
            return GateState.CLOSED
        return GateState.OPEN


@dataclass(frozen=True)
class Reservation:
    """The answer of ``reserve``: ``granted`` tokens (0..wanted); the row's new
    ``tat_us`` and ``ramp_from_ms`` to write when granted; else ``wait_us``, how
    long until one token could be granted."""

    granted: int
    tat_us: int
    ramp_from_ms: int
    wait_us: int = 0


def ramp_factor(gate: Gate, now_ms: int, ramp_from_ms: int | None = None) -> float:
    """The share of ``gate.rate`` in force at ``now_ms``: ``RAMP_FLOOR`` at the
    ramp's start, linearly up to 1.0 after ``warmup_ms``."""
    start = gate.ramp_from_ms if ramp_from_ms is None else ramp_from_ms
    if gate.warmup_ms <= 0 or start <= 0 or now_ms >= start + gate.warmup_ms:
        return 1.0
    elapsed = max(0, now_ms - start)
    return RAMP_FLOOR + (1.0 - RAMP_FLOOR) * elapsed / gate.warmup_ms


def ramp_start(gate: Gate, now_ms: int) -> int:
    """The ramp in force for a reservation at ``now_ms``: a gate idle for at
    least ``warmup`` (its TAT that far behind, nothing taken meanwhile, or never
    used) starts a new ramp now; otherwise the stored one goes on."""
    if gate.warmup_ms <= 0:
        return gate.ramp_from_ms
    if gate.tat_us // 1000 + gate.warmup_ms <= now_ms:
        return now_ms
    return gate.ramp_from_ms


def _interval_and_tolerance(gate: Gate, factor: float) -> tuple[float, float]:
    """µs between two tokens and the GCRA tolerance (µs), at ``factor`` of the rate."""
    interval = US_PER_S / (gate.rate * factor)
    tolerance = max(gate.burst * factor, 1.0) * interval
    return interval, tolerance


def reserve(gate: Gate, now_us: int, wanted: int) -> Reservation:
    """Up to ``wanted`` tokens at ``now_us`` (fewer when the burst allows fewer).
    Ignores ``paused``/``closed_until_ms``: the caller checks ``state`` first."""
    now_ms = now_us // 1000
    ramp_from = ramp_start(gate, now_ms)
    factor = ramp_factor(gate, now_ms, ramp_from)
    interval, tolerance = _interval_and_tolerance(gate, factor)
    start = max(gate.tat_us, now_us)
    room = (now_us + tolerance - start) / interval  # tokens that fit before the tolerance is used up
    granted = max(0, min(wanted, math.floor(room + 1e-9)))
    if granted == 0:
        wait = max(1, math.ceil(start + interval - tolerance - now_us))
        return Reservation(0, gate.tat_us, gate.ramp_from_ms, wait_us=wait)
    return Reservation(granted, math.ceil(start + granted * interval), ramp_from)


def available(gate: Gate, now_us: int) -> float:
    """Tokens that could be taken at once now (the gate metric), 0 while paused or closed."""
    if gate.state(now_us // 1000) != GateState.OPEN:
        return 0.0
    now_ms = now_us // 1000
    factor = ramp_factor(gate, now_ms, ramp_start(gate, now_ms))
    interval, tolerance = _interval_and_tolerance(gate, factor)
    return max(0.0, (now_us + tolerance - max(gate.tat_us, now_us)) / interval)


def check_definition(rate: float, burst: int, warmup_ms: int, max_in_flight: int = 0) -> None:
    """Raise ``ValueError`` naming the field for a definition out of bounds."""
    if max_in_flight < 0 or max_in_flight > MAX_IN_FLIGHT:
        raise ValueError(f"max_in_flight must be between 0 (no cap) and {MAX_IN_FLIGHT}, not {max_in_flight}")
    if not math.isfinite(rate) or rate <= 0 or rate > MAX_RATE:
        raise ValueError(f"rate must be > 0 and at most {MAX_RATE:g} tasks a second, not {rate!r}")
    if burst < 1 or burst > MAX_BURST:
        raise ValueError(f"burst must be between 1 and {MAX_BURST}, not {burst}")
    if warmup_ms < 0 or warmup_ms > MAX_WARMUP_MS:
        raise ValueError(f"warmup must be between 0 and {MAX_WARMUP_MS // 1000} s, not {warmup_ms} ms")
