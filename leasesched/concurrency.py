"""Concurrency limits: how many tasks of a group may run at once (issue 15, docs/concurrency.md).

A limit caps the RUNNING tasks of one *group* at ``max_running``. Groups are
per namespace (every task of it), per task type, and per ``concurrency_key``
— a default for every key (``name == DEFAULT_KEY``) plus overrides for single
keys. A task starts only when every level that has a limit admits it; a task
over a limit stays SCHEDULED without using an attempt.

How a limit holds across every trigger and TaskUpdater: each group has
``max_running`` numbered *slots*, rows of one partition in the store. A claim
takes a free slot of every level with a conditional write before it claims
the task, and *confirms* it after the claim landed; the task gives it back
when its attempt ends. Why both steps: a slot and a task are two partitions,
and a Cassandra conditional write covers one. A slot whose claim is still in
flight (taken, not confirmed) may be taken over only after ``SLOT_CLAIM_MS``;
if that happens the confirm fails and the claim is given back before any
handler runs, so two runners never hold one slot. A confirmed slot is free
again once its task is no longer RUNNING under the slot's lease token (the
same fencing that keeps one runner per task: the lease expired and the task
was re-queued, or the attempt ended), so a slot whose release was lost (a
TaskUpdater crashed) is found free by the next claim that needs it.

Everything here is plain data and arithmetic; the store keeps the rows and
``leasesched.lifecycle`` takes and gives back the slots.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping

# A slot taken for a claim that never confirmed it is held at most this long
# (the claim failed, or its TaskUpdater died in between): longer than any claim
# takes (its store calls give up after 2 x 5 s + 1 s each), short enough that
# a lost one costs the group a slot only briefly.
SLOT_CLAIM_MS = 30_000
MAX_RUNNING = 1_000  # the slots of a group are one partition: read whole at a claim
DEFAULT_KEY = "*"  # the name of the limit every concurrency key gets unless overridden
# How a refused claim's RESOURCE_EXHAUSTED details begin: the worker tells a
# full limit (the trigger holds the task back) from a shed call (retried).
LIMIT_REACHED = "concurrency limit "


class LimitScope(enum.Enum):
    NAMESPACE = "namespace"  # name is ""
    TYPE = "type"  # name is the task type
    KEY = "key"  # name is a concurrency_key, or DEFAULT_KEY for every key
    # A gate's max_in_flight (name is the gate): slots like a limit's, but set
    # on the gate (GateDefinition.max_in_flight), never a ConcurrencyLimit.
    GATE = "gate"


@dataclass(frozen=True)
class ConcurrencyLimit:
    """One limit as the store keeps it. Times in ms since the epoch."""

    namespace: str
    scope: LimitScope
    name: str
    max_running: int
    version: int = 1
    created_at: int = 0
    updated_at: int = 0


LimitKey = tuple[str, LimitScope, str]  # (namespace, scope, name) of a ConcurrencyLimit


def group_label(key: LimitKey) -> str:
    """How logs, errors and metrics name a limit or group: 'ns', 'ns/type=export', 'ns/key=partner-7'."""
    namespace, scope, name = key
    return namespace if scope == LimitScope.NAMESPACE else f"{namespace}/{scope.value}={name}"


def limit_key(limit: ConcurrencyLimit) -> LimitKey:
    return (limit.namespace, limit.scope, limit.name)


@dataclass(frozen=True)
class SlotGroup:
    """The slots one task must hold a slot of: a group and its limit.

    ``name`` is the task's own key for a key limit, also when the limit is the
    default: every key has its own slots."""

    namespace: str
    scope: LimitScope
    name: str
    max_running: int

    def label(self) -> str:
        return group_label((self.namespace, self.scope, self.name))


@dataclass(frozen=True)
class SlotHolder:
    """A taken slot: which task holds it, for which claim (the lease token
    the claim sets), since when, and whether the claim landed."""

    index: int
    task_id: uuid.UUID
    lease_token: int
    taken_at: int
    confirmed: bool


def groups_for(
    namespace: str, type_: str, concurrency_key: str, table: Mapping[LimitKey, ConcurrencyLimit]
) -> list[SlotGroup]:
    """The levels a task must be admitted by, outermost first (the order slots
    are taken in, so two claims never wait on each other's slots in a cycle)."""
    found: list[SlotGroup] = []
    ns = table.get((namespace, LimitScope.NAMESPACE, ""))
    if ns is not None:
        found.append(SlotGroup(namespace, LimitScope.NAMESPACE, "", ns.max_running))
    by_type = table.get((namespace, LimitScope.TYPE, type_))
    if by_type is not None:
        found.append(SlotGroup(namespace, LimitScope.TYPE, type_, by_type.max_running))
    if concurrency_key:
        by_key = table.get((namespace, LimitScope.KEY, concurrency_key)) or table.get((namespace, LimitScope.KEY, DEFAULT_KEY))
        if by_key is not None:
            found.append(SlotGroup(namespace, LimitScope.KEY, concurrency_key, by_key.max_running))
    return found


def index_limits(limits: Iterable[ConcurrencyLimit]) -> dict[LimitKey, ConcurrencyLimit]:
    return {limit_key(limit): limit for limit in limits}


def holder_is_free(holder: SlotHolder, task_status_running: bool | None, task_token: int | None, now: int) -> bool:
    """Whether a taken slot may be taken over.

    ``task_status_running``/``task_token``: the holder task as read now
    (None: the task is gone). Confirmed: free once the task is not RUNNING
    under the slot's token (its token only grows, and a lease ends only after
    its runner stopped). Not confirmed: the claim may still land, so only
    after ``SLOT_CLAIM_MS``; taking it then makes the late confirm fail.
    """
    if not holder.confirmed:
        return now - holder.taken_at >= SLOT_CLAIM_MS
    if task_token is None:
        return True
    return not (task_status_running and task_token == holder.lease_token)
