"""``leasesched gate ...`` and the client's gate methods against the real
GateService (over the in-memory store) served over real gRPC in this
process, with the product's error mapping: the requests they build, what
they print, and how bad input is refused (the field named)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from leasesched.cli import gate_cmd
from leasesched.client import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError
from leasesched.config import Config
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.gate_service import GateService
from tests.unit.served import served


@pytest.fixture
def target() -> Iterator[str]:
    """GateService over the in-memory store, served in this process; its address."""
    with served(pb_grpc.add_GateServiceServicer_to_server, GateService(MemoryStore()), "leasesched.v1.GateService") as address:
        yield address


def test_the_client_manages_a_gate(target: str) -> None:
    with Client(target, config=Config(), namespace="billing") as client:
        made = client.set_gate("stripe", 5, 5, warmup=dt.timedelta(seconds=30))
        assert (made.rate, made.burst, made.warmup, made.state, made.version) == (5, 5, dt.timedelta(seconds=30), "open", 1)
        again = client.set_gate("stripe", 7, 5)  # create_or_update: a change, not ALREADY_EXISTS
        assert again.rate == 7 and again.version == 2
        with pytest.raises(FailedPreconditionError, match="version"):
            client.set_gate("stripe", 8, 5, expected_version=1)
        assert client.pause_gate("stripe").state == "paused"
        assert client.get_gate("stripe").paused
        assert client.unpause_gate("stripe").state == "open"
        assert [g.name for g in client.list_gates()] == ["stripe"]
        with pytest.raises(InvalidArgumentError, match="definition.rate"):
            client.set_gate("other", 0, 1)
        with pytest.raises(InvalidArgumentError, match="definition.burst"):
            client.set_gate("other", 1, 0)
        client.delete_gate("stripe")
        with pytest.raises(NotFoundError):
            client.get_gate("stripe")


def invoke(target: str, *args: str) -> Result:
    return CliRunner().invoke(gate_cmd.gate, ["--target", target, *args], obj=Config())


def test_the_cli_manages_a_gate(target: str) -> None:
    made = invoke(target, "set", "stripe", "-n", "billing", "--rate", "5", "--burst", "5", "--warmup", "30s")
    assert made.exit_code == 0, made.output
    assert made.output.startswith("billing/stripe: 5/s burst 5, warm-up 30s; open;")
    shown = invoke(target, "get", "stripe", "-n", "billing", "--json")
    assert json.loads(shown.output)["gate"]["definition"]["rate"] == 5
    assert "paused" in invoke(target, "pause", "stripe", "-n", "billing").output
    listed = invoke(target, "list", "-n", "billing")
    assert "stripe" in listed.output and "paused" in listed.output
    assert "; open;" in invoke(target, "unpause", "stripe", "-n", "billing").output
    assert invoke(target, "delete", "stripe", "-n", "billing").output.strip() == "deleted billing/stripe"
    missing = invoke(target, "get", "stripe", "-n", "billing")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


def test_the_cli_refuses_a_bad_rate_before_any_call(target: str) -> None:
    bad = invoke(target, "set", "stripe", "--rate", "0")
    assert bad.exit_code == 2 and "--rate" in bad.output
