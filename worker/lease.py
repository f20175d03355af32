"""Self-fencing: when may this worker still believe it holds a lease?

The server's lease expires ``lease`` after it *processed* our claim or
heartbeat, which is after we *sent* it. So, measured on our own monotonic
clock from the send time of the last acknowledged request, the lease is
certainly still ours until ``sent + lease``. We stop believing earlier, by a
safety margin that covers stopping the handler, so a worker that was paused,
partitioned or slow stops its execution before anybody else may start it
(the trigger re-queues only after expiry plus a grace period).

Wall clocks are never used: they jump; the monotonic clock does not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def safety_margin(lease_s: float) -> float:
    """A quarter of the lease, at least 0.5 s: room to stop cooperatively, then by force."""
    return max(0.5, lease_s * 0.25)


@dataclass
class LeaseClock:
    lease_s: float
    deadline: float  # monotonic time after which we no longer claim to hold the lease

    @classmethod
    def from_claim(cls, lease_s: float, sent_at: float) -> "LeaseClock":
        return cls(lease_s, sent_at + lease_s - safety_margin(lease_s))

    def renewed(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (monotonic) was acknowledged."""
        self.deadline = max(self.deadline, sent_at + self.lease_s - safety_margin(self.lease_s))

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)

    def valid(self, now: float | None = None) -> bool:
        return self.remaining(now) > 0

    def revoke(self) -> None:
        """The server said the lease is gone: stop believing at once."""
        self.deadline = min(self.deadline, time.monotonic())

    @property
    def stop_grace(self) -> float:
        """How long a cooperative stop may take before the slot is abandoned."""
        return safety_margin(self.lease_s) / 2
