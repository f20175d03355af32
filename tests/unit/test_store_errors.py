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
