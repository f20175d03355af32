"""Who may read payloads (issue 16): a client (its own namespace) and an admin;
an operator runs tasks without reading their data."""

from __future__ import annotations


import pytest

from leasesched.auth import Principal, current_principal, require_payload_access
from leasesched.errors import PermissionDenied
from leasesched.v1 import scheduler_pb2 as pb
from services.schedule_service import _payload_for_caller


def _as(role: str) -> object:
    return current_principal.set(Principal(token_id="t", namespace="ns", role=role))


@pytest.mark.parametrize("role", ["client", "admin"])
def test_clients_and_admins_may_read_payloads(role: str) -> None:
    token = _as(role)
    try:
        require_payload_access("include_payload")
        described = _payload_for_caller(pb.ScheduleDescription(schedule=pb.Schedule(action=pb.TaskSpec(payload=b"secret"))))
        assert described.schedule.action.payload == b"secret"
    finally:
        current_principal.reset(token)  # type: ignore[arg-type]


def test_an_operator_may_not() -> None:
    token = _as("operator")
    try:
        with pytest.raises(PermissionDenied, match="include_payload"):
            require_payload_access("include_payload")
        described = _payload_for_caller(pb.ScheduleDescription(schedule=pb.Schedule(action=pb.TaskSpec(payload=b"secret", type="t"))))
        assert described.schedule.action.payload == b"" and described.schedule.action.type == "t"
    finally:
        current_principal.reset(token)  # type: ignore[arg-type]


def test_auth_off_reads_payloads() -> None:
    require_payload_access("include_payload")  # no principal: local development
