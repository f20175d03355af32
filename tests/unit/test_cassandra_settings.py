"""The local Cassandra node's settings that trade start-up against speed (issue 17):
the JIT (C1 only for dev and test nodes, C2 for benchmarks), the commit-log
modes, every one of which but ``periodic`` acknowledges a write only after its
fsync, and the timer slack its threads run with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from leasesched.config import Config
from leasesched.infra.cassandra import CassandraServer
from leasesched.infra.local import LocalInfra
from leasesched.infra.process import InfraError
from leasesched.infra.timer_slack import prefix


def node(tmp_path: Path, **kw: object) -> CassandraServer:
    return CassandraServer(dist_dir=tmp_path / "dist", data_dir=tmp_path / "node", **kw)  # type: ignore[arg-type]


def test_dev_nodes_compile_with_c1_only_and_benchmark_nodes_with_c2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("leasesched.infra.cassandra.find_java17", lambda: "java")
    assert "-XX:TieredStopAtLevel=1" in node(tmp_path).command()
    assert not any("TieredStopAtLevel" in flag for flag in node(tmp_path, jit="full").command())
    with pytest.raises(InfraError, match="jit must be one of c1, full"):
        node(tmp_path, jit="c3").command()


def test_group_commit_is_a_durable_mode_with_a_window(tmp_path: Path) -> None:
    assert node(tmp_path).settings()["commitlog_sync"] == "batch"
    group = node(tmp_path, commitlog_sync="group").settings()
    assert (group["commitlog_sync"], group["commitlog_sync_group_window"]) == ("group", "2ms")
    with pytest.raises(InfraError, match="'batch', 'group' or 'periodic'"):
        node(tmp_path, commitlog_sync="sometimes").settings()


def test_the_config_reaches_the_node(tmp_path: Path) -> None:
    cfg = Config(home=str(tmp_path), cassandra_jit="full", cassandra_commitlog_sync="group", cassandra_timer_slack_us=700)
    server = LocalInfra.from_config(cfg).cassandra
    assert (server.jit, server.commitlog_sync, server.timer_slack_ns) == ("full", "group", 700_000)


def test_the_jvm_starts_under_the_configured_timer_slack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("leasesched.infra.cassandra.find_java17", lambda: "java")
    slack = LocalInfra.from_config(Config(home=str(tmp_path))).cassandra.timer_slack_ns
    assert slack == 500_000  # the default
    command = node(tmp_path, timer_slack_ns=slack).command()
    assert command[: command.index("java")][:4] == [sys.executable, "-m", "leasesched.infra.timer_slack", "500000"]
    assert node(tmp_path).command()[0] != sys.executable  # 0: the kernel's default, no wrapper
    with pytest.raises(InfraError, match="timer slack must be >= 0"):
        node(tmp_path, timer_slack_ns=-1).command()


def test_the_wrapper_sets_the_slack_that_the_command_then_has() -> None:
    """The real prctl and exec: the command (here cat) reads its own slack,
    which is what every thread the JVM starts inherits."""
    out = subprocess.run([*prefix(700_000), "cat", "/proc/self/timerslack_ns"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "700000"
    assert prefix(0) == []
