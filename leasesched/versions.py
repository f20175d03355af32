"""A task's version: what an operator's action is conditional on.

Decision (docs/design.md, "Task versions"). The version is *derived* from the
columns that every change of a task's state writes, not a column of its own:

    status, attempt, lease_token, run_at, cancel_requested, finished_at

Why not ``write_id``: every conditional write of a task row draws a new write
id, heartbeats and progress reports included (a third of a lease). A version
that changed with each heartbeat would make TerminateTask on a running task
a race an operator loses every few seconds. A heartbeat writes only
``lease_expires_at`` and the progress, none of the columns above, so the
version of a running task stays put until something really changes it.

Why these columns: every transition writes at least one of them with a value
the task never had in that combination (claims raise ``lease_token``; a retry
or a lease expiry raises ``attempt`` or changes ``status``; a release or a
rate-limited wait change ``status`` and ``run_at``; a cancel request sets
``cancel_requested``; a resume moves ``run_at`` from the future to now; an
ending writes ``status`` and ``finished_at``). The one transition that
resets a column (the operator retry resets ``attempt`` to 1) also raises
``lease_token``, so the tuple never returns to an earlier value: no ABA.

Why not a new counter column: it would need a migration and a write in every
transition, including the trigger's and the worker's hot paths, for the same
guarantee. The condition of an operator's write names these columns
directly (``Expect.version``), so the check and the write are one Paxos
round: a change landing between the operator's read and the write makes it
fail, with nothing written.

The text form is an opaque 16-hex-digit hash: clients compare it, never
parse it (the columns behind it may change).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from leasesched.model import Task
from leasesched.states import TaskStatus


@dataclass(frozen=True)
class TaskVersion:
    """The state columns a version stands for (see the module docstring)."""

    status: TaskStatus
    attempt: int
    lease_token: int
    run_at: int
    cancel_requested: bool
    finished_at: int | None

    @classmethod
    def of(cls, task: Task) -> TaskVersion:
        return cls(
            status=task.status,
            attempt=task.attempt,
            lease_token=task.lease_token,
            run_at=task.run_at,
            cancel_requested=task.cancel_requested,
            finished_at=task.finished_at,
        )

    @property
    def text(self) -> str:
        fields = (
            f"{self.status.value}|{self.attempt}|{self.lease_token}|{self.run_at}|"
            f"{int(self.cancel_requested)}|{'' if self.finished_at is None else self.finished_at}"
        )
        return hashlib.blake2b(fields.encode(), digest_size=8).hexdigest()

    def holds_for(self, task: Task) -> bool:
        """Whether ``task`` is still at this version."""
        return TaskVersion.of(task) == self


def version_of(task: Task) -> str:
    """The version text of ``task`` (TaskView.version)."""
    return TaskVersion.of(task).text
