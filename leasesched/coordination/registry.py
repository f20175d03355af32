"""Service discovery through ZooKeeper: each process registers its gRPC address
as an ephemeral node, so it disappears by itself when the process dies or its
session expires, and clients find live processes without configuration.

Layout: ``<root>/services/<role>/<address>`` with a small JSON body.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError, NodeExistsError
from kazoo.protocol.states import KazooState

log = logging.getLogger(__name__)


def role_path(root: str, role: str) -> str:
    return f"{root}/services/{role}"


class Registration:
    """An ephemeral registration that comes back after a lost session.

    Ephemeral nodes die with their session; when kazoo reconnects with a new
    session, the node is created again with the latest data.
    """

    def __init__(self, zk: KazooClient, root: str, role: str, address: str, data: dict[str, Any] | None = None) -> None:
        self._zk = zk
        self.path = f"{role_path(root, role)}/{address}"
        self._data = data or {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> "Registration":
        self._write()
        self._zk.add_listener(self._on_state)
        return self

    def update(self, data: dict[str, Any]) -> None:
        with self._lock:
            self._data = data
        try:
            self._zk.set(self.path, json.dumps(data).encode())
        except NoNodeError:
            self._write()

    def close(self) -> None:
        self._closed = True
        self._zk.remove_listener(self._on_state)
        try:
            self._zk.delete(self.path)
        except Exception:  # noqa: BLE001 - ephemeral: it goes with the session anyway
            pass

    def _write(self) -> None:
        with self._lock:
            body = json.dumps(self._data).encode()
        self._zk.ensure_path(self.path.rsplit("/", 1)[0])
        try:
            self._zk.create(self.path, body, ephemeral=True)
        except NodeExistsError:
            # Left by an older session of ours that has not expired yet: replace it.
            self._zk.delete(self.path)
            self._zk.create(self.path, body, ephemeral=True)

    def _on_state(self, state: KazooState) -> None:
        if state == KazooState.CONNECTED and not self._closed:
            # Listeners must not block kazoo's thread.
            self._zk.handler.spawn(self._restore)

    def _restore(self) -> None:
        try:
            if self._zk.exists(self.path) is None and not self._closed:
                self._write()
                log.info("re-registered %s after a new ZooKeeper session", self.path)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not re-register %s: %s", self.path, exc)


def members(zk: KazooClient, root: str, role: str) -> dict[str, dict[str, Any]]:
    """address → registration data of every live process of ``role``."""
    base = role_path(root, role)
    try:
        children = zk.get_children(base)
    except NoNodeError:
        return {}
    found = {}
    for child in children:
        try:
            data, _ = zk.get(f"{base}/{child}")
        except NoNodeError:
            continue  # it went away while we looked
        found[child] = json.loads(data or b"{}")
    return found
