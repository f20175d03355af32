"""Self-fencing: when may this worker still believe it holds a lease?

The server's lease expires ``lease`` after it *processed* our claim or
heartbeat, which is after we *sent* it. So, measured on our own monotonic
clock from the send time of the last acknowledged request, the lease is
certainly still ours until ``sent + lease``. We stop believing earlier, by a
safety margin that covers stopping the handler, so a worker that was paused,
partitioned or slow stops its execution before anybody else may start it
(the trigger re-queues only after expiry plus a grace period).

The clock is read and renewed from several threads (the heartbeat thread
renews it, the watchdog thread and the event loop read it), so every access
holds a lock. Wall clocks are never used: they jump; the monotonic clock does
not.
"""

from __future__ import annotations

import threading
import time


def safety_margin(lease_s: float) -> float:
    """A quarter of the lease, at least 0.5 s: room to stop cooperatively, then by force."""
    return max(0.5, lease_s * 0.25)


class LeaseClock:
    """Until when (monotonic) this worker may believe it holds one lease."""

    def __init__(self, lease_s: float, deadline: float) -> None:
        self.lease_s = lease_s
        self._deadline = deadline
        self._revoked = False
        self._lock = threading.Lock()

    @classmethod
    def from_claim(cls, lease_s: float, sent_at: float) -> "LeaseClock":
        return cls(lease_s, sent_at + lease_s - safety_margin(lease_s))

    @property
    def deadline(self) -> float:
        """Monotonic time after which we no longer claim to hold the lease."""
        with self._lock:
            return self._deadline

    @property
    def proven_at(self) -> float:
        """Monotonic send time of the last acknowledged claim or heartbeat: what the deadline counts from."""
        return self.deadline - self.lease_s + safety_margin(self.lease_s)

    @property
    def margin(self) -> float:
        return safety_margin(self.lease_s)

    def renewed(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (monotonic) was acknowledged.

        Ignored once revoked: an execution that gave its lease up (or was told
        it is gone) never starts believing in it again."""
        with self._lock:
            if not self._revoked:
                self._deadline = max(self._deadline, sent_at + self.lease_s - safety_margin(self.lease_s))

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)

    def valid(self, now: float | None = None) -> bool:
        return self.remaining(now) > 0

    def revoke(self) -> None:
        """The server said the lease is gone (or we gave up on it): stop believing at once, for good."""
        with self._lock:
            self._revoked = True
            self._deadline = min(self._deadline, time.monotonic())

    @property
    def revoked(self) -> bool:
        with self._lock:
            return self._revoked

    @property
    def stop_grace(self) -> float:
        """How long a cooperative stop may take before force (cancel, kill) is used."""
        return safety_margin(self.lease_s) / 2


class ClaimBudget:
    """How long a ClaimTask may take and still be useful.

    A claim sent at ``t`` proves the lease only until ``t + lease - margin``;
    an answer arriving later is useless (the execution gives the claim back at
    once, see ``Execution``). The lease is only known from the answer, so the
    client deadline uses the lease last seen for the task type (leases are set
    per task, and usually alike per type), or the configured default lease,
    and never exceeds the trigger's claim timeout (after which the task is
    dispatched again anyway). With 3 s leases: 2.25 s; with the default 30 s
    lease and 5 s claim timeout: 5 s. Owned by one worker; touched only on its
    event loop.
    """

    def __init__(self, default_lease_s: float, claim_timeout_s: float) -> None:
        self._default_lease_s = default_lease_s
        self._claim_timeout_s = claim_timeout_s
        self._lease_by_type: dict[str, float] = {}

    def timeout(self, task_type: str) -> float:
        lease = self._lease_by_type.get(task_type, self._default_lease_s)
        return max(0.1, min(self._claim_timeout_s, lease - safety_margin(lease)))

    def seen(self, task_type: str, lease_s: float) -> None:
        if len(self._lease_by_type) < 10_000 or task_type in self._lease_by_type:
            self._lease_by_type[task_type] = lease_s
