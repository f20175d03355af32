#!/usr/bin/env python
"""CPU per task of ScheduleTask against ScheduleTasks (issue 17), without Cassandra.

TaskService over the in-memory store, served over real gRPC in this process
(``tests/unit/served.py``, the product's interceptors), and a blocking client
in the same process: the figure is client + server CPU (``getrusage``) per
task, i.e. what a call's framing, interceptors and handler dispatch cost
beside the per-task work, which is the same code in both. Cassandra's share
is not in it (the same writes per task in both modes).

    .venv/bin/python scripts/schedule_batch_cpu.py [--tasks 3000]
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from leasesched.config import Config  # noqa: E402
from leasesched.lifecycle import Lifecycle  # noqa: E402
from leasesched.store.memory import MemoryStore  # noqa: E402
from leasesched.v1 import scheduler_pb2 as pb  # noqa: E402
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from services.task_service import TaskService  # noqa: E402
from tests.unit.served import served  # noqa: E402


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def request() -> pb.ScheduleTaskRequest:
    return pb.ScheduleTaskRequest(task=pb.TaskSpec(namespace="ns", type="bench.noop", payload=b"x" * 256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    n = parser.parse_args().tasks
    logging.disable(logging.INFO)  # a log line per task would be most of what is measured
    service = TaskService(Config(), Lifecycle(MemoryStore()), shards=64)
    with served(pb_grpc.add_TaskServiceServicer_to_server, service, "leasesched.v1.TaskService") as target:
        stub = pb_grpc.TaskServiceStub(grpc.insecure_channel(target))
        for _ in range(200):  # warm-up
            stub.ScheduleTask(request())
        stub.ScheduleTasks(pb.ScheduleTasksRequest(tasks=[request() for _ in range(50)]))
        for batch in (1, 10, 50, 500):
            requests = [request() for _ in range(n)]
            cpu0, wall0 = cpu_s(), time.monotonic()
            if batch == 1:  # 64 calls in flight
                for i in range(0, n, 64):
                    for future in [stub.ScheduleTask.future(r) for r in requests[i : i + 64]]:
                        future.result()
            else:  # 4 calls in flight
                calls = [pb.ScheduleTasksRequest(tasks=requests[i : i + batch]) for i in range(0, n, batch)]
                for i in range(0, len(calls), 4):
                    for future in [stub.ScheduleTasks.future(c) for c in calls[i : i + 4]]:
                        assert all(r.WhichOneof("result") == "scheduled" for r in future.result().results)
            cpu, wall = cpu_s() - cpu0, time.monotonic() - wall0
            print(f"batch {batch:>3}: {n} tasks, CPU {1000 * cpu / n:.3f} ms/task, wall {wall:.2f} s ({n / wall:.0f} tasks/s)")


if __name__ == "__main__":
    main()
