"""``leasesched limit ...`` and the client's limit methods against the real
LimitService (over the in-memory store) served over real gRPC in this
process, with the product's error mapping: the requests they build, what
they print, and how bad input is refused (the field named)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from leasesched.cli import limit_cmd
from leasesched.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    LimitScope,
    NotFoundError,
)
from leasesched.config import Config
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.limit_service import LimitService
from tests.unit.served import served


@pytest.fixture
def target() -> Iterator[str]:
    """LimitService over the in-memory store, served in this process; its address."""
    with served(pb_grpc.add_LimitServiceServicer_to_server, LimitService(MemoryStore()), "leasesched.v1.LimitService") as address:
        yield address


def test_the_client_manages_limits(target: str) -> None:
    with Client(target, config=Config(), namespace="billing") as client:
        made = client.set_limit(LimitScope.KEY, "*", 2)
        assert (made.namespace, made.scope, made.name, made.max_running, made.version, made.running) == ("billing", LimitScope.KEY, "*", 2, 1, 0)
        assert made.created_at is not None and made.created_at == made.updated_at
        again = client.set_limit(LimitScope.KEY, "*", 3)  # create_or_update: a change, not ALREADY_EXISTS
        assert again.max_running == 3 and again.version == 2 and again.created_at == made.created_at
        with pytest.raises(AlreadyExistsError):
            client.set_limit(LimitScope.KEY, "*", 3, create_or_update=False)
        with pytest.raises(FailedPreconditionError, match="version"):
            client.set_limit(LimitScope.KEY, "*", 4, expected_version=1)
        client.set_limit(LimitScope.NAMESPACE, "", 10)
        client.set_limit(LimitScope.TYPE, "export", 1, namespace="other")
        assert client.get_limit(LimitScope.NAMESPACE).max_running == 10
        assert [i.label() for i in client.list_limits(page_size=1)] == ["billing/key=*", "billing"]
        assert [i.label() for i in client.list_limits(every_namespace=True)] == ["billing/key=*", "billing", "other/type=export"]
        with pytest.raises(InvalidArgumentError, match="max_running"):
            client.set_limit(LimitScope.TYPE, "t", 0)
        with pytest.raises(InvalidArgumentError, match="limit.name"):
            client.set_limit(LimitScope.KEY, "bad key", 1)
        client.delete_limit(LimitScope.KEY, "*")
        with pytest.raises(NotFoundError):
            client.get_limit(LimitScope.KEY, "*")
        with pytest.raises(NotFoundError):
            client.delete_limit(LimitScope.KEY, "*")


def invoke(target: str, *args: str) -> Result:
    return CliRunner().invoke(limit_cmd.limit, ["--target", target, *args], obj=Config())


def test_the_cli_manages_limits(target: str) -> None:
    made = invoke(target, "set", "billing", "--default-key", "2")
    assert made.exit_code == 0, made.output
    assert made.output.strip() == "billing/key=*: at most 2 running; version 1"
    assert invoke(target, "set", "billing", "5").output.strip() == "billing: at most 5 running; version 1"
    assert invoke(target, "set", "billing", "--type", "export", "1").exit_code == 0
    changed = invoke(target, "set", "billing", "--key", "p7", "4")
    assert changed.output.strip() == "billing/key=p7: at most 4 running; version 1"
    assert invoke(target, "set", "billing", "--key", "p7", "6").output.strip() == "billing/key=p7: at most 6 running; version 2"
    stale = invoke(target, "set", "billing", "--key", "p7", "7", "--expected-version", "1")
    assert stale.exit_code == 1 and "FAILED_PRECONDITION" in stale.output
    shown = invoke(target, "get", "billing", "--type", "export", "--json")
    assert json.loads(shown.output)["limit"]["max_running"] == 1
    listed = invoke(target, "list", "billing").output.splitlines()
    assert listed[0].split() == ["NAMESPACE", "SCOPE", "NAME", "MAX", "RUNNING", "VERSION"]
    assert [line.split()[1:4] for line in listed[1:]] == [["key", "*", "2"], ["key", "p7", "6"], ["namespace", "-", "5"], ["type", "export", "1"]]
    assert len(invoke(target, "list").output.splitlines()) == 5  # every namespace
    assert invoke(target, "delete", "billing", "--key", "p7").output.strip() == "deleted billing/key=p7"
    missing = invoke(target, "get", "billing", "--key", "p7")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


def test_the_cli_refuses_bad_input(target: str) -> None:
    too_many = invoke(target, "set", "billing", "1001")
    assert too_many.exit_code == 2 and "MAX_RUNNING" in too_many.output
    both = invoke(target, "set", "billing", "--type", "t", "--default-key", "1")
    assert both.exit_code == 2 and "at most one of" in both.output
    bad_type = invoke(target, "set", "billing", "--type", "9t", "1")
    assert bad_type.exit_code == 1 and "INVALID_ARGUMENT" in bad_type.output and "limit.name" in bad_type.output
