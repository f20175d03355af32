"""Which driver errors the Cassandra store turns into "store unavailable"
(answered UNAVAILABLE, retried by clients) and which stay bugs (INTERNAL).

A node that is shutting down answers "overloaded" as a protocol message the
driver raises as is (not as one of its exceptions): found by the replicated
chaos test (2 of 3 nodes stopped), where it reached clients as INTERNAL.
"""

from __future__ import annotations

from cassandra import OperationTimedOut, Unavailable
from cassandra.protocol import (
    InvalidRequestException,
    IsBootstrappingErrorMessage,
    OverloadedErrorMessage,
    ServerError,
    SyntaxException,
)

from leasesched.store.cassandra import _UNAVAILABLE_ERRORS


def test_a_node_going_away_is_unavailable() -> None:
    for error in (
        OverloadedErrorMessage(1001, "Server is shutting down", None),
        IsBootstrappingErrorMessage(1026, "bootstrapping", None),
        ServerError(0, "coordinator failure", None),
        Unavailable("2 of 3 replicas down"),
        OperationTimedOut("no answer"),
    ):
        assert isinstance(error, _UNAVAILABLE_ERRORS), type(error)


def test_a_bad_statement_stays_a_bug() -> None:
    for error in (SyntaxException(0x2000, "line 1", None), InvalidRequestException(0x2200, "unknown column", None)):
        assert not isinstance(error, _UNAVAILABLE_ERRORS), type(error)


def test_a_statement_cassandra_refused_is_a_bug_as_the_caller_sees_it() -> None:
    """What the driver hands a callback for Cassandra's "invalid statement"
    answer is its own exception (``to_exception()``: InvalidRequest, a
    DriverException): seen as UNAVAILABLE ("Batch too large") until the
    store turned it into StatementRefused."""
    from leasesched.store.base import StatementRefused
    from leasesched.store.cassandra import driver_error

    raised = InvalidRequestException(0x2200, "Batch too large", None).to_exception()
    assert isinstance(raised, _UNAVAILABLE_ERRORS)  # why the conversion is needed
    seen = driver_error(raised)
    assert isinstance(seen, StatementRefused) and not isinstance(seen, _UNAVAILABLE_ERRORS), type(seen)
    assert "Batch too large" in str(seen)
    for outage in (OperationTimedOut("no answer"), Unavailable("2 of 3 replicas down")):
        assert driver_error(outage) is outage


def test_an_unknown_outcome_found_not_applied_while_the_condition_still_holds_is_unavailable() -> None:
    """The replicated 2-of-3 scenario once: a completion's write met an overloaded
    coordinator, the serial read-back found it not applied and the task still
    RUNNING under the worker's token. That is a write that failed on its way,
    not a lost lease: answered as a conflict, the worker dropped its result and
    the trigger its lease check, and the task stayed RUNNING for good."""
    import asyncio
    import uuid
    from typing import Any

    import pytest

    from leasesched.changes import TaskChange
    from leasesched.config import Config
    from leasesched.model import Task
    from leasesched.states import TaskStatus
    from leasesched.store import cassandra as store_mod
    from leasesched.store.base import Expect, StoreUnavailable

    task_id = uuid.uuid4()
    running = Task(task_id=task_id, namespace="ns", type="t", payload=b"", shard=0, status=TaskStatus.RUNNING, lease_token=1)

    async def main(current: Task) -> Any:
        store = store_mod.CassandraStore(Config())

        async def no_session() -> None:
            return None

        async def unknown(*args: Any, **kwargs: Any) -> Any:
            return store_mod._NOT_APPLIED_UNKNOWN

        async def read(task_id: uuid.UUID, serial: bool = False) -> Task:
            assert serial
            return current

        store._ensure_session = no_session  # type: ignore[method-assign]
        store._run_cas = unknown  # type: ignore[method-assign]
        store.get_task = read  # type: ignore[method-assign]
        store._update_stmt = lambda columns, conditions: None  # type: ignore[method-assign,assignment,return-value]
        change = TaskChange.complete(TaskStatus.RUNNING, b"ok", 1)
        return await store.update_task(task_id, Expect(TaskStatus.RUNNING, lease_token=1), change)

    with pytest.raises(StoreUnavailable):
        asyncio.run(main(running))
    # Someone did move it (a newer token): that stays a plain "not applied".
    moved = asyncio.run(main(running.replace(lease_token=2)))
    assert not moved.applied and moved.current_lease_token == 2


def test_a_driver_answer_that_never_comes_is_a_timeout() -> None:
    """A scanner awaiting a read whose driver callback never fires would stop
    handling its shard for good (the replicated SIGSTOP scenario, suspected):
    past twice the request timeout the store answers "unavailable" itself."""
    import asyncio
    import time
    from typing import Any

    import pytest

    from leasesched.config import Config
    from leasesched.store import cassandra as store_mod
    from leasesched.store.base import StoreUnavailable

    class Silent:
        """A driver future whose callbacks are registered and never called."""

        def add_callbacks(self, ok: Any, err: Any) -> None:
            pass

    class Session:
        def execute_async(self, *args: Any, **kwargs: Any) -> Silent:
            return Silent()

    async def main() -> float:
        store = store_mod.CassandraStore(Config(cassandra_request_timeout_s=0.1))
        store._session = Session()  # type: ignore[assignment]
        store._stmts["read_due"] = "SELECT"  # type: ignore[assignment]
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer from the driver"):
            await asyncio.wait_for(store.read_due(0, 0, 1000, 10), 10)  # not for ever, without the guard
        return time.monotonic() - started

    assert asyncio.run(main()) < 5
