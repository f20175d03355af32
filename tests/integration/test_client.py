"""leasesched.client against a whole cluster of real processes (TaskService,
TaskUpdater, a trigger, a worker running ``tests.chaos_handlers``) on the real
Cassandra and ZooKeeper. One cluster serves the module; each test uses its own
tasks (and its own namespace where it counts tasks), so order does not matter.

Tasks of type ``chaos.work`` in namespace ``chaos`` run on the worker; its
payload says how long to run and how many attempts fail (tests/chaos_handlers.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from leasesched.client import (
    AlreadyExistsError,
    AsyncClient,
    CallRetry,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    TaskStatus,
    Timeouts,
    WaitTimeoutError,
)
from leasesched.config import Config
from leasesched.testing import free_ports
from leasesched.infra.local import LocalInfra
from tests.cluster import NAMESPACE, LiveCluster, cluster_config, wait_for
from tests.conftest import REPO
from tests.processes import SessionGroup

WORK = "chaos.work"
UTC = dt.timezone.utc


def work(seconds: float = 0.1, **spec: object) -> bytes:
    return json.dumps({"seconds": seconds, **spec}).encode()


def new_ns() -> str:
    return f"client-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def cluster(infra: LocalInfra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    folder = tmp_path_factory.mktemp("client-cluster")
    cfg = cluster_config(infra.config, "client")
    live = LiveCluster(cfg=cfg, group=SessionGroup(log_dir=folder / "logs"), folder=folder)
    try:
        yield live.start(triggers=1, workers=1, slots=8)
    finally:
        live.dispose()


@pytest.fixture
def client(cluster: LiveCluster) -> Iterator[Client]:
    assert cluster.task_service and cluster.task_service.target
    with Client(cluster.task_service.target, config=cluster.cfg, namespace=NAMESPACE) as c:
        yield c


def test_schedule_then_wait_returns_the_result(client: Client) -> None:
    task_id = client.schedule(WORK, work(0.1))
    final = client.wait(task_id, timeout=dt.timedelta(seconds=60))
    assert final.task_id == task_id and final.status is TaskStatus.SUCCEEDED
    assert final.result.startswith(b"done by ") and final.attempt == 1 and final.error == ""
    assert final.started_at is not None and final.finished_at is not None and final.finished_at >= final.started_at
    assert client.poll(task_id) == final


def test_the_same_idempotency_key_gives_the_same_task(client: Client) -> None:
    key = f"order-{uuid.uuid4()}"
    first = client.schedule(WORK, work(0.1), idempotency_key=key)
    again = client.schedule(WORK, work(0.1), idempotency_key=key)
    other = client.schedule(WORK, work(0.1))  # a generated key: a new task
    assert first == again != other
    with pytest.raises(AlreadyExistsError) as clash:
        client.schedule(WORK, work(0.2), idempotency_key=key)  # same key, another request
    assert clash.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert client.wait(first, timeout=60).status is TaskStatus.SUCCEEDED


def test_delay_and_run_at_are_never_early(client: Client) -> None:
    before = dt.datetime.now(UTC)
    delayed = client.schedule(WORK, work(0.05), delay=dt.timedelta(seconds=2))
    at = (before + dt.timedelta(seconds=3)).replace(microsecond=0) + dt.timedelta(seconds=1)
    timed = client.schedule(WORK, work(0.05), run_at=at)

    pending = client.poll(delayed)
    assert pending.status is TaskStatus.SCHEDULED and pending.run_at is not None
    assert before + dt.timedelta(seconds=2) <= pending.run_at <= dt.datetime.now(UTC) + dt.timedelta(seconds=2)
    assert client.poll(timed).run_at == at

    for task_id in (delayed, timed):
        final = client.wait(task_id, timeout=60)
        assert final.status is TaskStatus.SUCCEEDED
        assert final.started_at is not None and final.run_at is not None and final.started_at >= final.run_at


def test_retry_policy_reaches_the_server(client: Client) -> None:
    policy = RetryPolicy(initial_interval=dt.timedelta(milliseconds=200), backoff_coefficient=1.0, maximum_attempts=2)
    exhausted = client.schedule(WORK, work(0.05, fail=5), retry_policy=policy, priority=7)
    view = client.poll(exhausted)
    assert view.max_attempts == 2 and view.priority == 7
    final = client.wait(exhausted, timeout=60)
    assert final.status is TaskStatus.FAILED and final.attempt == 2
    assert "planned failure on attempt 2" in final.error and final.error_type == "RuntimeError"

    # The same failure, listed as non-retryable: FAILED after the first attempt.
    at_once = client.schedule(
        WORK, work(0.05, fail=5), retry_policy=RetryPolicy(maximum_attempts=5, non_retryable_error_types=["RuntimeError"])
    )
    final = client.wait(at_once, timeout=60)
    assert final.status is TaskStatus.FAILED and final.attempt == 1 and final.max_attempts == 5


def test_timeouts_and_lease_duration_reach_the_server(client: Client) -> None:
    # start_to_close: one attempt may run 1 s; the handler wants 30 s.
    slow = client.schedule(WORK, work(30), timeouts=Timeouts(start_to_close=dt.timedelta(seconds=1)),
                           retry_policy=RetryPolicy(maximum_attempts=1), lease_duration=dt.timedelta(seconds=2))  # fmt: skip

    def running() -> object:
        view = client.poll(slow)
        return view if view.status is TaskStatus.RUNNING else None

    view = wait_for(running, 30, "the slow task to start")
    # Leases are renewed to now + lease_duration (2 s), not the server's default (30 s).
    assert view.lease_expires_at is not None
    assert view.lease_expires_at - dt.datetime.now(UTC) < dt.timedelta(seconds=3)
    final = client.wait(slow, timeout=30)
    assert final.status is TaskStatus.FAILED and final.error_type == "StartToCloseTimeout", final

    # schedule_to_close: 1.5 s in all; the first attempt fails and its retry is due
    # only after 2 s, past the deadline, so the task fails at its deadline, not after 5 attempts.
    bounded = client.schedule(
        WORK, work(0.05, fail=5), timeouts=Timeouts(schedule_to_close=dt.timedelta(seconds=1.5)),
        retry_policy=RetryPolicy(initial_interval=dt.timedelta(seconds=2), maximum_attempts=5),
    )  # fmt: skip
    final = client.wait(bounded, timeout=30)
    assert final.status is TaskStatus.FAILED and final.attempt <= 2, final
    assert "schedule_to_close" in final.error, final.error


def test_cancel_queued_and_running(client: Client) -> None:
    queued = client.schedule(WORK, work(0.05), delay=dt.timedelta(minutes=5))
    assert client.cancel(queued).status is TaskStatus.CANCELLED
    assert client.poll(queued).status is TaskStatus.CANCELLED
    with pytest.raises(FailedPreconditionError):
        client.cancel(queued)  # already finished

    running = client.schedule(WORK, work(30), lease_duration=dt.timedelta(seconds=1.5))
    wait_for(lambda: client.poll(running).status is TaskStatus.RUNNING, 30, "the long task to start")
    asked = client.cancel(running)
    assert asked.status is TaskStatus.RUNNING and asked.cancel_requested
    assert client.wait(running, timeout=30).status is TaskStatus.CANCELLED  # at its worker's next heartbeat


def test_list_walks_every_page(client: Client) -> None:
    namespace = new_ns()  # no worker serves it: its tasks stay SCHEDULED
    ids = {client.schedule("client.listed", namespace=namespace, delay=dt.timedelta(hours=1)) for _ in range(7)}
    listed = [t.task_id for t in client.list(namespace, page_size=3)]  # at least 3 pages
    assert sorted(listed) == sorted(ids), "every task once, across pages"
    assert {t.task_id for t in client.list(namespace, status=TaskStatus.SCHEDULED, page_size=2)} == ids
    assert list(client.list(namespace, status=TaskStatus.SUCCEEDED)) == []


def test_wait_times_out_with_the_last_state(client: Client) -> None:
    task_id = client.schedule(WORK, work(0.05), delay=dt.timedelta(minutes=5))
    started = time.monotonic()
    with pytest.raises(TimeoutError) as timed_out:
        client.wait(task_id, timeout=0.5)
    assert time.monotonic() - started < 5.0
    assert isinstance(timed_out.value, WaitTimeoutError)
    assert timed_out.value.task_id == task_id and timed_out.value.last.status is TaskStatus.SCHEDULED
    client.cancel(task_id)


def test_bad_arguments_raise_typed_errors(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as bad:
        client.schedule(WORK, work(), priority=42)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "priority" in bad.value.details
    with pytest.raises(InvalidArgumentError) as bad:
        client.schedule(WORK, work(), retry_policy=RetryPolicy(backoff_coefficient=0.5))
    assert "backoff_coefficient" in bad.value.details
    with pytest.raises(InvalidArgumentError):
        client.poll("not-a-task-id")
    with pytest.raises(NotFoundError) as missing:
        client.poll(str(uuid.uuid4()))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_target_comes_from_the_config(cluster: LiveCluster) -> None:
    assert cluster.task_service and cluster.task_service.target
    host, port = cluster.task_service.target.rsplit(":", 1)
    cfg = Config.from_env({**cluster.cfg.to_env(), "LEASESCHED_BIND_HOST": host, "LEASESCHED_TASK_SERVICE_PORT": port})
    with Client(config=cfg, namespace=NAMESPACE) as c:
        assert c.wait(c.schedule(WORK, work(0.05)), timeout=60).status is TaskStatus.SUCCEEDED


async def test_async_client(cluster: LiveCluster) -> None:
    assert cluster.task_service and cluster.task_service.target
    namespace = new_ns()
    async with AsyncClient(cluster.task_service.target, config=cluster.cfg, namespace=NAMESPACE) as c:
        task_id = await c.schedule(WORK, work(0.1), idempotency_key=f"async-{uuid.uuid4()}")
        final = await c.wait(task_id, timeout=60)
        assert final.status is TaskStatus.SUCCEEDED and final.result.startswith(b"done by ")

        queued = {await c.schedule("client.listed", namespace=namespace, delay=dt.timedelta(hours=1)) for _ in range(5)}
        assert {t.task_id async for t in c.list(namespace, page_size=2)} == queued
        one = next(iter(queued))
        assert (await c.cancel(one)).status is TaskStatus.CANCELLED
        with pytest.raises(WaitTimeoutError):
            await c.wait(next(iter(queued - {one})), timeout=0.3)
        with pytest.raises(InvalidArgumentError):
            await c.schedule(WORK, priority=-1)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_schedule_retries_until_a_task_service_is_up(cluster: LiveCluster) -> None:
    """A client started before its TaskService: UNAVAILABLE is retried (with the
    one key) until the server answers, and exactly one task results."""
    (port,) = free_ports(1)
    namespace = new_ns()
    records = _Records()
    logger = logging.getLogger("leasesched.client")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    retry = CallRetry(max_backoff=dt.timedelta(seconds=1), max_elapsed=dt.timedelta(seconds=90))
    late = None
    try:
        with Client(f"{cluster.cfg.bind_host}:{port}", config=cluster.cfg, namespace=namespace, call_retry=retry) as c, \
                ThreadPoolExecutor(1) as pool:  # fmt: skip
            pending = pool.submit(c.schedule, "client.late", delay=dt.timedelta(hours=1))
            wait_for(lambda: any("UNAVAILABLE" in m for m in records.messages), 30, "the client to retry UNAVAILABLE")
            assert not pending.done()
            late = cluster.group.start_serving("task-service", cluster.cfg, port=port)
            task_id = pending.result(timeout=90)
            assert [t.task_id for t in c.list()] == [task_id]
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
        if late is not None:
            cluster.group.processes.remove(late)
            late.terminate(15)


def test_the_examples_in_docs_client_md_run(cluster: LiveCluster) -> None:
    """docs/client.md's examples, as written, against this cluster with the demo worker of `make run`."""
    assert cluster.task_service and cluster.task_service.target
    cluster.group.start("worker", cluster.cfg, argv=["worker", "--module", "worker.demo_handlers", "--slots", "2"])
    host, port = cluster.task_service.target.rsplit(":", 1)
    env = {**os.environ, **cluster.cfg.to_env(), "LEASESCHED_BIND_HOST": host, "LEASESCHED_TASK_SERVICE_PORT": port}
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "client.md").read_text(), re.S)
    assert len(blocks) == 3
    outputs = [
        subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        for code in blocks
    ]
    assert all(out.returncode == 0 for out in outputs), [out.stderr[-2000:] for out in outputs]
    assert "SUCCEEDED hello" in outputs[0].stdout
    assert "slept 2 s" in outputs[1].stdout
    lines = outputs[2].stdout.splitlines()  # the schedules example: its spec, a run now, 30 November slots, the list
    assert lines[0].startswith("cron '30 2 * * *' in Europe/Berlin") and "30" in lines and lines[-1].startswith("nightly False ")
