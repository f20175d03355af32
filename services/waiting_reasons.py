"""Why a SCHEDULED task is not running yet: PollTask's ``TaskView.waiting_reason``.

A task can be held by its gate (paused, closed, deleted: the gate's own words,
``services/gate_service.waiting_reason``) and, once it is due, by a full
concurrency limit: "concurrency limit ns/key=partner-7 is full (5 of 5
running)", also a gate's ``max_in_flight``. Both are said, joined with "; ".
A due task held by neither waits for a worker slot (the trigger's queue:
higher and aged priorities first, then the groups' turns, docs/design.md):
it says so, with how long it has been due (``WORKER_REASON``); a task not
due yet, or waiting only for its gate's rate, has no reason.

What it costs a poll: nothing for a task that is not SCHEDULED; for a gated
one the gate row, read at most once a second (``GateBook``); for a due one
the limits table (``LimitTable``, read at most every 2 s by the process) and
the slots of each limited group it belongs to, at most once a second per
group (``SlotUse``). A task without limits costs a dictionary lookup.

The limit part is explanation only: when the limits or the slots cannot be
read, the poll answers without it (the task's own state is what the caller
asked for) instead of failing.
"""

from __future__ import annotations

import logging

from leasesched.admission import LimitTable
from leasesched.concurrency import LimitScope, SlotGroup, groups_for
from leasesched.errors import Unavailable
from leasesched.model import Task
from leasesched.states import TaskStatus
from services.gate_service import REASON_CACHE_S, GateBook, waiting_reason
from services.slot_use import SlotUse

log = logging.getLogger(__name__)

# A due task held by no gate and no full limit: it is in a trigger's queue (or
# being claimed). The trigger's queue is not visible from here, so the reason
# says what decides the order rather than a position.
WORKER_REASON = "due {due_s:.1f} s ago: waiting for a free worker slot (higher and aged priorities first, then each group's turn)"


def limit_reason(group: SlotGroup, taken: int) -> str:
    """The reason a full group gives ("" when it has room)."""
    if taken < group.max_running:
        return ""
    return f"concurrency limit {group.label()} is full ({taken} of {group.max_running} running)"


class WaitingReasons:
    """One per TaskService: its GateBook, its LimitTable and its SlotUse."""

    def __init__(self, gates: GateBook, limits: LimitTable, slots: SlotUse) -> None:
        self._gates = gates
        self._limits = limits
        self._slots = slots

    async def of(self, task: Task, now: int) -> str:
        """Why ``task`` waits at ``now`` ("" = no reason known). Raises
        Unavailable only when its gate cannot be read (as PollTask did before
        limits had reasons)."""
        if task.status != TaskStatus.SCHEDULED:
            return ""
        reasons: list[str] = []
        cap = SlotGroup(task.namespace, LimitScope.GATE, task.gate, 0)
        if task.gate:
            gate = await self._gates.get(task.namespace, task.gate, max_age_s=REASON_CACHE_S)
            reasons.append(waiting_reason(gate, task.gate, now))
            if gate is not None:
                cap = SlotGroup(task.namespace, LimitScope.GATE, task.gate, gate.max_in_flight)
        if task.run_at > now:
            return "; ".join(r for r in reasons if r)  # a task not due yet waits for its time, not for a slot
        reasons += await self._full_limits(task, cap)
        said = "; ".join(r for r in reasons if r)
        return said or WORKER_REASON.format(due_s=(now - task.run_at) / 1000)

    async def _full_limits(self, task: Task, gate_cap: SlotGroup) -> list[str]:
        """The full groups of ``task``, outermost first (the order a claim takes
        them), its gate's ``max_in_flight`` last (``gate_cap``; 0 = none)."""
        found: list[str] = []
        try:
            groups = groups_for(task.namespace, task.type, task.concurrency_key, await self._limits.current())
            for group in groups + ([gate_cap] if gate_cap.max_running else []):
                reason = limit_reason(group, await self._slots.taken(group))
                if reason:
                    found.append(reason)
        except Unavailable as exc:
            log.debug("task %s: its concurrency limits are not explained (%s)", task.task_id, exc)
        return found
