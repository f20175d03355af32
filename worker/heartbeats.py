"""Heartbeats from an OS thread, so leases do not depend on a free event loop.

An ``async def`` handler that blocks the loop (``time.sleep``, a CPU loop)
used to stop every heartbeat of the worker: its own lease and the leases of
every other execution on the worker lapsed, and their tasks ran twice. Here
one thread per worker renews every execution's lease every lease/3, over its
own blocking channel (``SyncUpdaterClient``), with a few calls in flight at
once so that one slow answer does not delay the others. Each answer updates
the execution's ``LeaseClock`` (thread-safe) and its flags; the async
supervisor only reads them.

A heartbeat carries the handler's progress, or "stopping: <reason>" once the
worker is stopping the handler (PollTask then shows why the task still runs).
A progress change is sent soon, not only with the next regular heartbeat (a
third of the lease: 10 s with the default lease): the change brings the next
heartbeat forward to one ``PROGRESS_COALESCE_S`` after the previous one, so a
handler that reports progress in a tight loop still costs at most one extra
conditional write per second.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Protocol

import grpc

from leasesched.v1 import scheduler_pb2 as pb
from worker.handlers import TaskContext
from worker.lease import LeaseClock

log = logging.getLogger(__name__)

LOST_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})
PROGRESS_COALESCE_S = 1.0  # progress changes are sent at most this often, beyond the regular heartbeats


class SyncCaller(Protocol):
    """What the thread needs of a TaskUpdater client (``SyncUpdaterClient``; a fake in tests)."""

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any: ...


class Beat:
    """One execution's lease as the heartbeat thread keeps it."""

    def __init__(self, task_id: str, lease_token: int, worker_id: str, clock: LeaseClock, ctx: TaskContext) -> None:
        self.task_id = task_id
        self.lease_token = lease_token
        self.worker_id = worker_id
        self.clock = clock
        self.ctx = ctx
        self.interval = clock.lease_s / 3
        self.cancel_requested = threading.Event()  # the server said: cancel requested
        self.lost = threading.Event()  # the server said: this lease is gone
        self.stopping = ""  # why the worker is stopping the handler, once it is
        # The first renewal is due one interval after the claim was *sent*, not
        # after this execution was registered: a claim answered while the event
        # loop was blocked registers late (measured 1.5 s with 3 s leases), and
        # one more interval from then would come after the lease's deadline.
        self.next_due = min(time.monotonic(), clock.proven_at) + self.interval
        self.in_flight = False
        self.sent = 0  # heartbeats sent (tests read it)
        self.last_sent = -float("inf")  # monotonic time the last heartbeat went out

    def request(self) -> pb.HeartbeatRequest:
        message = f"stopping: {self.stopping}"[:1000] if self.stopping else self.ctx.progress_message
        return pb.HeartbeatRequest(
            task_id=self.task_id,
            lease_token=self.lease_token,
            worker_id=self.worker_id,
            progress=pb.Progress(percent=self.ctx.progress_percent, message=message),
        )


class HeartbeatThread:
    def __init__(self, client: SyncCaller, max_in_flight: int = 4, tick_s: float = 0.05) -> None:
        self._client = client
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._beats: set[Beat] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._calls = concurrent.futures.ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="heartbeat-call")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2)
        self._calls.shutdown(wait=False, cancel_futures=True)

    def add(self, beat: Beat) -> None:
        with self._lock:
            self._beats.add(beat)
        beat.ctx._on_progress = lambda: self._progress_changed(beat)
        self._wake.set()

    def _progress_changed(self, beat: Beat) -> None:
        """Bring the next heartbeat forward (coalesced), from whichever thread reported."""
        with self._lock:
            beat.next_due = min(beat.next_due, beat.last_sent + PROGRESS_COALESCE_S)
        self._wake.set()

    def remove(self, beat: Beat) -> None:
        with self._lock:
            self._beats.discard(beat)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            wait = self._tick_s * 20
            due: list[Beat] = []
            with self._lock:
                for beat in self._beats:
                    if beat.in_flight or beat.lost.is_set():
                        continue
                    if now >= beat.next_due:
                        beat.in_flight = True
                        beat.last_sent = now
                        beat.next_due = now + beat.interval
                        due.append(beat)
                    wait = min(wait, beat.next_due - now)
            for beat in due:
                try:
                    self._calls.submit(self._send, beat)
                except RuntimeError:  # shut down
                    return
            self._wake.wait(max(self._tick_s, wait))
            self._wake.clear()

    def _send(self, beat: Beat) -> None:
        try:
            with self._lock:
                if beat not in self._beats:
                    return
            sent = time.monotonic()
            beat.sent += 1
            try:
                # An answer proves the lease from the send time, so it is useful
                # until the current deadline, not just for one interval (a loaded
                # TaskUpdater, measured: >1 s per LWT at load average 9 on 2 cores).
                timeout = max(beat.interval, beat.clock.remaining(sent))
                reply = self._client.call("Heartbeat", beat.request(), timeout=timeout)
            except grpc.RpcError as err:
                code = err.code()
                with self._lock:
                    if beat not in self._beats:
                        return  # reported and removed meanwhile: a lease that ended is no news
                if code in LOST_CODES:
                    log.warning("task %s: lease %d lost (%s)", beat.task_id, beat.lease_token, err.details())
                    beat.clock.revoke()
                    beat.lost.set()
                    beat.ctx._request_stop("lease lost")
                else:
                    log.info(
                        "task %s: heartbeat failed (%s); lease valid %.1f s more", beat.task_id, code.name, beat.clock.remaining()
                    )
                return
            except Exception as exc:  # noqa: BLE001 - a broken call must not end the thread's work
                log.info("task %s: heartbeat failed (%s)", beat.task_id, exc)
                return
            beat.clock.renewed(sent)
            if reply.cancel_requested and not beat.cancel_requested.is_set():
                log.info("task %s: cancel requested", beat.task_id)
                beat.cancel_requested.set()
                beat.ctx._request_stop("cancel requested")
        finally:
            beat.in_flight = False
