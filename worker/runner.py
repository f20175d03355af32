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

Credentials. A worker needs a token of role ``worker`` (or ``admin``) for its
handlers' namespace. At start it asks a TaskUpdater whether its token may use
the worker API (a Heartbeat for no task: authentication and the role check
come first, then the request is refused INVALID_ARGUMENT). A refusal
(UNAUTHENTICATED, PERMISSION_DENIED), from that check or from a trigger's
Subscribe, is logged once at ERROR, naming the token's role when the refusal
names it and the role and namespace needed; the worker retries after
``REFUSED_BACKOFF_S``. Refused again at start, or refused twice by every
trigger with no stream accepted, it stops and exits with
``EXIT_CREDENTIALS_REFUSED`` (77, EX_NOPERM): restarting it changes nothing
until its token does. The worker registers in ZooKeeper (and so appears in
``cluster status``) only once a trigger accepted its subscription.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from kazoo.client import KazooClient

from leasesched.config import Config
from leasesched.coordination import registry, zk
from leasesched.observability import metrics
from leasesched.observability.logs import bind
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.server.grpc_server import stop_signal, wait_for_stop_signal
from worker.execution import Execution
from worker.handlers import Handlers
from worker.heartbeats import HeartbeatThread
from worker.lease import ClaimBudget
from worker.subscriptions import REFUSED_BACKOFF_S, REFUSED_CODES, TriggerLink, role_in_details
from worker.updater_client import SyncUpdaterClient, UpdaterClient
from worker.watchdog import Watchdog
from worker.webhook import WebhookSettings, enable_webhooks

log = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 1.0

# Exit status of a worker whose credentials the servers refuse for good
# (sysexits.h EX_NOPERM); 75 (worker.watchdog.EXIT_FAIL_STOP) is the fail-stop.
EXIT_CREDENTIALS_REFUSED = 77
REFUSALS_FOR_GOOD = 2  # per trigger, REFUSED_BACKOFF_S apart: a token stored a moment ago is seen by then
CREDENTIALS_CHECK_S = 10.0  # how long the start-up check waits for a TaskUpdater to answer at all


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
        self._registered = False
        self._accepted = asyncio.Event()  # a trigger accepted a stream: register now
        self._refusal_logged = False
        self.refused_for_good = False
        self._refused_event = asyncio.Event()
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
        received_at = time.time()  # a diagnostic for ctx.timings (benchmarks)
        handler = self._handlers.get(dispatch.type)
        if handler is None or self.free <= 0 or dispatch.task_id in self._executions:
            link.send_returned(dispatch.task_id)
            return
        self._busy += 1
        self._announce(skip=link)
        execution = Execution(
            dispatch, handler, self._updater, self.worker_id, self._threads, self._heartbeats, self.watchdog,
            self._ledger, acks=link, claim_budget=self._claim_budget, received_at=received_at,
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
                link = TriggerLink(
                    address, self._cfg, self._hello, self.on_dispatch,
                    on_refused=self._on_refused, on_accepted=self._on_accepted, namespace=self._handlers.namespace,
                )  # fmt: skip
                self._links[address] = link
                link.start()
            for address in set(self._links) - live:
                await self._links.pop(address).stop()
            try:
                if self._registered:
                    await asyncio.to_thread(self._registration.update, self._describe())
                elif self._accepted.is_set():
                    # Listed (cluster status) only once a trigger accepted us.
                    await asyncio.to_thread(self._registration.start)
                    self._registered = True
            except Exception as exc:  # noqa: BLE001
                log.debug("registration update failed: %s", exc)
            if self._registered or self._accepted.is_set():
                await asyncio.sleep(FOLLOW_INTERVAL_S)
            else:
                try:  # register as soon as a trigger accepts us
                    await asyncio.wait_for(self._accepted.wait(), FOLLOW_INTERVAL_S)
                except asyncio.TimeoutError:
                    pass

    def _on_accepted(self, link: TriggerLink) -> None:
        self._accepted.set()

    def _explain_refusal(self, source: str, code: grpc.StatusCode, details: str) -> str:
        namespace = self._handlers.namespace
        role = role_in_details(details)
        if not self._cfg.token:
            has = "This worker presents no token (LEASESCHED_TOKEN is empty)"
        elif role:
            has = f"This worker's token (LEASESCHED_TOKEN) has role {role!r}"
        else:
            has = "This worker's token (LEASESCHED_TOKEN) is unknown, revoked or malformed"
        return (
            f"credentials refused by {source}: {code.name}: {details}. {has}; a worker needs a token of role 'worker' "
            f"for namespace {namespace!r} (leasesched token create --namespace {namespace} --role worker). "
            f"Retrying in {REFUSED_BACKOFF_S:.0f} s; if refused again it exits with code {EXIT_CREDENTIALS_REFUSED}"
        )

    def _report_refusal(self, source: str, code: grpc.StatusCode, details: str) -> None:
        if not self._refusal_logged:
            self._refusal_logged = True
            log.error("%s", self._explain_refusal(source, code, details))

    def _on_refused(self, link: TriggerLink, code: grpc.StatusCode, details: str) -> None:
        self._report_refusal(f"trigger {link.address}", code, details)
        links = list(self._links.values())
        if links and not any(l.connected for l in links) and all(l.refusals >= REFUSALS_FOR_GOOD for l in links):
            self._give_up(f"every trigger ({len(links)}) refused its credentials {REFUSALS_FOR_GOOD} times")

    def _give_up(self, why: str) -> None:
        if not self.refused_for_good:
            self.refused_for_good = True
            log.info("worker %s: %s; stopping (exit code %d)", self.worker_id, why, EXIT_CREDENTIALS_REFUSED)
            self._refused_event.set()

    async def check_credentials(self) -> bool:
        """Whether a TaskUpdater accepts this worker's token for the worker API
        (True also when none answered within ``CREDENTIALS_CHECK_S``: the
        triggers' answers decide then). Asked twice, ``REFUSED_BACKOFF_S``
        apart, before the answer is no."""
        refusals = 0
        deadline = asyncio.get_running_loop().time() + CREDENTIALS_CHECK_S
        while True:
            try:
                await self._updater.call("Heartbeat", pb.HeartbeatRequest(), timeout=5)
                return True  # not expected (no task): past authentication anyway
            except grpc.RpcError as err:
                code = err.code()
                if code not in REFUSED_CODES:
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        return True  # authenticated, role allowed; only the probe's empty task id was refused
                    if asyncio.get_running_loop().time() > deadline:
                        log.info("could not check this worker's credentials with a TaskUpdater: %s", code.name)
                        return True
                    await asyncio.sleep(0.5)
                    continue
                refusals += 1
                self._report_refusal("the TaskUpdater", code, err.details() or "")
                if refusals >= REFUSALS_FOR_GOOD:
                    self._give_up(f"the TaskUpdater refused its credentials {refusals} times")
                    return False
                await asyncio.sleep(REFUSED_BACKOFF_S)

    async def run(self, drain_timeout_s: float, stop: asyncio.Event | None = None) -> int:
        """Runs until ``stop`` (or SIGTERM/SIGINT); returns the exit status: 0,
        or ``EXIT_CREDENTIALS_REFUSED``."""
        self._heartbeats.start()
        self.watchdog.attach_loop(asyncio.get_running_loop())
        self.watchdog.start()
        follower: asyncio.Task[None] | None = None
        try:
            if await self.check_credentials():
                follower = asyncio.create_task(self._follow_triggers())
                log.info(
                    "worker %s: %d slots for %s/%s", self.worker_id, self.slots, self._handlers.namespace, self._handlers.types
                )
                stopped = asyncio.ensure_future(wait_for_stop_signal(stop))
                refused = asyncio.ensure_future(self._refused_event.wait())
                try:
                    await asyncio.wait({stopped, refused}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopped.cancel()
                    refused.cancel()
        finally:
            await self._drain(follower, drain_timeout_s)
        return EXIT_CREDENTIALS_REFUSED if self.refused_for_good else 0

    async def _drain(self, follower: asyncio.Task[None] | None, drain_timeout_s: float) -> None:
        log.info("worker %s: draining (up to %.0f s)", self.worker_id, drain_timeout_s)
        self._stopping = True
        self._announce()
        if follower is not None:
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
        if self._registered:
            await asyncio.to_thread(self._registration.close)
        await self._updater.close()
        self._heartbeats.stop()
        self._sync_updater.close()
        self.watchdog.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s: stopped", self.worker_id)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


async def serve(
    cfg: Config,
    module: str | None,
    slots: int,
    drain_timeout_s: float,
    ledger_path: str | None,
    webhook: WebhookSettings | None = None,
    namespace: str = "default",
) -> int:
    """Runs a worker until SIGTERM/SIGINT; returns its exit status (0, or ``EXIT_CREDENTIALS_REFUSED``).

    ``webhook``: also serve task type ``webhook`` (``worker.webhook``) in the
    handlers' namespace; without ``module``, in ``namespace``."""
    stop = stop_signal()  # a SIGTERM during start-up also stops gracefully
    handlers = load_handlers(module) if module else Handlers(namespace)
    if webhook is not None:
        enable_webhooks(handlers, webhook)
    with contextlib.ExitStack() as stack:  # the same pattern as the services and the trigger
        client = await asyncio.to_thread(zk.connect, cfg)
        stack.callback(client.close)
        stack.callback(client.stop)  # runs first
        ledger = Ledger(str(Path(ledger_path).resolve())) if ledger_path else None
        worker = Worker(cfg, handlers, client, slots, default_worker_id(), ledger)
        bind(worker=worker.worker_id)  # on every line this process logs from its event loop
        metrics.worker_slots.set(slots)
        metrics.worker_slots_busy.set_function(lambda: worker._busy)
        return await worker.run(drain_timeout_s, stop)
