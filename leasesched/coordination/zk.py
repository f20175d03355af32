"""ZooKeeper client set-up shared by every process."""

from __future__ import annotations

import logging

from kazoo.client import KazooClient
from kazoo.retry import KazooRetry

from leasesched.config import Config
from leasesched.errors import Unavailable

log = logging.getLogger(__name__)


def connect(cfg: Config, timeout_s: float = 15.0) -> KazooClient:
    """A started client; kazoo reconnects by itself after this (retry forever)."""
    client = KazooClient(
        hosts=cfg.zk_connection,
        timeout=cfg.zk_session_timeout_s,
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=2.0),
        command_retry=KazooRetry(max_tries=5, delay=0.1, max_delay=1.0),
    )
    try:
        client.start(timeout=timeout_s)
    except Exception as exc:  # kazoo raises its own timeout type
        client.stop()
        client.close()
        raise Unavailable(f"ZooKeeper at {cfg.zk_connection} did not answer within {timeout_s:.0f} s: {exc}") from exc
    return client
