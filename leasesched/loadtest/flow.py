"""Concurrency limits and gates as load (``leasesched loadtest --limit-per-key N``,
``--gate-rate R [--gate-burst B]``), issue 15.

A limit and a gate are promises about what *ran*: at most N tasks of a key at
one moment, at most ``rate × w + burst`` task starts in any window of ``w``
seconds. The harness therefore sets them up around the run (the runner: a
default key limit ``*`` in the load's namespace, a gate every task of the
load names, both removed afterwards) and judges them from the execution
ledger, never from the server's own counters: a limit that leaked would not
show in the slots that admitted the extra task.

This module is the pure part: the plan (validated options, the gate's name)
and the report's ``flow`` section over ledger executions
(``leasesched.loadtest.ledger.Execution``, the ledger read once by the
runner). The concurrency per key is ``groups.max_concurrency_per_key``, i.e.
``ledger.max_concurrent``, the sweep the limit integration tests use, so a
report and a test never disagree on what "at once" means.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leasesched.concurrency import DEFAULT_KEY, MAX_RUNNING
from leasesched.gates import MAX_BURST, MAX_RATE
from leasesched.loadtest.groups import max_concurrency_per_key
from leasesched.loadtest.ledger import Execution

OPTION_FIELDS = ("limit_per_key", "gate_rate", "gate_burst")  # the LoadOptions fields of a flow run
GATE_PREFIX = "load-"  # the gate's name: load-<run id>, so two runs against one cluster never share a gate
WINDOWS_S = (1.0, 10.0)  # the windows whose busiest start count is compared with rate × w + burst
DEFAULT_GATE_BURST = 1  # as ``leasesched gate set``


@dataclass(frozen=True)
class FlowPlan:
    """What one run sets up: a default key limit (``limit_per_key``, None: none)
    and a gate (``gate_rate``, None: none; ``gate_burst`` tasks at once)."""

    limit_per_key: int | None = None
    gate_rate: float | None = None
    gate_burst: int = DEFAULT_GATE_BURST
    gate_name: str = ""

    def __post_init__(self) -> None:
        if self.limit_per_key is not None and not 1 <= self.limit_per_key <= MAX_RUNNING:
            raise ValueError(f"--limit-per-key must be within 1..{MAX_RUNNING}")
        if self.gate_rate is not None:
            if not (math.isfinite(self.gate_rate) and 0 < self.gate_rate <= MAX_RATE):
                raise ValueError(f"--gate-rate must be > 0 and at most {MAX_RATE:g}")
            if not 1 <= self.gate_burst <= MAX_BURST:
                raise ValueError(f"--gate-burst must be within 1..{MAX_BURST}")
            if not self.gate_name:
                raise ValueError("a gate needs a name")

    @classmethod
    def from_options(
        cls, limit_per_key: int | None, gate_rate: float | None, gate_burst: int | None, groups: int, run_id: str
    ) -> "FlowPlan | None":
        """None when the run has neither; ValueError for options that make no sense together.

        A key limit without ``--groups`` is refused rather than run: the load's
        tasks would have no concurrency key, so no key limit would hold them
        and the run would measure nothing it claims to."""
        if limit_per_key is not None and groups <= 0:
            raise ValueError("--limit-per-key needs --groups (a task without a concurrency key is held by no key limit)")
        if gate_burst is not None and gate_rate is None:
            raise ValueError("--gate-burst needs --gate-rate")
        if limit_per_key is None and gate_rate is None:
            return None
        return cls(
            limit_per_key=limit_per_key, gate_rate=gate_rate,
            gate_burst=DEFAULT_GATE_BURST if gate_burst is None else gate_burst,
            gate_name=f"{GATE_PREFIX}{run_id}" if gate_rate is not None else "",
        )  # fmt: skip

    @property
    def limit_name(self) -> str:
        """The key limit's name: the default key, so every group g0..gN gets N on its own."""
        return DEFAULT_KEY

    def describe(self) -> str:
        parts = []
        if self.limit_per_key is not None:
            parts.append(f"at most {self.limit_per_key} running per key")
        if self.gate_rate is not None:
            parts.append(f"gate {self.gate_name} {self.gate_rate:g}/s burst {self.gate_burst}")
        return ", ".join(parts)


# ---------------------------------------------------------------- concurrency per key


def limit_section(limit: int, per_key: Mapping[str, int]) -> dict[str, Any]:
    """Whether a limit of ``limit`` per key held, from ``groups.max_concurrency_per_key``'s answer.

    ``used`` says the limit was reached by some key: a run whose keys never
    had ``limit`` tasks to run at once shows nothing about the limit."""
    top = max(sorted(per_key), key=lambda k: per_key[k], default=None)
    over = {k: v for k, v in per_key.items() if v > limit}
    return {
        "scope": "key",
        "name": DEFAULT_KEY,
        "max_running": limit,
        "max_over_keys": per_key[top] if top is not None else None,
        "key": top,
        "keys_seen": len(per_key),
        "keys_over_limit": over,
        "held": not over,
        "used": top is not None and per_key[top] >= limit,
    }


# ---------------------------------------------------------------- gates


def busiest_window(starts: Sequence[float], window_s: float) -> tuple[int, float | None]:
    """The most of ``starts`` (wall s) inside one closed window [t, t + w], and its t.

    Closed, because a token bucket that is full at t gives ``burst`` tokens
    at t and ``rate × w`` more by t + w: that is the gate's promise, "at most
    rate × w + burst in any window of w seconds", ends included. The busiest
    window starts at some start (sliding it left to the first start it holds
    loses none), so only those are tried."""
    ordered = sorted(starts)
    best, at = 0, None
    for i, t in enumerate(ordered):
        n = bisect_right(ordered, t + window_s) - i
        if n > best:
            best, at = n, t
    return best, at


def start_rate(starts: Sequence[float]) -> float | None:
    """Starts per second between the first and the last start: (n − 1) ÷ span.

    n − 1, not n: n starts enclose n − 1 gaps, so n evenly spaced starts at
    rate r give exactly r. None for fewer than 2 starts or no span."""
    if len(starts) < 2:
        return None
    span = max(starts) - min(starts)
    return (len(starts) - 1) / span if span > 0 else None


def gate_starts(by_task: Mapping[str, Sequence[Execution]], gated: Iterable[str]) -> list[float]:
    """Every execution start of the gated tasks: each took a token (a trigger
    takes one per dispatch), so a re-execution counts as a start too."""
    return sorted(ex.start for task_id in gated for ex in by_task.get(task_id, ()))


def gate_section(rate: float, burst: int, gated: Sequence[str], by_task: Mapping[str, Sequence[Execution]]) -> dict[str, Any]:
    """The report's ``flow.gate``: achieved start rate and the busiest 1 s and 10 s windows against the gate.

    Starts are the handlers' START times, a little after the trigger took the
    token (dispatch, claim): uneven delays can bunch starts whose tokens were
    evenly spaced, so a window a task or two over ``rate × w + burst`` is
    jitter, not a gate that gave out too many tokens. A ratio well over 1 is."""
    starts = gate_starts(by_task, gated)
    started = sum(1 for t in gated if by_task.get(t))
    achieved = start_rate(starts)
    windows = []
    for w in WINDOWS_S:
        most, at = busiest_window(starts, w)
        bound = rate * w + burst
        windows.append({
            "seconds": w, "max_starts": most, "bound": round(bound, 3), "at": at,
            "ratio": round(most / bound, 3), "within": most <= bound,
        })  # fmt: skip
    return {
        "rate": rate,
        "burst": burst,
        "tasks": len(gated),
        "tasks_started": started,
        "starts": len(starts),
        "span_s": round(starts[-1] - starts[0], 3) if starts else None,
        "achieved_per_s": round(achieved, 2) if achieved is not None else None,
        "achieved_over_rate": round(achieved / rate, 3) if achieved is not None else None,
        "windows": windows,
        "held": all(w["within"] for w in windows),
    }


def flow_section(
    plan: FlowPlan,
    by_task: Mapping[str, Sequence[Execution]],
    key_of: Mapping[str, str],
    gated: Sequence[str],
    setup: Mapping[str, Any],
) -> dict[str, Any]:
    """The report's ``flow`` section: the limit (when set) and the gate (when set).

    ``key_of``: task id → concurrency key of every accepted task that has
    one; ``gated``: the ids of the accepted tasks that name the gate;
    ``setup``: what setting up and removing them answered (the runner's)."""
    out: dict[str, Any] = {"setup": dict(setup)}
    if plan.limit_per_key is not None:
        per_key = max_concurrency_per_key(by_task, key_of)
        out["limit"] = limit_section(plan.limit_per_key, per_key)  # each key's own figure: groups.max_concurrency.per_key
    if plan.gate_rate is not None:
        out["gate"] = {"name": plan.gate_name, **gate_section(plan.gate_rate, plan.gate_burst, gated, by_task)}
    return out


def flow_lines(f: dict[str, Any]) -> list[str]:
    """The ``flow`` section for the terminal."""
    lines = []
    lim = f.get("limit")
    if lim:
        over = lim["keys_over_limit"]
        lines.append(
            f"limit         at most {lim['max_running']} per key ({lim['scope']} {lim['name']}): most at once "
            f"{lim['max_over_keys']} ({lim['key']}) over {lim['keys_seen']} keys; "
            + (f"OVER on {over}" if over else "held") + ("" if lim["used"] else " (never reached: says nothing)")
        )
    gate = f.get("gate")
    if gate:
        windows = "  ".join(
            f"{w['seconds']:g} s: {w['max_starts']} of ≤ {w['bound']:g} ({w['ratio']:g})" for w in gate["windows"]
        )
        lines.append(
            f"gate          {gate['name']} {gate['rate']:g}/s burst {gate['burst']}: {gate['tasks_started']}/{gate['tasks']} "
            f"started, {gate['starts']} starts at {gate['achieved_per_s']}/s ({gate['achieved_over_rate']} of the rate); "
            f"busiest {windows}"
        )
    problems = f.get("setup", {}).get("errors")
    if problems:
        lines.append(f"flow setup    {problems}")
    return lines
