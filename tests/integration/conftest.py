"""Fixtures for tests against the real servers and real leasesched processes.

* ``module_config`` — a Config for this test module: its own keyspace (schema
  applied at module start, dropped at module end) and its own ZooKeeper root,
  so modules never see each other's tasks, shards or registrations;
* ``processes_group`` — start leasesched processes (``leasesched.testing``, in
  this session's folder: tests/processes.py); every one is stopped when the
  test ends, passed or failed;
* ``task_service`` — a real ``leasesched task-service`` subprocess, SERVING;
* ``task_stub`` — a TaskService stub on a channel to it.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import grpc
import pytest

from leasesched.config import Config
from leasesched.infra.local import LocalInfra
from leasesched.store import schema
from leasesched.testing import RunningProcess
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests import processes
from tests.processes import SessionGroup


@pytest.fixture(scope="session", autouse=True)
def _test_processes_folder() -> Iterator[None]:
    """Stop what killed sessions left behind; remove this session's process logs at the end."""
    processes.stop_stale()
    yield
    if not os.environ.get("LEASESCHED_KEEP_TEST_DATA"):
        processes.remove_session_dir()


def keyspace_for(node_name: str) -> str:
    """A keyspace name unique to one test module (Cassandra: <= 48 of [a-z0-9_])."""
    base = re.sub(r"[^a-z0-9_]", "_", node_name.lower().rsplit("/", 1)[-1].removesuffix(".py"))[:30]
    return f"t_{base}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def module_config(infra: LocalInfra, request: pytest.FixtureRequest) -> Iterator[Config]:
    keyspace = keyspace_for(request.node.name)
    cfg = infra.config.with_overrides(keyspace=keyspace, zk_root=f"/leasesched-test/{keyspace}")
    schema.apply(cfg)
    try:
        yield cfg
    finally:
        try:
            schema.drop_keyspace(cfg)
        except Exception:  # noqa: BLE001 - a test that left Cassandra down already failed loudly
            pass


@pytest.fixture
def processes_group(request: pytest.FixtureRequest) -> Iterator[SessionGroup]:
    """Start processes with ``processes_group.start(...)``; all are stopped after the test."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
    group = SessionGroup(log_dir=processes.session_dir() / "logs" / safe)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def task_service(module_config: Config, processes_group: SessionGroup) -> RunningProcess:
    """A real TaskService process against the test Cassandra and ZooKeeper, SERVING."""
    return processes_group.start_serving("task-service", module_config)


@pytest.fixture
def task_stub(task_service: RunningProcess) -> Iterator[pb_grpc.TaskServiceStub]:
    assert task_service.target is not None
    channel = grpc.insecure_channel(
        task_service.target,
        options=[("grpc.max_send_message_length", 8 * 1024 * 1024), ("grpc.max_receive_message_length", 8 * 1024 * 1024)],
    )
    try:
        yield pb_grpc.TaskServiceStub(channel)
    finally:
        channel.close()
