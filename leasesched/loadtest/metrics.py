"""Recording what each RPC did: latency, status code, and when — per method and per second.

Latency is measured from the request's *intended* send time (its slot in the
open-loop schedule), not from the moment the client got round to sending it,
so a client that falls behind cannot hide server slowness (no coordinated
omission). How far the client itself fell behind is recorded separately as
the send lag.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


def percentiles(values: Sequence[float] | np.ndarray, qs: Iterable[int] = PERCENTILES) -> dict[str, float | None]:
    """``{"p50": …, "p95": …, "p99": …, "max": …, "n": …}`` (nearest-rank), None when empty."""
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {}
    if arr.size == 0:
        out.update({f"p{q}": None for q in qs})
        out["max"] = None
        out["n"] = 0
        return out
    arr = np.sort(arr)
    for q in qs:
        rank = max(1, math.ceil(q / 100.0 * arr.size))
        out[f"p{q}"] = round(float(arr[rank - 1]), 3)
    out["max"] = round(float(arr[-1]), 3)
    out["n"] = int(arr.size)
    return out


@dataclass
class MethodStats:
    """One RPC method during one load test."""

    name: str
    t0: float  # loop time of the load start; seconds are counted from here
    sent: int = 0
    not_sent: Counter[str] = field(default_factory=Counter)  # why a scheduled request was not sent
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_details: dict[str, str] = field(default_factory=dict)  # the first message seen per status code
    latencies_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    inflight: int = 0
    # second → [ok count, error count, latencies of OK answers in that second]
    _per_second: dict[int, list[Any]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, []]))
    _sent_per_second: Counter[int] = field(default_factory=Counter)  # by the second it actually left

    def on_sent(self, intended: float, actual: float) -> None:
        self.sent += 1
        self._sent_per_second[int(actual - self.t0)] += 1
        self.inflight += 1
        self.send_lag_ms.append((actual - intended) * 1000.0)

    def on_done(self, intended: float, now: float, code: str | None, details: str = "", sent: float | None = None) -> None:
        """``code`` None: OK; else the gRPC status name. Bucketed by the second the answer came.
        The latency runs from ``intended`` (a late send counts), or from ``sent`` when given (a
        request of a batch: its wait for the batch is send lag, its latency the call's)."""
        self.inflight -= 1
        bucket = self._per_second[int(now - self.t0)]
        if code is None:
            self.ok += 1
            latency = (now - (intended if sent is None else sent)) * 1000.0
            self.latencies_ms.append(latency)
            bucket[0] += 1
            bucket[2].append(latency)
        else:
            self.errors[code] += 1
            self.error_details.setdefault(code, details[:300])
            bucket[1] += 1

    def on_not_sent(self, reason: str) -> None:
        self.not_sent[reason] += 1

    def summary(self, seconds: float, target_rate: float) -> dict[str, Any]:
        return {
            "target_per_s": target_rate,
            "sent": self.sent,
            "not_sent": dict(self.not_sent),
            "ok": self.ok,
            "errors": dict(self.errors),
            "error_details": dict(self.error_details),
            "achieved_ok_per_s": round(self.ok / seconds, 1) if seconds else 0.0,
            "latency_ms": percentiles(self.latencies_ms),
            "send_lag_ms": percentiles(self.send_lag_ms),
        }

    def series(self, seconds: int) -> dict[str, list[Any]]:
        ok, err, p50, p99 = [], [], [], []
        for s in range(seconds):
            n_ok, n_err, lats = self._per_second.get(s, (0, 0, []))
            ok.append(n_ok)
            err.append(n_err)
            pct = percentiles(lats, (50, 99))
            p50.append(pct["p50"])
            p99.append(pct["p99"])
        sent = [self._sent_per_second.get(s, 0) for s in range(seconds)]
        return {"sent": sent, "ok": ok, "errors": err, "p50_ms": p50, "p99_ms": p99}

    def rate_last(self, now: float, window: float = 1.0) -> float:
        """OK answers per second over the last full second (for the progress bar)."""
        second = int(now - self.t0) - 1
        if second < 0:
            return 0.0
        return float(self._per_second.get(second, (0, 0, []))[0]) / window
