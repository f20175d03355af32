"""The store's own capacity, measured in the same run with the product's driver settings.

``leasesched.store.cassandra.new_cluster`` builds the driver exactly as every
leasesched process does (protocol version, consistency, serial consistency,
token-aware routing, the never-retrying profile for conditional writes). In a
throw-away keyspace (same replication as the product's) the probe runs, with
``concurrency`` requests in flight (chains of ``execute_async`` callbacks, no
thread per request):

* plain writes: ``INSERT`` of a row with a payload of the benchmark's size;
* conditional writes (LWT) in the mix one task needs: ``INSERT … IF NOT
  EXISTS``, then ``UPDATE … IF status = ? AND token = ?`` twice (claim,
  complete), each key's three writes in order, many keys at once.

Requests answered after a short warm-up and before the end count.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from leasesched.config import Config
from leasesched.store.cassandra import CAS_PROFILE, new_cluster, replication_cql


@dataclass
class ProbeResult:
    kind: str
    ok: int
    errors: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.errors, "seconds": round(self.seconds, 2), "per_s": round(self.per_s, 1)}


class _Chains:
    """``concurrency`` independent request chains; each callback sends the chain's next request."""

    def __init__(self, session: Any, step: Callable[[int, int], tuple[Any, tuple[Any, ...], str]], concurrency: int,
                 warmup_s: float, seconds: float) -> None:  # fmt: skip
        self._session = session
        self._step = step  # (chain, n) -> (statement, params, execution profile)
        self._concurrency = concurrency
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._live = concurrency
        now = time.monotonic()
        self.count_from = now + warmup_s
        self.end = self.count_from + seconds
        self.ok = 0
        self.errors = 0

    def run(self) -> None:
        for chain in range(self._concurrency):
            self._send(chain, 0)
        self._done.wait(timeout=(self.end - time.monotonic()) + 30)

    def _send(self, chain: int, n: int) -> None:
        if time.monotonic() >= self.end:
            with self._lock:
                self._live -= 1
                if self._live == 0:
                    self._done.set()
            return
        stmt, params, profile = self._step(chain, n)
        future = self._session.execute_async(stmt, params, execution_profile=profile)
        future.add_callbacks(self._on_ok, self._on_err, callback_args=(chain, n), errback_args=(chain, n))

    def _count(self, ok: bool) -> None:
        now = time.monotonic()
        if self.count_from <= now < self.end:
            with self._lock:
                if ok:
                    self.ok += 1
                else:
                    self.errors += 1

    def _on_ok(self, _rows: Any, chain: int, n: int) -> None:
        self._count(True)
        self._send(chain, n + 1)

    def _on_err(self, _exc: BaseException, chain: int, n: int) -> None:
        self._count(False)
        self._send(chain, n + 1)


def probe(cfg: Config, seconds: float = 5.0, concurrency: int = 128, payload_bytes: int = 256, warmup_s: float = 1.0) -> dict[str, Any]:
    """Plain and LWT writes per second; the throw-away keyspace is dropped afterwards."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT

    keyspace = f"lsprobe_{uuid.uuid4().hex[:12]}"
    cluster = new_cluster(cfg)
    session = cluster.connect()
    try:
        session.execute(f"CREATE KEYSPACE {keyspace} WITH replication = {replication_cql(cfg.replication_spec)}", timeout=60)
        session.execute(f"CREATE TABLE {keyspace}.plain (id uuid PRIMARY KEY, n int, payload blob)", timeout=60)
        session.execute(f"CREATE TABLE {keyspace}.cas (id uuid PRIMARY KEY, status text, tok bigint, payload blob)", timeout=60)
        cluster.control_connection.wait_for_schema_agreement()
        plain = session.prepare(f"INSERT INTO {keyspace}.plain (id, n, payload) VALUES (?, ?, ?)")
        create = session.prepare(f"INSERT INTO {keyspace}.cas (id, status, tok, payload) VALUES (?, 'S', 0, ?) IF NOT EXISTS")
        move = session.prepare(f"UPDATE {keyspace}.cas SET status = ?, tok = ? WHERE id = ? IF status = ? AND tok = ?")
        for stmt in (create, move):
            stmt.is_idempotent = False
        payload = b"x" * payload_bytes

        def plain_step(chain: int, n: int) -> tuple[Any, tuple[Any, ...], str]:
            return plain, (uuid.uuid4(), n, payload), EXEC_PROFILE_DEFAULT

        keys: dict[int, uuid.UUID] = {}

        def cas_step(chain: int, n: int) -> tuple[Any, tuple[Any, ...], str]:
            phase = n % 3
            if phase == 0:
                keys[chain] = uuid.uuid4()
                return create, (keys[chain], payload), CAS_PROFILE
            if phase == 1:
                return move, ("R", 1, keys[chain], "S", 0), CAS_PROFILE
            return move, ("D", 1, keys[chain], "R", 1), CAS_PROFILE

        results = {}
        for kind, step in (("plain_writes", plain_step), ("lwt_writes", cas_step)):
            chains = _Chains(session, step, concurrency, warmup_s, seconds)
            chains.run()
            results[kind] = ProbeResult(kind, chains.ok, chains.errors, seconds).as_dict()
        return {
            "seconds_each": seconds,
            "concurrency": concurrency,
            "payload_bytes": payload_bytes,
            "lwt_mix": "1 INSERT IF NOT EXISTS : 2 UPDATE IF status AND token (a task's create, claim, complete)",
            **results,
        }
    finally:
        try:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass
        cluster.shutdown()
