"""Answers to PollTask for tasks that have finished.

A task in a final state (SUCCEEDED, FAILED, CANCELLED) changes again only
by an operator's retry (OperatorService.RetryTask: the one transition out of
a final state, ``leasesched.states``); nothing automatic moves it. So its
answer can be kept and served without a store read. An answer is kept at
most ``ttl_s`` (FINISHED_TTL_S): a task retried through *another* TaskService
process is seen here within that time; one retried through this process is
forgotten at once (``forget``, called by the OperatorService beside it).
Tasks still SCHEDULED or RUNNING are never cached: their answers always come
from the store, so progress and state stay current.

Bounded by bytes (results can be up to 1 MiB), least recently used out first.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

from cachetools import TTLCache

from leasesched.v1 import scheduler_pb2 as pb


# How long a final answer is served from memory: a client polling a finished
# task still costs one store read per 10 s at most, and an operator's retry
# through another process is visible here within it.
FINISHED_TTL_S = 10.0


class FinishedTasks:
    def __init__(self, max_bytes: int, ttl_s: float = FINISHED_TTL_S, timer: Callable[[], float] = time.monotonic) -> None:
        self._views: TTLCache[uuid.UUID, pb.TaskView] = TTLCache(
            maxsize=max(1, max_bytes), ttl=ttl_s, timer=timer, getsizeof=_size
        )
        self._enabled = max_bytes > 0

    def get(self, task_id: uuid.UUID) -> pb.TaskView | None:
        return self._views.get(task_id) if self._enabled else None

    def remember(self, task_id: uuid.UUID, view: pb.TaskView, final: bool) -> None:
        if self._enabled and final and _size(view) <= self._views.maxsize:
            self._views[task_id] = view

    def forget(self, task_id: uuid.UUID) -> None:
        """The task changed (an operator's retry): its kept answer is stale."""
        self._views.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._views)


def _size(view: pb.TaskView) -> int:
    return view.ByteSize() + 200  # the message object and the key
