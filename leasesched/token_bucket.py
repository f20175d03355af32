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
