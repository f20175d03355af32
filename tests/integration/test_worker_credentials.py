"""A worker whose token the servers refuse (issue 11): it says so once, backs
off and exits with ``EXIT_CREDENTIALS_REFUSED`` (77), never registers, and
never sees INTERNAL; the trigger logs each refused stream with the token's
role and namespace. Real TaskUpdater, trigger and worker processes, auth on.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from leasesched.config import Config
from leasesched.testing import ProcessGroup, RunningProcess, zk_members
from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import wait_for
from tests.processes import SessionGroup
from tests.tokens import issue_tokens
from worker.runner import EXIT_CREDENTIALS_REFUSED
from worker.subscriptions import TriggerLink

NAMESPACE = "default"  # worker.demo_handlers


@dataclass
class CredCluster:
    cfg: Config
    tokens: dict[str, str]
    group: ProcessGroup
    trigger: RunningProcess

    def members(self, role: str) -> dict[str, dict[str, object]]:
        return zk_members(self.cfg, role)

    def start_worker(self, token: str) -> RunningProcess:
        argv = ["worker", "--module", "worker.demo_handlers", "--slots", "2", "--log-format", "text"]
        return self.group.start("worker", self.cfg, argv=argv, env_extra={"LEASESCHED_TOKEN": token})


@pytest.fixture(scope="module")
def cred_cluster(module_config: Config) -> Iterator[CredCluster]:
    base = module_config.with_overrides(auth="on", auth_cache_s=1.0)
    wanted = [
        ("ops", "admin", "admin"),
        (NAMESPACE, "client", "client"),
        (NAMESPACE, "worker", "worker"),
        ("other", "worker", "other_worker"),
    ]
    tokens = {name: made[0] for (_, _, name), made in zip(wanted, issue_tokens(base, wanted))}
    cfg = base.with_overrides(token=tokens["admin"])  # the services' own identity
    group = SessionGroup()
    try:
        group.start_serving("task-updater", cfg)
        trigger = group.start_serving("trigger", cfg)
        cluster = CredCluster(cfg, tokens, group, trigger)
        wait_for(lambda: cluster.members("trigger"), 30, "the trigger to register")
        yield cluster
    finally:
        group.stop_all()


def wait_exit_never_registered(cluster: CredCluster, worker: RunningProcess, timeout: float) -> int:
    """Wait for the worker to exit; fail if it ever showed up in ZooKeeper meanwhile."""
    deadline = time.monotonic() + timeout
    while worker.is_running():
        assert not cluster.members("worker"), f"a refused worker was registered: {cluster.members('worker')}"
        assert time.monotonic() < deadline, f"the worker did not exit within {timeout:.0f} s:\n{worker.log_tail(30)}"
        time.sleep(0.2)
    code = worker.exit_code
    assert code is not None
    return code


def assert_said_once(log: str, *needles: str) -> None:
    lines = [line for line in log.splitlines() if "credentials refused" in line]
    assert len(lines) == 1, f"expected one 'credentials refused' line:\n{log}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors == lines, f"other ERROR lines:\n{errors}"
    for noise in ("INTERNAL", "Task was destroyed", "aclose()", "Traceback"):
        assert noise not in log, f"{noise!r} in the worker's log:\n{log}"


def test_worker_with_a_client_token_says_so_once_and_exits_77(cred_cluster: CredCluster) -> None:
    worker = cred_cluster.start_worker(cred_cluster.tokens["client"])
    code = wait_exit_never_registered(cred_cluster, worker, 40)
    log = worker.log_path.read_text()
    assert code == EXIT_CREDENTIALS_REFUSED, log
    assert_said_once(log, "PERMISSION_DENIED", "role 'client'", "role 'worker'", f"namespace {NAMESPACE!r}")


def test_worker_of_another_namespace_is_refused_by_the_trigger_which_logs_it(cred_cluster: CredCluster) -> None:
    # Role worker: the TaskUpdater accepts it; the trigger refuses the namespace.
    worker = cred_cluster.start_worker(cred_cluster.tokens["other_worker"])
    code = wait_exit_never_registered(cred_cluster, worker, 60)
    log = worker.log_path.read_text()
    assert code == EXIT_CREDENTIALS_REFUSED, log
    assert_said_once(log, "by trigger", "PERMISSION_DENIED", "role 'worker'", f"namespace {NAMESPACE!r}")
    trigger_log = cred_cluster.trigger.log_path.read_text()
    refused = [line for line in trigger_log.splitlines() if "Subscribe refused" in line and "'other'" in line]
    assert len(refused) >= 2, trigger_log[-3000:]  # one line per refused stream: it was refused twice before exiting
    assert all("role 'worker'" in line and f"asked for namespace {NAMESPACE!r}" in line for line in refused), refused


def test_refused_streams_answer_permission_denied_never_internal(cred_cluster: CredCluster) -> None:
    """The worker's own stream code against the real trigger: 100 refused
    streams, each PERMISSION_DENIED (a Hello written at once raced the
    refusal and came back INTERNAL about once in twelve)."""
    assert cred_cluster.trigger.target
    cfg = cred_cluster.cfg.with_overrides(token=cred_cluster.tokens["client"])
    before = cred_cluster.trigger.log_path.read_text().count("a client token may not call Subscribe")

    async def no_dispatch(dispatch: pb.Dispatch, link: TriggerLink) -> None:
        raise AssertionError("a refused stream got a dispatch")

    async def run() -> collections.Counter[str]:
        hello = lambda: pb.Hello(worker_id="probe", namespace=NAMESPACE, task_types=["demo.sleep"], capacity=1)  # noqa: E731
        link = TriggerLink(cred_cluster.trigger.target or "", cfg, hello, no_dispatch, namespace=NAMESPACE)
        codes: collections.Counter[str] = collections.Counter()
        for _ in range(100):
            try:
                await asyncio.wait_for(link.subscribe_once(), 10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1
        return codes

    codes = asyncio.run(run())
    assert codes == {"PERMISSION_DENIED": 100}, codes
    wait_for(
        lambda: cred_cluster.trigger.log_path.read_text().count("a client token may not call Subscribe") - before >= 100,
        10,
        "the trigger to log every refused stream",
    )
    line = next(x for x in cred_cluster.trigger.log_path.read_text().splitlines() if "a client token may not call Subscribe" in x)
    assert "Subscribe refused PERMISSION_DENIED" in line and "role 'client'" in line and f"namespace {NAMESPACE!r}" in line, line


def test_worker_with_a_worker_token_registers_once_subscribed(cred_cluster: CredCluster) -> None:
    worker = cred_cluster.start_worker(cred_cluster.tokens["worker"])
    try:
        wait_for(lambda: cred_cluster.members("worker"), 30, "the worker to register")
        workers = set(cred_cluster.members("worker"))
        wait_for(
            lambda: workers <= set(cred_cluster.members("trigger")[cred_cluster.trigger.target or ""].get("workers", [])),  # type: ignore[arg-type]
            20,
            "the trigger to list the worker as subscribed",
        )
        assert worker.is_running()
        log = worker.log_path.read_text()
        assert "credentials refused" not in log and "subscribed to trigger" in log, log
    finally:
        worker.terminate()


def test_local_up_prints_which_token_each_process_needs() -> None:
    from pathlib import Path

    from leasesched.cli.local_cmd import token_banner

    text = token_banner({"client": "lsk_C", "worker": "lsk_W", "admin": "lsk_A"}, Path("/x/tokens.json"), ".venv/bin/leasesched")
    assert "client token: lsk_C" in text and "worker token: lsk_W" in text
    needs = [line for line in text.splitlines() if line.startswith("which process needs which")]
    assert len(needs) == 1 and "client token" in needs[0] and "worker (leasesched worker" in needs[0] and "worker token" in needs[0]
    assert "LEASESCHED_TOKEN=lsk_W .venv/bin/leasesched worker --module" in text
