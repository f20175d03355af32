"""The local Cassandra node's settings that trade start-up against speed (issue 17):
the JIT (C1 only for dev and test nodes, C2 for benchmarks) and the commit-log
modes, every one of which but ``periodic`` acknowledges a write only after its fsync."""

from __future__ import annotations

from pathlib import Path

import pytest

from leasesched.config import Config
from leasesched.infra.cassandra import CassandraServer
from leasesched.infra.local import LocalInfra
from leasesched.infra.process import InfraError


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
    cfg = Config(home=str(tmp_path), cassandra_jit="full", cassandra_commitlog_sync="group")
    server = LocalInfra.from_config(cfg).cassandra
    assert (server.jit, server.commitlog_sync) == ("full", "group")
