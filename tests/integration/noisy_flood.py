"""A noisy namespace, as its own process: several threads call the TaskService
as fast as they can, each retrying at once whatever the answer.

Run by tests/integration/test_noisy_neighbour.py. A separate process, so the
flood's client-side CPU (and GIL) is not charged to the latency the test
measures for the quiet namespace — only what the server does is.

    python -m tests.integration.noisy_flood TARGET TOKEN NAMESPACE TASK_ID THREADS SCHEDULE_EVERY EXPECT

Every ``SCHEDULE_EVERY``-th call of a thread is a ScheduleTask (0: polls only).
Prints one JSON line ``{"limited": [...]}`` as soon as every flooded method
has been refused with RESOURCE_EXHAUSTED by the limit ``EXPECT`` ("rate",
"share", see ``kind``), then, when its stdin closes,
the summary ``{"counts": {method: {code: n}}, "refusals": {method: {kind: n}},
"messages": {method: {kind: first details}}}``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

import grpc

from leasesched.config import Config
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc


@dataclass
class Tally:
    """What the threads saw; one lock, since they all add to it."""

    methods: tuple[str, ...]
    expect: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    # RESOURCE_EXHAUSTED per method and kind (see ``kind``): the first details and how many.
    messages: dict[str, dict[str, str]] = field(default_factory=dict)
    refusals: dict[str, Counter[str]] = field(default_factory=dict)
    announced: bool = False

    def add(self, method: str, code: grpc.StatusCode, details: str = "") -> None:
        with self.lock:
            self.counts.setdefault(method, Counter())[code.name] += 1
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.messages.setdefault(method, {}).setdefault(kind(details), details)
                self.refusals.setdefault(method, Counter())[kind(details)] += 1
            if not self.announced and all(self.expect in self.messages.get(m, {}) for m in self.methods):
                self.announced = True
                print(json.dumps({"limited": sorted(self.messages)}), flush=True)


def kind(details: str) -> str:
    """Which limit refused a call: the namespace's rate bucket, its concurrency share, or the process cap."""
    if "rate limit" in details:
        return "rate"
    if "calls in progress, its share" in details:
        return "share"
    if "calls in progress, its limit" in details or "Concurrent RPC limit" in details:
        return "process cap"  # counted after the quotas / gRPC's backstop
    return details[:80]


def flood(stub: pb_grpc.TaskServiceStub, namespace: str, task_id: str, schedule_every: int, tally: Tally, stop: threading.Event) -> None:
    poll = pb.PollTaskRequest(task_id=task_id)
    schedule = pb.ScheduleTaskRequest(task=pb.TaskSpec(namespace=namespace, type="noisy.flood", payload=b"x"))
    n = 0
    while not stop.is_set():
        n += 1
        if schedule_every and n % schedule_every == 0:
            method, call = "ScheduleTask", lambda: stub.ScheduleTask(schedule, timeout=10)
        else:
            method, call = "PollTask", lambda: stub.PollTask(poll, timeout=10)
        try:
            call()
            tally.add(method, grpc.StatusCode.OK)
        except grpc.RpcError as err:
            tally.add(method, err.code(), err.details() or "")


def main(argv: list[str]) -> None:
    target, token, namespace, task_id, threads, schedule_every, expect = argv
    methods = ("PollTask", "ScheduleTask") if int(schedule_every) else ("PollTask",)
    tally, stop = Tally(methods, expect), threading.Event()
    cfg = Config(auth="on")
    workers = []
    for _ in range(int(threads)):
        stub = pb_grpc.TaskServiceStub(sync_channel(target, cfg, token=token))
        worker = threading.Thread(target=flood, args=(stub, namespace, task_id, int(schedule_every), tally, stop))
        worker.start()
        workers.append(worker)
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    for worker in workers:
        worker.join()
    with tally.lock:
        counts = {m: dict(c) for m, c in tally.counts.items()}
        refusals = {m: dict(c) for m, c in tally.refusals.items()}
        print(json.dumps({"counts": counts, "refusals": refusals, "messages": tally.messages}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
