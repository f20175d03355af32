#!/usr/bin/env python
"""The store's floor: what one task's writes cost Cassandra, with nothing else running (issue 17).

Drives the product's own ``Lifecycle`` over the real ``CassandraStore`` with
exactly the store work of an immediate task on the hot path, and nothing
around it (no gRPC, no trigger, no scans, no worker):

* ``schedule``: the due entry, then the row and listing entry (one batch);
* ``claim``: the lease check entry, then the claim's conditional write
  (Paxos), without a read (the ``CreatedTask`` path);
* ``complete``: the completion's conditional write (Paxos).

For each concurrency it runs that chain for ``--tasks`` tasks (``concurrency``
chains in flight) and reads the node's CPU time from /proc before and after,
so the figure is Cassandra's CPU per task at that load, and this process's
(the driver and the lifecycle) beside it. Concurrency 1 gives the latency
floor of the chain: what an immediate task's store work takes on an idle node.
The load test's store probe (``leasesched/loadtest/store_probe.py``) answers
another question: how many raw writes of each kind a second the node takes.
This one runs the product's own lifecycle and counts CPU per task.
BENCHMARKS.md, "Issue 17: the floor", has the figures.

    .venv/bin/leasesched infra up                      # or any idle local node
    .venv/bin/python scripts/store_floor.py --pid $(pgrep -f CassandraDaemon) [--tasks 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leasesched.config import Config  # noqa: E402
from leasesched.event_loop import run as run_loop  # noqa: E402
from leasesched.lifecycle import Lifecycle  # noqa: E402
from leasesched.loadtest.cpu import cpu_seconds  # noqa: E402
from leasesched.model import Task, now_ms  # noqa: E402
from leasesched.states import TaskStatus  # noqa: E402
from leasesched.store import schema  # noqa: E402
from leasesched.store.base import Untouched  # noqa: E402
from leasesched.store.cassandra import CassandraStore  # noqa: E402

KEYSPACE = "store_floor_probe"
SHARDS = 64


def cpu_s(pid: int) -> float:
    used = cpu_seconds(pid)
    if used is None:
        sys.exit(f"process {pid} is gone")
    return used


def new_task() -> Task:
    task_id, now = uuid.uuid4(), now_ms()
    return Task(task_id=task_id, namespace="floor", type="bench.noop", payload=b"x" * 64, shard=task_id.int % SHARDS,
                created_at=now, run_at=now, first_run_at=now, lease_ms=30_000)  # fmt: skip


@dataclasses.dataclass
class Timings:
    schedule: list[float] = dataclasses.field(default_factory=list)
    claim: list[float] = dataclasses.field(default_factory=list)
    complete: list[float] = dataclasses.field(default_factory=list)


async def one_task(life: Lifecycle, timings: Timings) -> None:
    t0 = time.perf_counter()
    done = await life.schedule(new_task())
    assert done.created and done.write_id is not None
    t1 = time.perf_counter()
    lease = await life.claim(done.task.task_id, "floor-worker", 1, created=Untouched(done.task, done.write_id))
    t2 = time.perf_counter()
    assert await life.complete(done.task.task_id, lease.token, b"") == TaskStatus.SUCCEEDED
    t3 = time.perf_counter()
    timings.schedule.append(1000 * (t1 - t0))
    timings.claim.append(1000 * (t2 - t1))
    timings.complete.append(1000 * (t3 - t2))


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def phase(life: Lifecycle, pid: int, tasks: int, concurrency: int) -> None:
    timings = Timings()
    remaining = tasks

    async def chain() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one_task(life, timings)

    node0, own0, wall0 = cpu_s(pid), cpu_s(os.getpid()), time.monotonic()
    await asyncio.gather(*(chain() for _ in range(concurrency)))
    node, own, wall = cpu_s(pid) - node0, cpu_s(os.getpid()) - own0, time.monotonic() - wall0
    total = [a + b + c for a, b, c in zip(timings.schedule, timings.claim, timings.complete)]
    print(f"concurrency {concurrency:3d}: {tasks} tasks in {wall:5.1f} s ({tasks / wall:6.1f}/s)  "
          f"Cassandra {1000 * node / tasks:5.2f} ms CPU per task ({node / wall:.2f} cores)  "
          f"client {1000 * own / tasks:5.2f} ms  |  ms p50/p99: schedule {pct(timings.schedule, 50):.1f}/"
          f"{pct(timings.schedule, 99):.1f}  claim {pct(timings.claim, 50):.1f}/{pct(timings.claim, 99):.1f}  "
          f"complete {pct(timings.complete, 50):.1f}/{pct(timings.complete, 99):.1f}  "
          f"chain {pct(total, 50):.1f}/{pct(total, 99):.1f}", flush=True)  # fmt: skip


async def run(cfg: Config, pid: int, tasks: int, concurrencies: list[int]) -> None:
    store = CassandraStore(cfg)
    await store.connect()
    try:
        life = Lifecycle(store)
        await phase(life, pid, min(tasks, 500), 8)  # warm-up: the JIT, the prepared statements, the connections
        idle0 = cpu_s(pid)
        await asyncio.sleep(5)
        print(f"idle node: {(cpu_s(pid) - idle0) / 5:.3f} cores (included in the figures below)", flush=True)
        for concurrency in concurrencies:
            await phase(life, pid, tasks, concurrency)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pid", type=int, required=True, help="the Cassandra node's PID")
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    logging.disable(logging.INFO)  # a log line per claim would be part of the client's figure
    cfg = dataclasses.replace(Config.from_env(), keyspace=KEYSPACE)
    schema.apply(cfg)
    try:
        run_loop(run(cfg, args.pid, args.tasks, args.concurrency), cfg)  # the services' loop (uvloop)
    finally:
        schema.drop_keyspace(cfg)


if __name__ == "__main__":
    main()
