"""The cluster harness: real leasesched processes, started, waited for and stopped one way.

Everything that runs a cluster of real processes on one machine uses it —
the integration and chaos tests (``tests/``), the load test
(``leasesched/loadtest/runner.py``) and ``leasesched local up`` — so "started",
"serving" and "ready" mean the same everywhere, like kazoo's own testing
harness does for ZooKeeper. It sits in the shared core because the load test
and the CLI ship with the package; it starts the processes as commands
(``<venv>/bin/leasesched <role>``) and imports none of them.

* ``processes``: one process (``RunningProcess``, ``start``), the health wait
  (``wait_serving``), the owner of a set of processes (``ProcessGroup``),
  session folders and stale-process clean-up (``session_dir``, ``stop_stale``);
* ``cluster``: readiness read from ZooKeeper (``wait_ready``: every shard owned
  exactly once, every worker subscribed to every trigger) and ``Cluster``.
"""

from leasesched.testing.cluster import (
    Cluster,
    NotReady,
    shard_owners,
    wait_for,
    wait_ready,
    workers_subscribed,
    zk_members,
)
from leasesched.testing.processes import (
    GRPC_ROLES,
    LEASESCHED_BIN,
    ProcessError,
    ProcessGroup,
    RunningProcess,
    free_port,
    free_ports,
    pid_alive,
    server_args,
    session_dir,
    start,
    stop_stale,
    wait_serving,
    worker_args,
)

__all__ = [
    "GRPC_ROLES",
    "LEASESCHED_BIN",
    "Cluster",
    "NotReady",
    "ProcessError",
    "ProcessGroup",
    "RunningProcess",
    "free_port",
    "free_ports",
    "pid_alive",
    "server_args",
    "session_dir",
    "shard_owners",
    "start",
    "stop_stale",
    "wait_for",
    "wait_ready",
    "wait_serving",
    "worker_args",
    "workers_subscribed",
    "zk_members",
]
