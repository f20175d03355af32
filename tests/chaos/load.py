"""The one load generator of the chaos tests: tasks scheduled from a background
thread at a steady pace, every accepted id kept.

A load is a mix of ``Kind``s (a task type, its share, how long its handler runs,
its timeouts and retry policy). A schedule that meets a server going away
(UNAVAILABLE, a stopping server's CANCELLED) or a deadline is retried with the
same idempotency key, so it never makes two tasks, and counted
(``unavailable``): the Cassandra-outage scenario checks clients saw them.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from leasesched.transport import SERVER_GONE_CODES
from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import NAMESPACE, LiveCluster

COOPERATIVE = "chaos.work"


@dataclass(frozen=True)
class Kind:
    """One share of a load: a task type and how its tasks look."""

    type: str
    share: float
    seconds: tuple[float, float]  # the handler's run time, drawn uniformly
    delayed_share: float = 0.0  # this share of its tasks is due 0.5-3 s later
    start_to_close_s: float = 0.0
    max_attempts: int = 5
    retry_initial_s: float = 0.2
    lease_s: float = 3.0


def steady(delayed_share: float = 0.2) -> list[Kind]:
    """What test_chaos and test_sigterm run: cooperative tasks, ``delayed_share`` of them delayed."""
    return [Kind(COOPERATIVE, 1.0, (0.1, 1.5), delayed_share=delayed_share, retry_initial_s=0.5)]


class Load:
    def __init__(
        self,
        cluster: LiveCluster,
        count: int,
        per_second: float,
        kinds: list[Kind] | None = None,
        seed: int = 7,
        concurrency: int = 1,
    ) -> None:
        self.cluster = cluster
        self.kinds = kinds or steady()
        self.count = count
        self.per_second = per_second
        self.ids: list[str] = []
        self.type_of: dict[str, str] = {}
        self.unavailable = 0  # schedules answered "server going away", then retried
        self.errors: list[str] = []
        self._rng = random.Random(seed)
        self.concurrency = concurrency
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> "Load":
        self._thread.start()
        return self

    def stop(self) -> "Load":
        """Schedule no more (the count is then an upper bound): for a scenario
        whose disturbance ends when it has seen enough, on a machine too
        loaded to schedule at the asked pace."""
        self._stop.set()
        return self

    def join(self, timeout: float = 180) -> list[str]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load generator did not finish"
        assert not self.errors, self.errors[:3]
        return self.ids

    def of_type(self, task_type: str) -> set[str]:
        return {t for t, k in list(self.type_of.items()) if k == task_type}

    def _pick(self) -> Kind:
        if len(self.kinds) == 1:
            return self.kinds[0]
        x = self._rng.random() * sum(k.share for k in self.kinds)
        for kind in self.kinds:
            x -= kind.share
            if x <= 0:
                return kind
        return self.kinds[-1]

    def _run(self) -> None:
        # With ``concurrency`` > 1 each schedule is sent from a small pool, so
        # the pace holds while a call waits on a slow store (on 3 nodes with a
        # synced commit log one ScheduleTask takes 100-250 ms here: sent one by
        # one, 30/s became 4-8/s). One at a time by default: the scenarios'
        # timings (how long a node stays down, ...) were set with that pace.
        # At most ``concurrency`` schedules in flight, none queued: when the
        # store is slower than the pace, the pace drops instead of a backlog
        # building up that ``stop`` would then have to wait for (a CI run's
        # SIGSTOP scenario: the generator did not finish within 180 s).
        free = threading.BoundedSemaphore(self.concurrency)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="chaos-load") as pool:
            started = time.monotonic()
            for n in range(self.count):
                wait = started + n / self.per_second - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
                while not self._stop.is_set() and not free.acquire(timeout=0.5):
                    pass
                if self._stop.is_set():
                    return
                kind = self._pick()
                delay = self._rng.uniform(0.5, 3.0) if kind.delayed_share and self._rng.random() < kind.delayed_share else 0.0
                pool.submit(self._one, kind, self._rng.uniform(*kind.seconds), delay, free)

    def _one(self, kind: Kind, seconds: float, delay_s: float, free: threading.BoundedSemaphore) -> None:
        try:
            task_id = self._schedule(kind, seconds, delay_s)
        except Exception as exc:  # noqa: BLE001 - reported by join()
            self.errors.append(repr(exc))
            return
        finally:
            free.release()
        with self._lock:
            self.type_of[task_id] = kind.type
            self.ids.append(task_id)

    def _schedule(self, kind: Kind, seconds: float, delay_s: float) -> str:
        spec = pb.TaskSpec(namespace=NAMESPACE, type=kind.type, payload=json.dumps({"seconds": seconds}).encode())
        if delay_s:
            spec.delay.FromMilliseconds(int(delay_s * 1000))
        spec.lease_duration.FromMilliseconds(int(kind.lease_s * 1000))
        spec.retry_policy.maximum_attempts = kind.max_attempts
        spec.retry_policy.initial_interval.FromMilliseconds(int(kind.retry_initial_s * 1000))
        if kind.start_to_close_s:
            spec.timeouts.start_to_close.FromMilliseconds(int(kind.start_to_close_s * 1000))
        request = pb.ScheduleTaskRequest(task=spec, idempotency_key=uuid.uuid4().hex)
        deadline = time.monotonic() + 120
        while True:
            try:
                return str(self.cluster.stub.ScheduleTask(request, timeout=10).task_id)
            except grpc.RpcError as err:
                if err.code() not in SERVER_GONE_CODES and err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                self.unavailable += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
