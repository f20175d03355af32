"""Answers to PollTask for tasks that have finished.

A task in a final state (SUCCEEDED, FAILED, CANCELLED) never changes again:
no transition leaves a final state (``leasesched.states``), and rows are
never rewritten after it. So its answer can be kept and served without a
store read, and it is exactly what a read would return. Tasks still
SCHEDULED or RUNNING are never cached: their answers always come from the
store, so progress and state stay current.

Bounded by bytes (results can be up to 1 MiB), least recently used out first.
"""

from __future__ import annotations

import uuid

from cachetools import LRUCache

from leasesched.v1 import scheduler_pb2 as pb


class FinishedTasks:
    def __init__(self, max_bytes: int) -> None:
        self._views: LRUCache[uuid.UUID, pb.TaskView] = LRUCache(maxsize=max(1, max_bytes), getsizeof=_size)
        self._enabled = max_bytes > 0

    def get(self, task_id: uuid.UUID) -> pb.TaskView | None:
        return self._views.get(task_id) if self._enabled else None

    def remember(self, task_id: uuid.UUID, view: pb.TaskView, final: bool) -> None:
        if self._enabled and final and _size(view) <= self._views.maxsize:
            self._views[task_id] = view

    def __len__(self) -> int:
        return len(self._views)


def _size(view: pb.TaskView) -> int:
    return view.ByteSize() + 200  # the message object and the key
