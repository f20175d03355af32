"""Which logical shards this trigger owns, decided through ZooKeeper.

kazoo's ``SetPartitioner`` divides the fixed shard set among the live trigger
processes and holds a ZooKeeper lock per owned shard. This module runs it in a
thread (kazoo is thread-based) and reports every change of the owned set to
the asyncio side through a callback.

Rules that keep ownership safe and quick:

* any connection trouble (SUSPENDED) moves the partitioner to RELEASE, and we
  report "no shards" *at once*, before trying to release locks: a trigger that
  cannot prove its session stops working its shards immediately;
* a partitioner in FAILURE (session LOST, lock errors) is never waited on: it
  is replaced by a new one as soon as the client is connected again;
* the stability window (``partition_settle_s``, 1 s by default instead of
  kazoo's 30 s) bounds how long a membership change takes to settle. A killed
  trigger's shards move after its session expires (``zk_session_timeout_s``)
  plus this window plus lock acquisition: about 8 s with the defaults.

Two triggers briefly working one shard (a paused process that has not noticed
its session loss yet) may dispatch a task twice; that never breaks
at-most-one execution because every claim is a conditional write.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from kazoo.client import KazooClient
from kazoo.protocol.states import KazooState
from kazoo.recipe.partitioner import SetPartitioner

from leasesched.observability import metrics

log = logging.getLogger(__name__)

OwnedCallback = Callable[[frozenset[int]], None]


class ShardOwnership:
    def __init__(
        self,
        zk: KazooClient,
        path: str,
        shards: int,
        identifier: str,
        on_change: OwnedCallback,
        settle_s: float = 1.0,
    ) -> None:
        self._zk = zk
        self._path = path
        self._shards = shards
        self._identifier = identifier
        self._on_change = on_change
        self._settle_s = settle_s
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._owned: frozenset[int] = frozenset()
        self._thread = threading.Thread(target=self._run, name="shard-ownership", daemon=True)
        self._partitioner: SetPartitioner | None = None

    @property
    def owned(self) -> frozenset[int]:
        return self._owned

    def start(self) -> None:
        self._zk.add_listener(self._on_connection_state)
        self._thread.start()

    def stop(self) -> None:
        """Release every shard and leave the party (graceful shutdown)."""
        self._stopping.set()
        self._wake.set()
        self._zk.remove_listener(self._on_connection_state)  # closing the session next is no "connection lost"
        self._thread.join(timeout=10)
        self._publish(frozenset())
        if self._partitioner is not None:
            try:
                self._partitioner.finish()
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                log.debug("partitioner finish failed: %s", exc)

    def _on_connection_state(self, state: KazooState) -> None:
        # Runs on kazoo's thread: must not block. Stop working shards now.
        if state != KazooState.CONNECTED:
            log.warning("ZooKeeper connection %s: dropping all shards", state)
            self._publish(frozenset())
        self._wake.set()

    def _publish(self, owned: frozenset[int]) -> None:
        if owned != self._owned:
            gained, lost = sorted(owned - self._owned), sorted(self._owned - owned)
            self._owned = owned
            log.info("owning %d shards (+%d -%d)", len(owned), len(gained), len(lost),
                     extra={"shards": sorted(owned), "gained": gained, "lost": lost})  # fmt: skip
            metrics.shard_ownership_changes.inc()
            self._on_change(owned)

    def _new_partitioner(self) -> SetPartitioner:
        return self._zk.SetPartitioner(
            self._path,
            set=range(self._shards),
            identifier=self._identifier,
            time_boundary=self._settle_s,
            max_reaction_time=0.5,
            state_change_event=self._wake,
        )

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._zk.connected:
                self._publish(frozenset())
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._partitioner = partitioner = self._new_partitioner()
                self._work(partitioner)
            except Exception as exc:  # noqa: BLE001 - any ZooKeeper error: start over
                log.warning("shard partitioner error: %s; starting a new one", exc)
                self._publish(frozenset())
                self._stopping.wait(0.5)

    def _work(self, partitioner: SetPartitioner) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if partitioner.failed:
                log.warning("shard partitioner failed (session lost?); replacing it")
                self._publish(frozenset())
                return
            if partitioner.release:
                self._publish(frozenset())
                partitioner.release_set()
                continue
            if partitioner.acquired:
                self._publish(frozenset(int(s) for s in partitioner))
                self._wake.wait(1.0)
                continue
            if partitioner.allocating:
                partitioner.wait_for_acquire(timeout=1.0)
