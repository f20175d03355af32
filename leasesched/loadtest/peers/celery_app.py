"""The Celery app the peer's worker runs: one no-op task that writes the execution ledger.

``celery -A leasesched.loadtest.peers.worker_app worker`` with the broker URL
in ``LEASESCHED_PEER_BROKER``, the Redis transport's visibility timeout in
``LEASESCHED_PEER_VISIBILITY_S`` (and, for the overlap check, how often it
looks for messages past it in ``LEASESCHED_PEER_RESTORE_S``) and the ledger file in
``LEASESCHED_BENCH_LEDGER`` (the variable leasesched's bench workers read).

The task writes its START and END with the project's one ledger writer
(``leasesched.loadtest.ledger.LedgerWriter``), so Celery's executions are
checked by the same overlap checker as leasesched's. Celery has no lease
token: every execution is its own claim, so each gets a token of its own (its
start in nanoseconds). Two executions of one task id that overlap in time then
count as an overlap, exactly as two leasesched executions under different
tokens would.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from leasesched.loadtest.bench_tasks import LEDGER_ENV
from leasesched.loadtest.ledger import LedgerWriter

BROKER_ENV = "LEASESCHED_PEER_BROKER"
VISIBILITY_ENV = "LEASESCHED_PEER_VISIBILITY_S"
RESTORE_ENV = "LEASESCHED_PEER_RESTORE_S"
TASK_NAME = "peer.noop"
DEFAULT_VISIBILITY_S = 3600.0  # Celery's own default for the Redis transport


@dataclass(frozen=True)
class Delivery:
    """What the ledger writer needs of an execution (``ledger._Context``), for a Celery task."""

    task_id: str
    lease_token: int
    attempt: int
    worker_id: str


def make_app(broker: str, visibility_timeout_s: float = DEFAULT_VISIBILITY_S, restore_interval_s: int | None = None) -> Any:
    """A Celery app on ``broker`` with the settings the comparison is about.

    acks_late: a message is acknowledged after the task ran, so a worker that
    dies mid-task does not lose it (the closest Celery comes to leasesched's
    "at least once until done") — and, past the visibility timeout, the Redis
    transport hands the still-running task to another worker. No result
    backend: leasesched's no-op reports its outcome, but the comparison is of
    scheduling, and the ledger records every execution anyway.

    ``restore_interval_s``: how often the worker looks for unacknowledged
    messages older than the visibility timeout and puts them back in the
    queue. kombu's default is every 10 s × a throttle of 10 (≈ 100 s); the
    overlap check sets it to a second (throttle 1), as kombu's documentation
    advises for a short visibility timeout, so that its phase stays short.
    """
    transport: dict[str, Any] = {"visibility_timeout": visibility_timeout_s}
    if restore_interval_s is not None:
        transport.update(unacked_restore_interval=restore_interval_s, unacked_restore_throttle=1)
    app = Celery("leasesched_peer", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=4,  # Celery's default
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    ledger = LedgerWriter(LEDGER_ENV)

    @app.task(name=TASK_NAME, bind=True)
    def noop(self: Any, ms: float = 0.0) -> str:
        request = self.request
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        delivery = Delivery(task_id=str(request.id), lease_token=time.time_ns(), attempt=1 + int(redelivered),
                            worker_id=str(request.hostname or os.getpid()))  # fmt: skip
        with ledger.execution(delivery):
            if ms > 0:
                time.sleep(ms / 1000.0)
        return "ok"

    return app
