"""The trigger process: ``leasesched trigger``.

Joins the ZooKeeper partition of logical shards, runs one ``ShardScanner`` per
owned shard, and serves TriggerService (worker subscriptions, due hints).
Its ZooKeeper registration carries the shards it owns, so TaskService knows
where to send due hints, and the workers subscribed to it; ``leasesched
cluster status`` shows both (``announcer.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from leasesched.config import Config
from leasesched.coordination import registry
from leasesched.lifecycle import Lifecycle
from leasesched.model import DueEntry, now_ms
from leasesched.observability import metrics
from leasesched.observability.logs import fields
from leasesched.states import TaskStatus
from leasesched.store.base import StoreError
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from leasesched.server import bootstrap
from leasesched.server.auth_setup import make_authenticator
from leasesched.server.grpc_server import build_server, stop_signal, wait_for_stop_signal
from trigger.announcer import Announcer
from trigger.dispatcher import Dispatcher, DispatchPolicy, Ready, WorkersChanged
from trigger.gates import GateKeeper
from trigger.ownership import ShardOwnership
from trigger.scanner import ScanSettings, ShardScanner
from trigger.schedule_firer import ScheduleFirer
from trigger.service import RefusalLog, TriggerService

log = logging.getLogger(__name__)


class Trigger:
    """Owned shards → running scanners; everything on one asyncio loop."""

    def __init__(
        self, cfg: Config, lifecycle: Lifecycle, settings: ScanSettings, on_workers: WorkersChanged | None = None
    ) -> None:
        self._cfg = cfg
        self._lifecycle = lifecycle
        self._settings = settings
        self.dispatcher = Dispatcher(
            cfg.claim_timeout_s, self._still_unclaimed, on_workers, policy=DispatchPolicy.from_config(cfg)
        )
        self.gates = GateKeeper(lifecycle.store, self.dispatcher)
        self.firer = ScheduleFirer(lifecycle, cfg.schedule_catchup_rate)
        self._scanners: dict[int, tuple[ShardScanner, asyncio.Task[None]]] = {}
        self._hints: set[asyncio.Task[None]] = set()
        self.owned: frozenset[int] = frozenset()

    async def _still_unclaimed(self, ready: Ready) -> bool:
        task = await self._lifecycle.read(ready.task_id)
        if task is None or ready.shard not in self.owned:
            return False
        return (task.status, task.attempt, task.lease_token) == (TaskStatus.SCHEDULED, ready.attempt, ready.lease_token)

    def set_owned(self, owned: frozenset[int]) -> None:
        """Start and stop scanners so that exactly the owned shards are worked."""
        self.owned = owned
        for shard in list(self._scanners):
            if shard not in owned:
                scanner, task = self._scanners.pop(shard)
                scanner.stop()
                task.cancel()
                log.info("shard %d released", shard, extra=fields(shard=shard))
        self.dispatcher.drop_shards(owned)
        for shard in sorted(owned):
            if shard not in self._scanners:
                scanner = ShardScanner(shard, self._lifecycle, self.dispatcher, self._settings, on_schedule=self.firer.handle)
                self._scanners[shard] = (scanner, asyncio.create_task(scanner.run()))
                log.info("shard %d acquired", shard, extra=fields(shard=shard))

    def due_hint(self, request: pb.NotifyDueRequest) -> None:
        entry = self._scanners.get(request.shard)
        if entry is None:
            return
        task_id = uuid.UUID(request.task_id)
        if request.attempt > 0:
            # The hint carries the entry: no read here (the handler reads the row once).
            due = DueEntry(
                shard=request.shard,
                due_at=now_ms(),
                task_id=task_id,
                kind=DueEntry.RUN,
                attempt=request.attempt,
                priority=request.priority,
                type=request.type,
                lease_token=request.lease_token,
            )
            if request.namespace and request.HasField("run_at"):
                entry[0].offer_created(
                    due, request.namespace, request.run_at.ToMilliseconds(), request.concurrency_key, gate=request.gate,
                    created=request.created if request.HasField("created") else None,
                )
            else:
                entry[0].notify_entry(due)
            return
        hint = asyncio.create_task(self._hint(entry[0], task_id))
        self._hints.add(hint)
        hint.add_done_callback(self._hints.discard)

    async def _hint(self, scanner: ShardScanner, task_id: uuid.UUID) -> None:
        try:
            task = await self._lifecycle.read(task_id)
        except StoreError:
            return  # the scan will find it
        if task is not None and task.run_at <= now_ms():
            scanner.notify(task)

    def stop(self) -> None:
        self.set_owned(frozenset())
        self.gates.stop()

    def stats(self) -> dict[str, object]:
        pending = sum(s.stats()["pending"] for s, _ in self._scanners.values())
        return {"shards": sorted(self.owned), "pending": pending, **self.dispatcher.stats()}

    def oldest_read_s(self) -> float:
        """Seconds since the owned shard read longest ago was last read whole
        (0 with no shards): a scanner that stopped reading shows here."""
        now = time.monotonic()
        return max((now - s.read_at for s, _ in self._scanners.values()), default=0.0)


async def serve(cfg: Config, port: int) -> None:
    """Run a trigger until a stop signal.

    Every step of the start-up pushes its undo onto one exit stack, so a
    failure at any step (ZooKeeper gone, port taken) releases exactly what was
    started before it, and a normal stop runs the same undos in reverse:
    not serving, shards released, registration gone, workers' streams ended,
    server stopped, connections closed."""
    stop = stop_signal()  # a SIGTERM during start-up also stops gracefully
    async with contextlib.AsyncExitStack() as stack:
        core = await bootstrap.connect(cfg)
        stack.push_async_callback(core.close)
        client, meta, store, lifecycle = core.zk, core.meta, core.store, core.lifecycle
        settings = ScanSettings(
            bucket_s=meta.due_bucket_s,
            interval_s=cfg.scan_interval_s,
            lookahead_ms=int(cfg.scan_lookahead_s * 1000),
            settle_ms=int(cfg.scan_settle_s * 1000),
            orphan_grace_ms=int(cfg.orphan_grace_s * 1000),
            lease_grace_ms=int(cfg.lease_grace_s * 1000),
            start_ms=meta.created_at_ms,
            checkpoint_every_s=cfg.checkpoint_interval_s,
        )
        announcer = Announcer()
        trigger = Trigger(cfg, lifecycle, settings, on_workers=announcer.set_workers)
        # Read at scrape time: nothing on the dispatch path.
        metrics.shards_owned.set_function(lambda: len(trigger.owned))
        metrics.dispatch_queued.set_function(lambda: trigger.dispatcher.stats()["queued"])
        metrics.dispatch_queued_by_group.set_function(trigger.dispatcher.queued_by_group)
        metrics.queue_by_type.set_source(trigger.dispatcher.queue_by_type)
        metrics.dispatch_inflight.set_function(lambda: trigger.dispatcher.stats()["inflight"])
        metrics.subscribed_workers.set_function(lambda: trigger.dispatcher.stats()["workers"])
        metrics.due_read_age.set_function(trigger.oldest_read_s)
        metrics.gate_status.set_source(trigger.gates.samples)
        service = TriggerService(trigger.dispatcher, trigger.due_hint, cfg.max_streams_per_worker, logical_shards=meta.logical_shards)
        authenticator = make_authenticator(cfg, store)
        server = await build_server(
            f"{cfg.bind_host}:{port}",
            [(pb_grpc.add_TriggerServiceServicer_to_server, service, "leasesched.v1.TriggerService")],
            cfg,
            authenticator=authenticator,
            outer_interceptors=[RefusalLog(authenticator)],
        )
        await server.server.start()
        stack.push_async_callback(server.server.stop, cfg.shutdown_grace_s)
        stack.callback(service.close)  # end the workers' streams first; NotifyDue calls get the grace
        address = f"{cfg.bind_host}:{server.port}"
        registration = registry.Registration(client, cfg.zk_root, "trigger", address, announcer.data())
        await asyncio.to_thread(registration.start)
        stack.push_async_callback(asyncio.to_thread, registration.close)
        announcer.start(registration)
        stack.push_async_callback(announcer.stop)
        loop = asyncio.get_running_loop()

        def on_owned(owned: frozenset[int]) -> None:
            # Called from kazoo's threads: hop onto the loop, then publish.
            def apply() -> None:
                trigger.set_owned(owned)
                announcer.set_shards(owned)

            loop.call_soon_threadsafe(apply)

        ownership = ShardOwnership(
            client,
            f"{cfg.zk_root}/partition",
            meta.logical_shards,
            identifier=address,
            on_change=on_owned,
            settle_s=cfg.partition_settle_s,
        )
        ownership.start()
        stack.push_async_callback(asyncio.to_thread, ownership.stop)
        stack.callback(trigger.stop)
        await server.set_serving(True)
        stack.push_async_callback(server.set_serving, False)
        stack.callback(log.info, "trigger stopping: releasing shards")
        log.info("trigger serving on %s", address)
        await wait_for_stop_signal(stop)
    log.info("trigger stopped")
