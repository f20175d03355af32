"""The worker process: slots, trigger subscriptions, executions, graceful drain.

``leasesched worker --module my_handlers`` imports ``my_handlers``, takes its
``handlers`` object (a ``worker.handlers.Handlers``), registers in ZooKeeper,
subscribes to every trigger and runs dispatched tasks in a fixed number of
slots.

On SIGTERM the worker stops taking work (it tells every trigger it has no free
slot), lets running tasks finish for up to ``drain_timeout``, then stops the
rest and *releases* them: their tasks are re-queued at once instead of after
their leases expire. Then it exits 0. A handler that does not stop even then
(a thread ignoring ``ctx``) is never given back while it runs: when the drain
is over, the worker ends itself with ``EXIT_FAIL_STOP`` (``worker.watchdog``)
and the task is re-queued when its lease expires.

Leases are renewed by a heartbeat thread (``worker.heartbeats``) and watched
by the watchdog thread (``worker.watchdog``), so neither depends on a free
event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient

from leasesched.config import Config
from leasesched.coordination import registry, zk
from leasesched.observability import metrics
from leasesched.observability.logs import bind
from leasesched.v1 import scheduler_pb2 as pb
from services.server import stop_signal, wait_for_stop_signal
from worker.execution import Execution
from worker.handlers import Handlers
from worker.heartbeats import HeartbeatThread
from worker.lease import ClaimBudget
from worker.subscriptions import TriggerLink
from worker.updater_client import SyncUpdaterClient, UpdaterClient
from worker.watchdog import Watchdog

log = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 1.0


def load_handlers(spec: str) -> Handlers:
    """'package.module' or 'package.module:attribute' (default attribute: handlers)."""
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    found = getattr(module, attribute or "handlers", None)
    if not isinstance(found, Handlers):
        raise SystemExit(f"{spec}: expected a worker.handlers.Handlers object named {attribute or 'handlers'!r}")
    return found


class Ledger:
    """Append-only JSON lines of completions sent and accepted (an audit trail; chaos tests read it)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


class Worker:
    def __init__(
        self,
        cfg: Config,
        handlers: Handlers,
        zk_client: KazooClient,
        slots: int,
        worker_id: str,
        ledger: Ledger | None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self._cfg = cfg
        self._handlers = handlers
        self._zk = zk_client
        self.slots = slots
        self.worker_id = worker_id
        self._ledger = ledger
        self._busy = 0
        self._executions: dict[str, Execution] = {}
        self._links: dict[str, TriggerLink] = {}
        self._stopping = False
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=slots, thread_name_prefix="handler")
        updaters = lambda: list(registry.members(self._zk, cfg.zk_root, "task-updater"))  # noqa: E731
        self._updater = UpdaterClient(updaters, cfg)
        self._sync_updater = SyncUpdaterClient(updaters, cfg)
        self._heartbeats = HeartbeatThread(self._sync_updater, max_in_flight=max(2, min(slots, 16)))
        self.watchdog = watchdog or Watchdog()
        self._claim_budget = ClaimBudget(cfg.default_lease_s, cfg.claim_timeout_s)
        self._registration = registry.Registration(zk_client, cfg.zk_root, "worker", worker_id, self._describe())
        self._runs: set[asyncio.Task[None]] = set()

    @property
    def free(self) -> int:
        return 0 if self._stopping else max(0, self.slots - self._busy)

    def _hello(self) -> pb.Hello:
        return pb.Hello(
            worker_id=self.worker_id, namespace=self._handlers.namespace, task_types=self._handlers.types, capacity=self.free
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "namespace": self._handlers.namespace,
            "types": self._handlers.types,
            "slots": self.slots,
            "busy": self._busy,
            "leases": [[e.task_id, e.token] for e in self._executions.values() if e.token],
        }

    def _announce(self, skip: TriggerLink | None = None) -> None:
        """Tell every trigger how many slots are free now (``skip``: the one
        that just dispatched to us; it already counted the slot as taken)."""
        for link in self._links.values():
            if link is not skip:
                link.send_credit(self.free)

    async def on_dispatch(self, dispatch: pb.Dispatch, link: TriggerLink) -> None:
        handler = self._handlers.get(dispatch.type)
        if handler is None or self.free <= 0 or dispatch.task_id in self._executions:
            link.send_returned(dispatch.task_id)
            return
        self._busy += 1
        self._announce(skip=link)
        execution = Execution(
            dispatch, handler, self._updater, self.worker_id, self._threads, self._heartbeats, self.watchdog,
            self._ledger, acks=link, claim_budget=self._claim_budget,
        )  # fmt: skip
        self._executions[dispatch.task_id] = execution
        run = asyncio.create_task(self._run(execution))
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)

    async def _run(self, execution: Execution) -> None:
        try:
            await execution.run()
        except Exception:  # noqa: BLE001 - one task's trouble must not stop the worker
            log.exception("task %s: execution crashed", execution.task_id)
        finally:
            self._executions.pop(execution.task_id, None)
            # A thread handler that ignored its stop keeps its slot until it returns.
            await execution.handler_done
            self._busy -= 1
            self._announce()

    async def _follow_triggers(self) -> None:
        while True:
            try:
                live = set(await asyncio.to_thread(registry.members, self._zk, self._cfg.zk_root, "trigger"))
            except Exception as exc:  # noqa: BLE001 - ZooKeeper trouble: keep the links we have
                log.info("cannot list triggers: %s", exc)
                live = set(self._links)
            for address in live - set(self._links):
                link = TriggerLink(address, self._cfg, self._hello, self.on_dispatch)
                self._links[address] = link
                link.start()
            for address in set(self._links) - live:
                await self._links.pop(address).stop()
            try:
                await asyncio.to_thread(self._registration.update, self._describe())
            except Exception as exc:  # noqa: BLE001
                log.debug("registration update failed: %s", exc)
            await asyncio.sleep(FOLLOW_INTERVAL_S)

    async def run(self, drain_timeout_s: float, stop: asyncio.Event | None = None) -> None:
        self._heartbeats.start()
        self.watchdog.attach_loop(asyncio.get_running_loop())
        self.watchdog.start()
        await asyncio.to_thread(self._registration.start)
        follower = asyncio.create_task(self._follow_triggers())
        log.info("worker %s: %d slots for %s/%s", self.worker_id, self.slots, self._handlers.namespace, self._handlers.types)
        try:
            await wait_for_stop_signal(stop)
        finally:
            await self._drain(follower, drain_timeout_s)

    async def _drain(self, follower: asyncio.Task[None], drain_timeout_s: float) -> None:
        log.info("worker %s: draining (up to %.0f s)", self.worker_id, drain_timeout_s)
        self._stopping = True
        self._announce()
        follower.cancel()
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=drain_timeout_s)
        for execution in list(self._executions.values()):
            execution.release()
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=10)
        stuck = [e for e in self._executions.values() if e.handler_running]
        if stuck:
            # Never given back while running, and a thread cannot be stopped:
            # end the process; the leases expire and the tasks are re-queued.
            first = stuck[0]
            self.watchdog.fail_stop(
                first.task_id, first.token, f"{len(stuck)} handler(s) did not stop within the drain: {[e.task_id for e in stuck]}"
            )
        for link in self._links.values():
            await link.stop()
        await asyncio.to_thread(self._registration.close)
        await self._updater.close()
        self._heartbeats.stop()
        self._sync_updater.close()
        self.watchdog.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s: stopped", self.worker_id)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


async def serve(cfg: Config, module: str, slots: int, drain_timeout_s: float, ledger_path: str | None) -> None:
    stop = stop_signal()  # a SIGTERM during start-up also stops gracefully
    handlers = load_handlers(module)
    client = await asyncio.to_thread(zk.connect, cfg)
    ledger = Ledger(str(Path(ledger_path).resolve())) if ledger_path else None
    worker = Worker(cfg, handlers, client, slots, default_worker_id(), ledger)
    bind(worker=worker.worker_id)  # on every line this process logs from its event loop
    metrics.worker_slots.set(slots)
    metrics.worker_slots_busy.set_function(lambda: worker._busy)
    try:
        await worker.run(drain_timeout_s, stop)
    finally:
        client.stop()
        client.close()
