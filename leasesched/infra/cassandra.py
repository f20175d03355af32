"""A local Apache Cassandra 5.0 node, fetched from Maven Central, run on Java 17.

Why Maven: Cassandra's server artifact ``org.apache.cassandra:cassandra-all``
and every runtime dependency are on Maven Central, which this project's
machines reach (archive.apache.org they do not). ``cassandra-pom.xml`` names
that one artifact; ``mvn dependency:copy-dependencies`` puts the 100 jars
(67 MB, ~21 s the first time) into ``<dist>/cassandra-<version>/lib``, once per
checkout (a marker file says the copy is complete). The jar has no ``conf/``:
the cassandra.yaml and the logging config are ours (``write_config``,
``logback.xml``), so every node's data, logs and ports are its own and several
nodes (the developer's, a test session's, a 3-node cluster) run side by side.

Why 5.0 (it replaced 2.1.0 from npm): 2.1's Paxos could answer a conditional
write whose condition did not apply inconsistently (CASSANDRA-12126) — exactly
the writes that turn away a stale worker — and legacy Paxos is not
linearizable across range movements. 5.0 runs Paxos v2 (``paxos_variant: v2``:
fewer round trips per conditional write), allows ``IF col <= ?``, and is
maintained.

The JVM flags are Cassandra 5.0's own for Java 17 (``conf/jvm17-server.options``,
``conf/jvm-server.options``, ``cassandra-env.sh``), checked on the real 5.0.9
jar: with no ``--add-opens`` the node dies at start ("unable to access
required classes"). Java 17 exactly (11 would do; 5.0 refuses 21+: Temurin 25
fails on its security-manager Policy), found by ``find_java17``.

Durability: the commit log syncs in ``batch`` mode by default, i.e. a write is
acknowledged only after it is fsynced (5.0 has no batch window any more: it
fsyncs as soon as a write arrives). Measured on the 2-core machine, 2,000
concurrent async inserts then kill -9: batch kept 2000/2000, ``periodic``
(Cassandra's default, sync every 10 s) lost 41. A one-node local cluster
cannot mask that with replicas, and the chaos tests kill nodes on purpose, so
"no lost task" needs batch; benchmarks may choose periodic
(Config.cassandra_commitlog_sync).

Measured for a dev node (OpenJDK 17.0.15, heap 768M, 2 shared cores): CQL-ready
5–7 s after start, ~6 CPU-seconds of start-up with C1 only
(``-XX:TieredStopAtLevel=1``: -40 % start-up CPU; 3 nodes at once ready in
17 s instead of 37 s), RSS ~0.45 GiB, idle ~3.7 % of a core, SIGTERM stop
2.5 s. As root, Cassandra's ``mlockall`` would pin the whole heap (1.2 GiB
RSS): the node runs without CAP_IPC_LOCK (``setpriv``) and logs one harmless
WARN about it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from leasesched.infra import timer_slack
from leasesched.infra.process import (
    InfraError,
    ManagedProcess,
    ServerControl,
    accepts_connections,
    port_in_use,
    wait_until_ready,
)

log = logging.getLogger(__name__)

CASSANDRA_VERSION = "5.0.9"  # the newest 5.0.x on Maven Central (5.0.0 ... 5.0.9)
DAEMON_JAR = f"cassandra-all-{CASSANDRA_VERSION}.jar"
MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
POM_XML = Path(__file__).with_name("cassandra-pom.xml")
LOGBACK_XML = Path(__file__).with_name("logback.xml")
CLUSTER_NAME = "leasesched local"  # stored in the data on first start: never change it
NATIVE_PROTOCOL_VERSION = 5  # what 5.0 speaks by default; the driver pins it (Config)

# conf/jvm17-server.options of Cassandra 5.0: the module exports and opens it
# needs on Java 17, and its netty settings.
JVM17_FLAGS = (
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
    # Its G1 settings (G1 is also Java 17's default collector).
    "-XX:+UseG1GC",
    "-XX:+ParallelRefProcEnabled",
    "-XX:MaxTenuringThreshold=1",
    "-XX:G1HeapRegionSize=16m",
    "-XX:G1RSetUpdatingPauseTimePercent=5",
    "-XX:MaxGCPauseMillis=300",
    "-XX:InitiatingHeapOccupancyPercent=70",
)
# conf/jvm-server.options, general part. Left out on purpose: -XX:+AlwaysPreTouch
# (faults the whole heap in at start), -XX:+UseNUMA, -XX:-UseBiasedLocking
# (deprecated on 17, prints a warning).
JVM_SERVER_FLAGS = (
    "-ea",
    "-da:net.openhft...",
    "-XX:+UseThreadPriorities",
    "-XX:+HeapDumpOnOutOfMemoryError",
    "-Xss256k",
    "-XX:+UseTLAB",
    "-XX:+ResizeTLAB",
    "-XX:+PerfDisableSharedMem",
    "-Djava.net.preferIPv4Stack=true",
    "-XX:+CrashOnOutOfMemoryError",
)
# For local and test nodes: start fast and stop fast. No gossip-settle poll
# before CQL opens; no 2 s shutdown announcement to peers that are stopping too.
DEV_FLAGS = (
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    "-Dcassandra.shutdown_announce_in_ms=0",
)
# ``jit="c1"`` (the default for dev and test nodes): C1 only, start-up CPU
# -40 %, for nodes that start often and serve little. ``jit="full"`` (C2 as
# well, the JVM's default: what a production node runs): more CPU while it
# warms up; measured no cheaper per task than C1 here, even after a 60 s
# warm-up (BENCHMARKS.md, issue 17), so the benchmarks run C1 too.
JIT_FLAGS: dict[str, tuple[str, ...]] = {"c1": ("-XX:TieredStopAtLevel=1",), "full": ()}
# ``commitlog_sync="group"``: as durable as batch (a write is acknowledged only
# after the fsync that covers it), but the node fsyncs at most once per window
# for all writes that arrived in it, instead of once per arrival: fewer fsyncs
# and commit-log wake-ups under load, at most one window of added latency.
GROUP_WINDOW = "2ms"


def _java_major(java: str) -> int | None:
    """The Java feature version of the ``java`` binary (17 for 17.0.15), or None."""
    try:
        out = subprocess.run(
            [java, "-XshowSettings:properties", "-version"], capture_output=True, text=True, timeout=30
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"java\.specification\.version = (\d+)", out)
    return int(match.group(1)) if match else None


@lru_cache(maxsize=1)
def find_java17() -> str:
    """A Java 17 (or 11) to run Cassandra 5.0 with: ``$JAVA_HOME``, then the JDKs
    under /usr/lib/jvm, then ``java`` on the PATH. Never the newest Java by
    default: 5.0 supports 11 and 17 only."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    candidates += sorted(str(p) for p in Path("/usr/lib/jvm").glob("*17*/bin/java"))
    candidates += sorted(str(p) for p in Path("/usr/lib/jvm").glob("*11*/bin/java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    seen = []
    for java in candidates:
        if java in seen or not Path(java).is_file():
            continue
        seen.append(java)
        if _java_major(java) in (11, 17):
            return java
    raise InfraError(
        "Cassandra 5.0 needs Java 17 (or 11), none was found"
        + (f" (tried {', '.join(seen)})" if seen else "")
        + ": install it, e.g. `apt-get install openjdk-17-jre-headless`, or point JAVA_HOME at one."
    )


def _lock_free_prefix() -> list[str]:
    """Run the JVM without CAP_IPC_LOCK when we are root: otherwise Cassandra's
    mlockall pins the whole heap in RAM (measured 1.2 GiB RSS instead of 0.45)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return []
    return [setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]


@contextmanager
def _install_lock(folder: Path) -> Iterator[None]:
    """Serialise installs into one dist folder (a test session and `make run` may race)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def initial_token(node: int, nodes: int) -> int:
    """Node ``node`` (1-based) of ``nodes``: evenly spaced Murmur3 tokens, one per node,
    so a local cluster owns equal ranges without vnodes."""
    return -(2**63) + (node - 1) * (2**64 // nodes)


@dataclass(frozen=True)
class CassandraServer(ServerControl):
    """One local Cassandra node: where its jars and data live, its address and ports.

    Nodes of one local cluster share the ports and differ in ``host``
    (127.0.0.1, 127.0.0.2, ...: all of 127/8 is loopback on Linux, and
    Cassandra identifies a node by its address)."""

    dist_dir: Path  # shared download cache: <dist_dir>/cassandra-5.0.9/lib
    data_dir: Path  # this node: yaml, data, commit log, caches, hints, logs, PID file
    native_port: int = 9042  # CQL
    storage_port: int = 7000  # inter-node; bound even by a single node
    heap: str = "1G"  # JVM -Xms/-Xmx, e.g. "512M", "2G"
    host: str = "127.0.0.1"
    # "batch": acknowledge a write only after its commit-log fsync; "periodic":
    # Cassandra's default, faster but loses recent writes on kill -9 (module doc).
    commitlog_sync: str = "batch"  # or "group" (as durable, fsyncs grouped per GROUP_WINDOW)
    jit: str = "c1"  # JIT_FLAGS: "c1" (fast start, dev and tests) or "full" (C2, as in production)
    # Timer slack of the JVM's threads (leasesched/infra/timer_slack.py); 0 = the kernel's 50 µs.
    timer_slack_ns: int = 0
    seeds: tuple[str, ...] = ()  # hosts of the cluster's seed nodes; () = this node alone
    token: int | None = None  # initial_token; None = chosen by Cassandra (a lone node)
    node_name: str = "cassandra"

    name: ClassVar[str] = "cassandra"
    stop_timeout_s: ClassVar[float] = 60.0
    label: ClassVar[str] = "Cassandra"

    @property
    def port(self) -> int:
        return self.native_port

    # -- paths -------------------------------------------------------------

    @property
    def install_dir(self) -> Path:
        return self.dist_dir / f"cassandra-{CASSANDRA_VERSION}"

    @property
    def lib_dir(self) -> Path:
        return self.install_dir / "lib"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "cassandra.yaml"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def log_file(self) -> Path:
        """Cassandra's own log (INFO and above), written by our logback.xml."""
        return self.log_dir / "system.log"

    @property
    def out_file(self) -> Path:
        """The JVM's stdout/stderr: WARN and above, plus anything that kills the JVM early."""
        return self.log_dir / "cassandra.out"

    @property
    def process(self) -> ManagedProcess:
        """The running daemon, for stop/kill9/pause/resume (chaos tests use it directly)."""
        return self._managed()

    def _managed(self, argv: list[str] | None = None) -> ManagedProcess:
        return ManagedProcess(
            name=self.node_name,
            pid_file=self.data_dir / "cassandra.pid",
            log_file=self.out_file,
            argv=argv or (),
            cwd=self.data_dir,
        )

    # -- install -----------------------------------------------------------

    def is_installed(self) -> bool:
        return (self.lib_dir / DAEMON_JAR).is_file() and (self.lib_dir / ".complete").is_file()

    def ensure_installed(self) -> None:
        """Fetch the jars once with Maven; later calls find them and return.

        Maven copies into a temporary folder that is renamed into place, and a
        marker is written last, so an interrupted fetch never leaves a lib
        folder that looks complete. Maven's own cache sits beside it
        (``<dist>/m2``), so a re-fetch after a deleted lib folder is quick.
        """
        find_java17()
        if self.is_installed():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfraError(
                f"Maven is needed once to fetch Cassandra {CASSANDRA_VERSION} from Maven Central "
                "(org.apache.cassandra:cassandra-all): install it, e.g. `apt-get install maven`."
            )
        with _install_lock(self.dist_dir):
            if self.is_installed():  # another process finished it while we waited
                return
            log.info("fetching Cassandra %s and its dependencies from Maven Central into %s", CASSANDRA_VERSION, self.lib_dir)
            self.install_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.install_dir, prefix=".fetch-") as tmp:
                argv = [
                    mvn, "-B", "-q", "-f", str(POM_XML),
                    f"-Dmaven.repo.local={self.dist_dir / 'm2'}",
                    f"-Dcassandra.version={CASSANDRA_VERSION}",
                    f"{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={tmp}/lib",
                ]  # fmt: skip
                done = subprocess.run(
                    argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800
                )
                if done.returncode != 0 or not (Path(tmp) / "lib" / DAEMON_JAR).is_file():
                    raise InfraError(
                        f"could not fetch Cassandra {CASSANDRA_VERSION} from Maven Central "
                        f"(`{' '.join(argv)}` exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
                    )
                (Path(tmp) / "lib" / ".complete").touch()
                if self.lib_dir.exists():
                    shutil.rmtree(self.lib_dir)  # an older, incomplete copy
                (Path(tmp) / "lib").rename(self.lib_dir)
            log.info("Cassandra %s installed in %s", CASSANDRA_VERSION, self.lib_dir)

    # -- configuration -----------------------------------------------------

    def settings(self) -> dict[str, object]:
        """This node's cassandra.yaml, written from scratch (5.0 refuses unknown
        or removed keys such as 2.1's ``start_rpc``)."""
        data = self.data_dir.resolve()
        seeds = self.seeds or (self.host,)
        conf: dict[str, object] = {
            "cluster_name": CLUSTER_NAME,
            "num_tokens": 1,
            "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
            "endpoint_snitch": "SimpleSnitch",
            # A new 5.0 cluster, not an upgrade: 5.0's storage and messaging formats.
            "storage_compatibility_mode": "NONE",
            "data_file_directories": [str(data / "data")],
            "commitlog_directory": str(data / "commitlog"),
            "saved_caches_directory": str(data / "saved_caches"),
            "hints_directory": str(data / "hints"),
            "cdc_raw_directory": str(data / "cdc_raw"),
            "listen_address": self.host,
            "rpc_address": self.host,
            "start_native_transport": True,
            "native_transport_port": self.native_port,
            "storage_port": self.storage_port,
            # Not bound while internode encryption is off; kept distinct anyway.
            "ssl_storage_port": self.storage_port + 1 if self.storage_port < 65535 else self.storage_port - 1,
            # Every node of a local cluster is a seed: none bootstraps, so all
            # start at once on an empty cluster (no 30 s ring delay).
            "seed_provider": [
                {
                    "class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
                    "parameters": [{"seeds": ",".join(f"{h}:{self.storage_port}" for h in seeds)}],
                }
            ],
            "paxos_variant": "v2",
            "commitlog_sync": "batch",
            # Tests drop and re-create keyspaces; snapshots would only eat disk.
            "auto_snapshot": False,
            "snapshot_on_duplicate_row_detection": False,
            "authenticator": "AllowAllAuthenticator",
            "authorizer": "AllowAllAuthorizer",
            # Sized for a shared 2-core machine rather than a dedicated server.
            "concurrent_reads": 8,
            "concurrent_writes": 16,
            "concurrent_counter_writes": 8,
            "concurrent_compactors": 1,
            "memtable_heap_space": "128MiB",
            "memtable_offheap_space": "128MiB",
            "key_cache_size": "16MiB",
            "file_cache_size": "64MiB",
            "native_transport_max_threads": 32,
            "compaction_throughput": "64MiB/s",
            "read_request_timeout": "5000ms",
            "write_request_timeout": "2000ms",
            "cas_contention_timeout": "1000ms",
            "request_timeout": "10000ms",
        }
        if self.token is not None:
            conf["initial_token"] = str(self.token)
        if self.commitlog_sync == "periodic":
            conf.update(commitlog_sync="periodic", commitlog_sync_period="10000ms")
        elif self.commitlog_sync == "group":
            conf.update(commitlog_sync="group", commitlog_sync_group_window=GROUP_WINDOW)
        elif self.commitlog_sync != "batch":
            raise InfraError(f"commitlog_sync must be 'batch', 'group' or 'periodic', not {self.commitlog_sync!r}")
        return conf

    def write_config(self) -> Path:
        """Write this node's cassandra.yaml (as JSON, which is valid YAML).

        Rewritten on every start, so changed ports take effect; the data
        folders and the cluster name stay the same, so the data survives.
        """
        conf = self.settings()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(conf, indent=1) + "\n")
        tmp.replace(self.config_file)
        return self.config_file

    def _jit_flags(self) -> tuple[str, ...]:
        if self.jit not in JIT_FLAGS:
            raise InfraError(f"cassandra jit must be one of {', '.join(JIT_FLAGS)}, not {self.jit!r}")
        return JIT_FLAGS[self.jit]

    def command(self) -> list[str]:
        """The java command line that runs the daemon in the foreground."""
        if self.timer_slack_ns < 0:
            raise InfraError(f"cassandra timer slack must be >= 0 (0: the kernel's default), not {self.timer_slack_ns} ns")
        data = self.data_dir.resolve()
        jamm = sorted(self.lib_dir.glob("jamm-*.jar"))
        return [
            *timer_slack.prefix(self.timer_slack_ns),
            *_lock_free_prefix(),
            find_java17(),
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            *JVM_SERVER_FLAGS,
            *JVM17_FLAGS,
            *DEV_FLAGS,
            *self._jit_flags(),
            *(f"-javaagent:{jar}" for jar in jamm[-1:]),  # jamm measures memtable sizes
            f"-XX:HeapDumpPath={self.log_dir.resolve()}",
            f"-Dcassandra.config={self.config_file.resolve().as_uri()}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.logdir={self.log_dir.resolve()}",
            f"-Dcassandra.storagedir={data}",
            f"-Dcassandra.triggers_dir={data / 'triggers'}",
            f"-Dlogback.configurationFile={LOGBACK_XML}",
            "-cp",
            f"{self.lib_dir / '*'}",
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    # -- life cycle --------------------------------------------------------

    def start(self) -> int:
        """Install if needed, write the config and start the daemon; return its PID.

        Refuses to start when one of our ports is taken: the new node would
        die, and a readiness probe could be answered by the other server.
        """
        self.ensure_installed()
        if self.is_running():
            raise InfraError(f"Cassandra is already running (pid {self.process.pid()}, data {self.data_dir})")
        for label, port in (("CQL", self.native_port), ("storage", self.storage_port)):
            if port_in_use(self.host, port):
                raise InfraError(
                    f"Cassandra {label} port {self.host}:{port} is already in use by another process; "
                    "stop it or choose other ports (LEASESCHED_CASSANDRA_PORT, LEASESCHED_CASSANDRA_STORAGE_PORT)."
                )
        self.write_config()
        for folder in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "triggers", "logs"):
            (self.data_dir / folder).mkdir(parents=True, exist_ok=True)
        pid = self._managed(self.command()).start()
        log.info("Cassandra starting (pid %d, CQL on %s:%d, log %s)", pid, self.host, self.native_port, self.log_file)
        return pid

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Block until a real CQL query succeeds; return the seconds it took."""
        return wait_until_ready(
            self.process,
            self.probe,
            timeout,
            f"Cassandra on {self.host}:{self.native_port}",
            [self.out_file, self.log_file],
        )

    def probe(self) -> bool:
        """One readiness check: connect with the real driver and run a query."""
        if not accepts_connections(self.host, self.native_port):
            return False  # cheap, and keeps the driver from logging connection errors
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import WhiteListRoundRobinPolicy

        cluster = Cluster(
            [self.host],
            port=self.native_port,
            protocol_version=NATIVE_PROTOCOL_VERSION,
            connect_timeout=5,
            control_connection_timeout=5,
            execution_profiles={
                # This node only: a probe of node 2 must not be answered by node 1.
                EXEC_PROFILE_DEFAULT: ExecutionProfile(
                    load_balancing_policy=WhiteListRoundRobinPolicy([self.host]), request_timeout=5
                )
            },
        )
        try:
            cluster.connect().execute("SELECT release_version FROM system.local").one()
            return True
        except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
            return False
        finally:
            cluster.shutdown()
