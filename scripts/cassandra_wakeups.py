#!/usr/bin/env python
"""What a trickle of small requests costs a Cassandra node, by its timer slack (issue 17).

Paces prepared single-partition SELECTs of an empty partition (and a few
multi-partition ones) at a node that serves nothing else, and reads the
node's CPU time from /proc before and after each phase. With ``--slack-ns``
it first sets that timer slack on every thread of the node
(``/proc/<tid>/timerslack_ns``; needs root or CAP_SYS_NICE), which is what
``cassandra_timer_slack_us`` does at start (leasesched/infra/timer_slack.py).
BENCHMARKS.md, "Issue 17, second pass", has the figures.

The driver is built as every leasesched process builds it
(``new_cluster``), from the ``LEASESCHED_*`` settings (port, protocol).

    .venv/bin/leasesched infra up                      # or any idle local node
    .venv/bin/python scripts/cassandra_wakeups.py --pid $(pgrep -f CassandraDaemon) [--slack-ns 500000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leasesched.config import Config  # noqa: E402
from leasesched.loadtest.cpu import cpu_seconds  # noqa: E402
from leasesched.store.cassandra import new_cluster  # noqa: E402

KEYSPACE = "wakeups_probe"


def cpu_s(pid: int) -> float:
    used = cpu_seconds(pid)
    if used is None:
        sys.exit(f"process {pid} is gone")
    return used


def set_slack(pid: int, slack_ns: int) -> int:
    threads = os.listdir(f"/proc/{pid}/task")
    for tid in threads:
        with open(f"/proc/{tid}/timerslack_ns", "w") as f:
            f.write(str(slack_ns))
    return len(threads)


def paced(pid: int, label: str, rate: float, seconds: float, call: Callable[[int], Any]) -> None:
    before, start, n = cpu_s(pid), time.monotonic(), 0
    while time.monotonic() < start + seconds:
        call(n)
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
    used = cpu_s(pid) - before
    print(f"{label:38s} {n:5d} requests: node {used:5.2f} CPU s = {1000 * used / max(1, n):6.2f} ms per request, "
          f"{used / seconds:.3f} cores")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pid", type=int, required=True, help="the Cassandra node's PID")
    parser.add_argument("--slack-ns", type=int, default=0, help="set this timer slack on the node's threads first")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    if args.slack_ns:
        print(f"timer slack {args.slack_ns} ns set on {set_slack(args.pid, args.slack_ns)} threads")
    cluster = new_cluster(Config.from_env())
    session = cluster.connect()
    try:
        session.execute(f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
                        "{'class': 'SimpleStrategy', 'replication_factor': 1}")  # fmt: skip
        session.execute(f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.due (shard int, bucket bigint, due_at bigint, id uuid, "
                        "PRIMARY KEY ((shard, bucket), due_at, id))")  # fmt: skip
        one = session.prepare(f"SELECT * FROM {KEYSPACE}.due WHERE shard = ? AND bucket = ? AND due_at >= ? AND due_at < ?")
        many = session.prepare(f"SELECT * FROM {KEYSPACE}.due WHERE shard IN ? AND bucket = ? AND due_at >= ? AND due_at < ?")
        time.sleep(2)
        idle = cpu_s(args.pid)
        time.sleep(10)
        print(f"{'idle':38s} node {(cpu_s(args.pid) - idle) / 10:.3f} cores")
        paced(args.pid, "single-partition reads, 100/s", 100, args.seconds, lambda n: session.execute(one, (n % 64, 1, 0, 100)))
        paced(args.pid, "reads of 32 partitions (IN), 3/s", 3, args.seconds,
              lambda n: session.execute(many, (list(range(32)), 1, 0, 100)))  # fmt: skip
        paced(args.pid, "single-partition reads, 20/s", 20, args.seconds, lambda n: session.execute(one, (n % 64, 1, 0, 100)))
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {KEYSPACE}")
        cluster.shutdown()


if __name__ == "__main__":
    main()
