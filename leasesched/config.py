"""One typed configuration object for every leasesched process.

Values come from (lowest to highest precedence) the defaults below, environment
variables named ``LEASESCHED_<FIELD>`` (upper case), and command-line flags the
CLI passes as keyword overrides. Defaults work for a local single-machine
cluster; nothing here is read from global state after start-up: each process
builds a ``Config`` once and hands it down.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints


LOCAL_HOST = "127.0.0.1"


def local_hosts(count: int) -> list[str]:
    """The loopback addresses of a local cluster's ``count`` nodes: 127.0.0.1, 127.0.0.2, ..."""
    return [f"127.0.0.{n}" for n in range(1, count + 1)]


def _default_home() -> str:
    return str(Path.cwd() / ".leasesched")


@dataclass(frozen=True)
class Config:
    # Where local state lives: server data, logs, PID files.
    home: str = field(default_factory=_default_home)

    # Cassandra (the only store).
    # Comma-separated contact points. The default, 127.0.0.1, names the local
    # cluster: with cassandra_nodes = N > 1 its nodes 127.0.0.1 ... 127.0.0.N.
    cassandra_hosts: str = "127.0.0.1"
    cassandra_port: int = 9042
    # Native protocol v4, though Cassandra 5.0 speaks v5: the Python driver
    # frames v5 in checksummed segments computed in pure Python
    # (cassandra/segment.py), measured at ~2 ms of Python and ~1 ms of
    # Cassandra CPU per task (BENCHMARKS.md, issue 17); v4 carries the same
    # statements (LWT, prepared, paging), integrity left to TCP and TLS.
    cassandra_protocol_version: int = 4
    keyspace: str = "leasesched"
    # Replication is configuration, not code: "SimpleStrategy:3" or
    # "NetworkTopologyStrategy:dc1=3,dc2=3". Empty: SimpleStrategy with
    # min(3, cassandra_nodes) replicas (1 for the single local node).
    replication: str = ""
    consistency: str = "LOCAL_QUORUM"  # reads and plain writes
    serial_consistency: str = "LOCAL_SERIAL"  # lightweight transactions
    cassandra_request_timeout_s: float = 5.0
    cassandra_local_dc: str = ""  # empty: the data centre of the first contact point

    # ZooKeeper (the only coordinator).
    # kazoo connection string. A single 127.0.0.1:P with zk_nodes = N > 1 names
    # the local ensemble: 127.0.0.1:P ... 127.0.0.N:P.
    zk_hosts: str = "127.0.0.1:2181"
    zk_root: str = "/leasesched"
    zk_session_timeout_s: float = 6.0

    # Local infrastructure (leasesched infra up). A local cluster of N nodes puts
    # node n on 127.0.0.n with the same ports (all of 127/8 is loopback on Linux).
    cassandra_nodes: int = 1
    zk_nodes: int = 1  # 1 (standalone) or an odd ensemble size (3, 5)
    zk_quorum_port: int = 2888  # ensemble only: followers to leader
    zk_election_port: int = 3888  # ensemble only: leader election
    cassandra_storage_port: int = 7000
    cassandra_heap: str = ""  # JVM heap per node; empty: 1G for one node, 512M each for more
    # "batch" (ack after fsync; survives kill -9 of the single local node),
    # "group" (as durable: ack after the fsync covering it, fsyncs grouped per
    # 2 ms window) or "periodic" (Cassandra's default, ~2x faster writes, loses
    # the last seconds of acknowledged writes on kill -9). See leasesched/infra/cassandra.py.
    cassandra_commitlog_sync: str = "batch"
    # "c1": the JVM compiles with C1 only (start-up CPU -40 %: dev and test
    # nodes); "full": C2 as well, as in production (no better over a 60 s benchmark,
    # even after a warm-up: BENCHMARKS.md, issue 17).
    cassandra_jit: str = "c1"
    # Timer slack of the local Cassandra's threads, in µs (0: the kernel's 50 µs).
    # Its request threads spin in 10 µs sleeps between requests; a 500 µs slack
    # cut a node's CPU at 100 reads/s by two thirds (leasesched/infra/timer_slack.py).
    cassandra_timer_slack_us: int = 500
    cassandra_start_timeout_s: float = 180.0
    zk_start_timeout_s: float = 60.0

    # gRPC servers.
    bind_host: str = "127.0.0.1"
    task_service_port: int = 50051
    task_updater_port: int = 50052
    trigger_port: int = 50053  # first trigger; more triggers use port 0 (any)
    dashboard_port: int = 8080  # leasesched dashboard (and local up's); 0 = local up starts none
    metrics_port: int = 0  # 0 = no metrics endpoint
    log_format: str = "json"  # "json" (one object per line) | "text"
    event_loop: str = "uvloop"  # "uvloop" (libuv, less CPU per call) | "asyncio" (the standard loop)
    shutdown_grace_s: float = 5.0  # on SIGTERM: how long in-flight RPCs may take before they are cancelled
    shutdown_drain_s: float = 1.0  # on SIGTERM: keep answering this long after NOT_SERVING, before the stop
    # Clients ping an idle connection this often (a quiet Subscribe stream can be
    # silent for hours; a dead peer is found within this + 10 s); servers accept
    # pings down to half of it. See leasesched/transport.py.
    grpc_keepalive_s: float = 20.0

    # Security. Auth is on unless explicitly switched off for local development.
    auth: str = "on"  # "on" | "off" (local development only)
    token: str = ""  # the bearer token this process or CLI presents (env LEASESCHED_TOKEN)
    auth_cache_s: float = 5.0  # how long a looked-up token is trusted; bounds revocation delay
    tls_cert: str = ""  # server certificate (PEM); set with tls_key to serve TLS
    tls_key: str = ""
    tls_ca: str = ""  # CA that signed the server certs (clients) / client certs (servers)
    tls_client_cert: str = ""  # optional client certificate (mutual TLS)
    tls_client_key: str = ""
    tls_require_client_cert: int = 0  # 1: servers refuse clients without a certificate

    # Limits that keep one client from taking the services down.
    schedule_rate_per_namespace: float = 5000.0  # ScheduleTask tokens per second per namespace (0 = unlimited)
    schedule_burst: float = 10000.0
    # ScheduleTask and CancelTask (writes) share the bucket above. PollTask and
    # ListTasks (reads) have their own; a ListTasks page costs 1 token per 10 rows.
    poll_rate_per_namespace: float = 10000.0  # read tokens per second per namespace (0 = unlimited)
    poll_burst: float = 20000.0
    # One namespace's share of task_service_max_concurrent_rpcs (0 = no share; auth on
    # only): a flood from one namespace cannot fill the whole cap and starve the others.
    namespace_max_concurrent_rpcs: int = 32
    max_streams_per_worker: int = 4  # concurrent Subscribe streams per worker id, per trigger
    max_concurrent_rpcs: int = 4096  # per TaskUpdater / trigger process (streams count); beyond: RESOURCE_EXHAUSTED
    # Per TaskService process: about what it serves in ~0.3 s. Beyond, clients get
    # RESOURCE_EXHAUSTED at once (and back off) instead of queueing into their deadlines.
    task_service_max_concurrent_rpcs: int = 128
    rpc_timeout_s: float = 30.0  # server-side ceiling for one unary call
    poll_cache_mb: int = 64  # per TaskService: PollTask answers of finished tasks (they never change); 0 = off

    # Task defaults and limits.
    max_payload_bytes: int = 1024 * 1024
    max_result_bytes: int = 1024 * 1024
    max_attempts_limit: int = 100
    default_max_attempts: int = 3
    default_lease_s: float = 30.0
    max_schedule_ahead_s: float = 366 * 24 * 3600.0
    max_schedule_behind_s: float = 24 * 3600.0
    list_page_max: int = 1000
    list_days: int = 30  # how far back ListTasks walks
    allowed_task_types: str = ""  # comma-separated allow-list; empty = any well-formed type

    # Attempt history (leasesched/history.py, docs/operations.md "Attempt history").
    history_max_entries: int = 100  # per task: reads show at most this many entries; older ones are removed
    stuck_lease_losses: int = 3  # a task whose lease was lost this many times shows stuck = true

    # Leases and the trigger.
    lease_grace_s: float = 2.0  # the trigger re-queues only after expiry + this
    claim_timeout_s: float = 5.0  # a dispatch not claimed by then is dispatched again
    scan_interval_s: float = 1.0  # how often each owned shard's due index is read
    scan_lookahead_s: float = 2.0  # entries due this soon are timed in memory (> scan_interval_s)
    scan_settle_s: float = 3.0  # re-read this far back: late writes, clock skew
    # How often each shard's checkpoint is saved. A new owner re-reads from the
    # last saved one, so a longer interval only means more re-reading after a failover.
    checkpoint_interval_s: float = 5.0
    orphan_grace_s: float = 30.0  # an index entry with no task row is dropped after this
    partition_settle_s: float = 1.0  # ZooKeeper partitioner stability window
    # Periodic schedules: slots missed in an outage (within their catch-up
    # window) and backfills run at most this many per second per trigger.
    schedule_catchup_rate: float = 100.0
    # Fair share (trigger/dispatcher.py): within one priority, queued tasks go out
    # round robin across concurrency keys. "namespace/key=weight,..." gives a key
    # that many dispatches per turn ("namespace/" = tasks without a key); default 1.
    fair_share_weights: str = ""
    # Priority ageing: a queued task's effective priority is
    # min(cap, priority + waited // step), waited counted from its run_at; 0 = off.
    priority_ageing_step_s: float = 60.0
    priority_ageing_cap: int = 9

    # Webhook tasks (worker/webhook.py, a worker started with --webhook; docs/webhooks.md).
    # A worker serves one namespace, so these are that namespace's settings.
    webhook_secret: str = ""  # the Standard Webhooks signing key, whsec_<base64>; or --webhook-secret-file
    webhook_allow: str = ""  # comma-separated CIDRs that may be called although not public (e.g. 10.0.0.0/8)
    webhook_timeout_s: float = 10.0  # one delivery (resolve, connect, send, answer); below start_to_close if set

    # Cluster shape, fixed when the cluster is first created (stored in ZooKeeper).
    logical_shards: int = 64
    due_bucket_s: int = 10

    @property
    def cassandra_contact_points(self) -> list[str]:
        hosts = [h.strip() for h in self.cassandra_hosts.split(",") if h.strip()]
        if hosts == [LOCAL_HOST] and self.cassandra_nodes > 1:
            return local_hosts(self.cassandra_nodes)
        return hosts

    @property
    def replication_spec(self) -> str:
        """The keyspace's replication (see ``replication``)."""
        return self.replication or f"SimpleStrategy:{min(3, max(1, self.cassandra_nodes))}"

    @property
    def zk_connection(self) -> str:
        """The connection string kazoo uses (see ``zk_hosts``)."""
        hosts, slash, chroot = self.zk_hosts.partition("/")
        host, _, port = hosts.strip().rpartition(":")
        if self.zk_nodes > 1 and host == LOCAL_HOST and port.isdigit():
            return ",".join(f"{h}:{port}" for h in local_hosts(self.zk_nodes)) + slash + chroot
        return self.zk_hosts

    @property
    def cassandra_heap_per_node(self) -> str:
        return self.cassandra_heap or ("1G" if self.cassandra_nodes <= 1 else "512M")

    @property
    def task_service_target(self) -> str:
        return f"{self.bind_host}:{self.task_service_port}"

    @property
    def task_updater_target(self) -> str:
        return f"{self.bind_host}:{self.task_updater_port}"

    def with_overrides(self, **overrides: Any) -> "Config":
        """A copy with the non-None overrides applied (flags that were not given are None)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """Every field as the ``LEASESCHED_<FIELD>`` variables ``from_env`` reads:
        how a parent process hands its exact configuration to a child.
        Round trip: ``Config.from_env(cfg.to_env()) == cfg``."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            # repr keeps every digit of a float; ints and strings are written as is.
            env[f"LEASESCHED_{f.name.upper()}"] = repr(value) if isinstance(value, float) else str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"LEASESCHED_{f.name.upper()}")
            if raw is None:
                continue
            kind = hints[f.name]
            try:
                values[f.name] = kind(raw) if kind in (int, float) else raw
            except ValueError as exc:
                raise ValueError(f"LEASESCHED_{f.name.upper()}={raw!r}: expected {kind.__name__}") from exc
        return cls(**values).with_overrides(**overrides)
