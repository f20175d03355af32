"""A whole leasesched cluster of real processes, and the one answer to "is it ready?".

A cluster is TaskService, TaskUpdater, N triggers and M workers, each started
through a ``ProcessGroup`` as the command an operator runs. Serving (the gRPC
health check) is not enough before load is put on it: a task scheduled while
the triggers are still dividing the shards, or before a worker holds a stream
to the trigger that owns its shard, waits for the next rebalance or scan and
makes timings (and tests) lie. So *ready* means, read from the processes' own
ZooKeeper registrations (``leasesched.coordination.registry``):

* every logical shard has exactly one owner among the triggers;
* every worker is registered, and every trigger lists every worker among the
  ones subscribed to it (each trigger publishes them in its registration).

``wait_ready`` checks this for any cluster, also one another program runs
(``leasesched local up`` runs its processes under the supervisor); ``Cluster``
starts one, waits until it is ready, and stops what it started — also when
its start fails half-way.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from kazoo.client import KazooClient

from leasesched.config import Config
from leasesched.testing.processes import ProcessError, ProcessGroup, RunningProcess, worker_args

T = TypeVar("T")


class NotReady(ProcessError):
    """A condition did not hold by its deadline; the message says which and what was seen last."""


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
    watch: Sequence[RunningProcess] = (),
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises ``NotReady`` (naming ``what`` and the last error) at the deadline,
    and ``ProcessError`` with its log tail at once if a process in ``watch``
    has exited: it will not become ready by waiting.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - conditions may fail while things recover
            last_error = exc
        for proc in watch:
            if not proc.is_running():
                raise ProcessError(f"{proc} exited while waiting for {what}.\n--- log tail:\n{proc.log_tail()}")
        if time.monotonic() >= deadline:
            raise NotReady(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")
        time.sleep(interval)


@contextmanager
def zk_session(cfg: Config) -> Iterator[KazooClient]:
    """A short-lived ZooKeeper session on ``cfg``'s ensemble, closed on the way out."""
    from leasesched.coordination import zk

    client = zk.connect(cfg)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def zk_members(cfg: Config, role: str, client: KazooClient | None = None) -> dict[str, dict[str, Any]]:
    """The ZooKeeper registrations of ``role`` in ``cfg``'s cluster (on ``client``, or a short-lived session)."""
    from leasesched.coordination import registry

    if client is not None:
        return registry.members(client, cfg.zk_root, role)
    with zk_session(cfg) as own:
        return registry.members(own, cfg.zk_root, role)


def shard_owners(cfg: Config, client: KazooClient | None = None) -> dict[int, list[str]]:
    """shard → the addresses of the triggers whose registration says they own it."""
    owners: dict[int, list[str]] = defaultdict(list)
    for address, data in zk_members(cfg, "trigger", client).items():
        for shard in data.get("shards", []):
            owners[int(shard)].append(address)
    return dict(owners)


def shards_owned_once(cfg: Config, owners: Mapping[int, Sequence[str]], by: set[str] | None = None) -> bool:
    """Every shard has exactly one owner (and, with ``by``, only triggers of ``by`` own any)."""
    complete = len(owners) == cfg.logical_shards and all(len(o) == 1 for o in owners.values())
    return complete and (by is None or {o[0] for o in owners.values()} <= by)


def workers_subscribed(cfg: Config, workers: int, triggers: int, client: KazooClient | None = None) -> bool:
    """At least ``workers`` workers and ``triggers`` triggers are registered, and
    every registered worker holds a stream to every registered trigger."""
    registered = set(zk_members(cfg, "worker", client))
    trigger_data = zk_members(cfg, "trigger", client)
    return (
        len(registered) >= workers
        and len(trigger_data) >= triggers
        and all(registered <= set(data.get("workers", [])) for data in trigger_data.values())
    )


def wait_ready(
    cfg: Config, triggers: int, workers: int, timeout: float = 60.0, watch: Sequence[RunningProcess] = ()
) -> dict[int, list[str]]:
    """Wait until every shard has exactly one owner and ``workers`` workers are
    subscribed to every one of ``triggers`` triggers; return the shard owners.

    One ZooKeeper session for the whole wait. Raises ``NotReady`` saying what
    was missing at the deadline, ``ProcessError`` at once if a process in
    ``watch`` exits.
    """
    deadline = time.monotonic() + timeout
    with zk_session(cfg) as client:
        seen = ""

        def check() -> dict[int, list[str]] | None:
            nonlocal seen
            owners = shard_owners(cfg, client)
            owned = sum(1 for o in owners.values() if len(o) == 1)
            subscribed = workers_subscribed(cfg, workers, triggers, client)
            seen = f"{owned}/{cfg.logical_shards} shards with exactly one owner, workers subscribed everywhere: {subscribed}"
            return owners if shards_owned_once(cfg, owners) and subscribed else None

        try:
            return wait_for(check, max(0.0, deadline - time.monotonic()), "the cluster to be ready", 0.2, watch)
        except NotReady as exc:
            raise NotReady(f"{exc}; last seen: {seen}") from None


class Cluster:
    """TaskService, TaskUpdater, N triggers and M workers, started through ``group``.

    ``start`` returns once the cluster is ready (see the module docstring); if
    any part fails to start, what was already started is stopped before the
    error propagates. ``stop`` stops every process of the group — all started
    for this cluster — workers first, so they drain while the services answer.
    Nothing else (Cassandra, ZooKeeper, the keyspace) is touched.

    Workers run ``leasesched worker --module <worker_module> --slots S
    --drain-timeout D *worker_extra_args`` with ``worker_env`` added to the
    environment (a ledger path, a worker token); the gRPC roles get
    ``service_env``.
    """

    def __init__(
        self,
        cfg: Config,
        group: ProcessGroup,
        worker_module: str,
        slots: int = 8,
        drain_timeout_s: float = 10.0,
        worker_extra_args: Sequence[str] = (),
        worker_env: Mapping[str, str] | None = None,
        service_env: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.group = group
        self.worker_module = worker_module
        self.slots = slots
        self.drain_timeout_s = drain_timeout_s
        self.worker_extra_args = list(worker_extra_args)
        self.worker_env = dict(worker_env or {})
        self.service_env = dict(service_env or {})
        self.task_service: RunningProcess | None = None
        self.task_updater: RunningProcess | None = None
        self.triggers: list[RunningProcess] = []
        self.workers: list[RunningProcess] = []

    # ------------------------------------------------------------ processes

    def start(
        self,
        triggers: int = 2,
        workers: int = 2,
        slots: int | None = None,
        serving_timeout: float = 60.0,
        ready_timeout: float = 50.0,
    ) -> "Cluster":
        """Start every process, wait until each gRPC one serves (``serving_timeout``
        each) and the cluster is ready (``ready_timeout``); stop them all on failure."""
        try:
            self.task_service = self.start_service("task-service", serving_timeout)
            self.task_updater = self.start_service("task-updater", serving_timeout)
            for _ in range(triggers):
                self.start_trigger(serving_timeout)
            for _ in range(workers):
                self.start_worker(slots)
            started = [p for p in (self.task_service, self.task_updater) if p is not None]
            self.wait_ready(ready_timeout, watch=[*started, *self.triggers, *self.workers])
        except BaseException:
            self.stop()
            raise
        return self

    def start_service(self, role: str, timeout: float = 60.0) -> RunningProcess:
        return self.group.start_serving(role, self.cfg, env_extra=self.service_env, timeout=timeout)

    def start_trigger(self, timeout: float = 60.0) -> RunningProcess:
        proc = self.start_service("trigger", timeout)
        self.triggers.append(proc)
        return proc

    def start_worker(self, slots: int | None = None, drain_timeout_s: float | None = None) -> RunningProcess:
        drain = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        argv = worker_args(self.worker_module, slots or self.slots, *self.worker_extra_args, drain_timeout_s=drain)
        proc = self.group.start("worker", self.cfg, argv=argv, env_extra=self.worker_env)
        self.workers.append(proc)
        return proc

    def pids(self) -> dict[str, int]:
        """name → pid of every process of the cluster that still runs."""
        return self.group.pids()

    def stop(self, timeout: float = 15.0) -> list[str]:
        """SIGTERM every process of the cluster (workers first), SIGKILL after
        ``timeout``; return what went wrong (empty: everything stopped)."""
        return self.group.stop(timeout)

    # ------------------------------------------------------------ readiness

    def zk_members(self, role: str) -> dict[str, dict[str, Any]]:
        return zk_members(self.cfg, role)

    def shard_owners(self) -> dict[int, list[str]]:
        return shard_owners(self.cfg)

    def running(self, procs: Sequence[RunningProcess]) -> int:
        return sum(1 for p in procs if p.is_running())

    def wait_all_shards_owned(self, timeout: float = 30, by: set[str] | None = None) -> dict[int, list[str]]:
        """Every shard has exactly one owner (among the triggers in ``by``, if given)."""

        def check() -> dict[int, list[str]] | None:
            owners = self.shard_owners()
            return owners if shards_owned_once(self.cfg, owners, by) else None

        return wait_for(check, timeout, "every shard to have exactly one owner")

    def wait_workers_subscribed(self, timeout: float = 20) -> None:
        """Every running worker holds a stream to every running trigger."""
        wait_for(
            lambda: workers_subscribed(self.cfg, self.running(self.workers), self.running(self.triggers)),
            timeout,
            "every worker to subscribe to every trigger",
        )

    def wait_ready(self, timeout: float = 50.0, watch: Sequence[RunningProcess] = ()) -> dict[int, list[str]]:
        """``wait_ready`` for the triggers and workers of this cluster that run."""
        return wait_ready(self.cfg, self.running(self.triggers), self.running(self.workers), timeout, watch)
