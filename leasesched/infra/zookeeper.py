"""A local Apache ZooKeeper server (Debian's ``zookeeper`` 3.8.0 package):
standalone, or one server of a local ensemble.

Started with the package's own ``zkServer.sh start-foreground <zoo.cfg>`` (it
execs Java, so the PID we record is the server's) and a zoo.cfg of our own, so
the data and port are per instance and the system-wide /etc/zookeeper
configuration is never touched. An ensemble's server n listens on 127.0.0.n
with the same client, quorum and election ports as the others (as a local
Cassandra cluster does), and names every member in its zoo.cfg
(``server.n=127.0.0.n:quorum:election``) and itself in ``data/myid``.

Two Debian quirks are handled here rather than worked around by users:

* zkEnv.sh is a symlink to /etc/zookeeper/conf/environment, which sets
  ZOO_LOG_DIR and CLASSPATH unconditionally, so neither can be passed in the
  environment;
* the package puts no SLF4J binding on the class path, so the server logs
  nothing at all. SERVER_JVMFLAGS is placed after the script's ``-cp`` and the
  JVM honours the last ``-cp``, so we pass the same class path plus Debian's
  slf4j-simple, which logs to stderr: the captured ``zookeeper.out``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from leasesched.infra.process import (
    InfraError,
    ManagedProcess,
    ServerControl,
    find_java,
    port_in_use,
    wait_until_ready,
)

log = logging.getLogger(__name__)

ZK_HOME = Path("/usr/share/zookeeper")
ZK_CLASSPATH = ("/etc/zookeeper/conf", "/usr/share/java/zookeeper.jar")
SLF4J_SIMPLE = Path("/usr/share/java/slf4j-simple.jar")


@dataclass(frozen=True)
class ZooKeeperServer(ServerControl):
    """One local standalone ZooKeeper: its data folder and client port."""

    data_dir: Path  # zoo.cfg, snapshots and transaction log, PID file, log
    client_port: int = 2181
    host: str = "127.0.0.1"
    heap: str = "512M"
    tick_ms: int = 500  # sessions may be as short as 2 ticks: 1 s, good for failover tests
    min_session_timeout_ms: int = 1000
    max_session_timeout_ms: int = 60000
    zk_home: Path = ZK_HOME
    server_id: int = 0  # ensemble: this server's id (its myid); 0 = standalone
    ensemble: tuple[str, ...] = ()  # ensemble: every member's host, member n at index n-1
    quorum_port: int = 2888
    election_port: int = 3888

    node_name: str = "zookeeper"

    name: ClassVar[str] = "zookeeper"
    stop_timeout_s: ClassVar[float] = 30.0
    label: ClassVar[str] = "ZooKeeper"

    @property
    def port(self) -> int:
        return self.client_port

    # -- paths -------------------------------------------------------------

    @property
    def server_script(self) -> Path:
        return self.zk_home / "bin" / "zkServer.sh"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "zoo.cfg"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "zookeeper.out"

    @property
    def hosts(self) -> str:
        """The connection string for kazoo."""
        return f"{self.host}:{self.client_port}"

    @property
    def process(self) -> ManagedProcess:
        """The running server, for stop/kill9/pause/resume (chaos tests use it directly)."""
        return self._managed()

    def _managed(self, argv: list[str] | None = None, env: dict[str, str] | None = None) -> ManagedProcess:
        return ManagedProcess(
            name=self.node_name,
            pid_file=self.data_dir / "zookeeper.pid",
            log_file=self.log_file,
            argv=argv or (),
            env=env or {},
            cwd=self.data_dir,
        )

    # -- install -----------------------------------------------------------

    def is_installed(self) -> bool:
        return self.server_script.is_file()

    def ensure_installed(self) -> None:
        """Install Debian's zookeeper package if it is missing (root only)."""
        find_java()
        if self.is_installed():
            return
        apt = shutil.which("apt-get")
        if os.geteuid() != 0 or apt is None:
            raise InfraError(
                f"ZooKeeper is not installed ({self.server_script} is missing): "
                "install Debian's package with `sudo apt-get install zookeeper` (3.8.0 is what we run)."
            )
        log.info("installing ZooKeeper (apt-get install zookeeper)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in ([apt, "update"], [apt, "install", "-y", "zookeeper"]):
            done = subprocess.run(
                argv, check=False, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800
            )
            if done.returncode != 0:
                raise InfraError(f"`{' '.join(argv)}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        if not self.is_installed():
            raise InfraError(f"apt-get installed zookeeper but {self.server_script} is still missing")

    # -- configuration -----------------------------------------------------

    def write_config(self) -> Path:
        """Write this instance's zoo.cfg; rewritten on every start, data kept."""
        data = (self.data_dir / "data").resolve()
        lines = [
            f"tickTime={self.tick_ms}",
            f"dataDir={data}",
            f"clientPort={self.client_port}",
            f"clientPortAddress={self.host}",
            "admin.enableServer=false",  # its Jetty would want port 8080
            f"minSessionTimeout={self.min_session_timeout_ms}",
            f"maxSessionTimeout={self.max_session_timeout_ms}",
            "4lw.commands.whitelist=ruok,stat,srvr,mntr",
            # Every scheduler process and test opens sessions from 127.0.0.1;
            # the default limit of 60 per address is reached by a busy test.
            "maxClientCnxns=0",
            # Long runs would otherwise keep every snapshot and log forever.
            "autopurge.snapRetainCount=3",
            "autopurge.purgeInterval=1",
        ]
        if self.server_id:
            # initLimit/syncLimit are in ticks: 10 s to join, 5 s to stay in sync.
            lines += ["initLimit=20", "syncLimit=10", "quorumListenOnAllIPs=false"]
            lines += [
                f"server.{n}={host}:{self.quorum_port}:{self.election_port}"
                for n, host in enumerate(self.ensemble, start=1)
            ]
            data.mkdir(parents=True, exist_ok=True)
            (data / "myid").write_text(f"{self.server_id}\n")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config_file)
        return self.config_file

    def _environment(self) -> dict[str, str]:
        classpath = [*ZK_CLASSPATH, *([str(SLF4J_SIMPLE)] if SLF4J_SIMPLE.is_file() else [])]
        flags = [
            "-cp",
            ":".join(classpath),
            f"-Xmx{self.heap}",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
        ]
        # JMXDISABLE: JMX would only add an attach listener nobody uses.
        return {"JMXDISABLE": "true", "SERVER_JVMFLAGS": " ".join(flags)}

    # -- life cycle --------------------------------------------------------

    def start(self) -> int:
        """Install if needed, write zoo.cfg and start the server; return its PID."""
        self.ensure_installed()
        if self.is_running():
            raise InfraError(f"ZooKeeper is already running (pid {self.process.pid()}, data {self.data_dir})")
        ports = [("client", self.client_port)]
        if self.server_id:
            ports += [("quorum", self.quorum_port), ("election", self.election_port)]
        for label, port in ports:
            if port_in_use(self.host, port):
                raise InfraError(
                    f"ZooKeeper {label} port {self.host}:{port} is already in use by another process; "
                    "stop it or choose another port (LEASESCHED_ZK_HOSTS, LEASESCHED_ZK_QUORUM_PORT, "
                    "LEASESCHED_ZK_ELECTION_PORT)."
                )
        self.write_config()
        argv = [str(self.server_script), "start-foreground", str(self.config_file.resolve())]
        pid = self._managed(argv, self._environment()).start()
        log.info("ZooKeeper starting (pid %d, client port %s, log %s)", pid, self.hosts, self.log_file)
        return pid

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until a real kazoo session can list '/'; return the seconds it took."""
        return wait_until_ready(self.process, self.probe, timeout, f"ZooKeeper on {self.hosts}", [self.log_file])

    def probe(self) -> bool:
        """One readiness check: 'ruok' first (cheap, silent), then a real session."""
        if not self._ruok():
            return False
        from kazoo.client import KazooClient

        client = KazooClient(hosts=self.hosts, timeout=5.0)
        try:
            client.start(timeout=5.0)
            client.get_children("/")
            return True
        except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
            return False
        finally:
            client.stop()
            client.close()

    def _ruok(self) -> bool:
        return self.four_letter("ruok") == "imok"

    def four_letter(self, word: str) -> str:
        """The answer to a four-letter command (``ruok``, ``srvr``, ...), "" if none."""
        try:
            with socket.create_connection((self.host, self.client_port), timeout=1.0) as s:
                s.sendall(word.encode())
                chunks = []
                while chunk := s.recv(4096):
                    chunks.append(chunk)
                return b"".join(chunks).decode(errors="replace")
        except OSError:
            return ""

    def mode(self) -> str:
        """"leader", "follower" or "standalone" as the server says (``srvr``); "" if it
        does not answer or serves no requests (an ensemble member without quorum)."""
        for line in self.four_letter("srvr").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return ""

