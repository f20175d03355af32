"""This test session's leasesched processes: where their PID files go, and the
clean-up after a session that was killed.

The harness itself (``RunningProcess``, ``ProcessGroup``, ``wait_serving``,
``free_port``, ``Cluster``) is ``leasesched.testing``, shared with the load
test and ``leasesched local up``. What is particular to the tests: every
process a test starts has its PID file in one folder per test session,
``<repo>/.leasesched/test-procs-<pid>``, so processes left behind by a
session that was killed with SIGKILL are found and stopped by the next one
(``stop_stale``, called by tests/integration/conftest.py at session start);
and processes run from the repository, where ``tests.chaos_handlers`` is
importable.

Typical use (tests/integration/conftest.py wraps this in fixtures)::

    group = SessionGroup(log_dir=tmp)
    try:
        proc = group.start_serving("task-service", cfg)
        ... grpc.insecure_channel(proc.target) ...
    finally:
        group.stop_all()
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from leasesched import testing
from leasesched.testing import ProcessGroup
from tests.conftest import REPO, STATE_DIR

# Not the infra fixture's ``test-<pid>`` folder: that one is deleted when
# found stale, and the PID files must outlive it so the processes can be stopped.
SESSION_PREFIX = "test-procs-"

_groups = itertools.count(1)


def session_dir() -> Path:
    """PID files and logs of the processes this test session starts."""
    return testing.session_dir(STATE_DIR, SESSION_PREFIX)


def stop_stale(keep_logs: bool = False) -> list[str]:
    """Stop processes left by test sessions that died without cleanup; delete their folders."""
    return testing.stop_stale(STATE_DIR, SESSION_PREFIX, keep_logs)


def remove_session_dir() -> None:
    shutil.rmtree(session_dir(), ignore_errors=True)


class SessionGroup(ProcessGroup):
    """A ``ProcessGroup`` of this test session: PID files in a folder of its own
    in the session folder, processes running from the repository."""

    def __init__(self, log_dir: Path | None = None) -> None:
        super().__init__(session_dir() / "groups" / str(next(_groups)), log_dir, cwd=REPO)
