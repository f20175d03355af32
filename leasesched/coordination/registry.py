"""Service discovery through ZooKeeper: each process registers its gRPC address
as an ephemeral node, so it disappears by itself when the process dies or its
session expires, and clients find live processes without configuration.

Layout: ``<root>/services/<role>/<address>`` with a small JSON body.
"""

from __future__ import annotations

import json
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError, NodeExistsError


def role_path(root: str, role: str) -> str:
    return f"{root}/services/{role}"


def register(zk: KazooClient, root: str, role: str, address: str, data: dict[str, Any] | None = None) -> str:
    base = role_path(root, role)
    zk.ensure_path(base)
    path = f"{base}/{address}"
    body = json.dumps(data or {}).encode()
    try:
        zk.create(path, body, ephemeral=True)
    except NodeExistsError:
        # A previous session of ours that has not expired yet: take it over.
        zk.delete(path)
        zk.create(path, body, ephemeral=True)
    return path


def update(zk: KazooClient, path: str, data: dict[str, Any]) -> None:
    zk.set(path, json.dumps(data).encode())


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
