"""A token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

Used for the per-namespace quotas (``services/rate_limit.py``) and the
trigger's catch-up pace for periodic schedules (``trigger/schedule_firer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 when ``cost`` tokens were taken, else the seconds until they are available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def take_up_to(self, now: float, count: int) -> int:
        """Up to ``count`` tokens of 1, as many as there are: how many were taken
        (a ScheduleTasks call is charged one per task, so a partly full bucket
        admits the first tasks, not none of them)."""
        self.take(now, 0.0)  # brings the bucket up to ``now``
        taken = max(0, min(count, int(self.tokens)))
        self.tokens -= taken
        return taken
