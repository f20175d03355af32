"""The tokens of a local development cluster (``leasesched local up``, the load test).

Kept in the core (not in the CLI) because the load harness needs them too.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from leasesched.auth import new_token, parse
from leasesched.config import Config
from leasesched.store.cassandra import CassandraStore


def local_tokens(cfg: Config) -> dict[str, str]:
    """role → token for the local cluster, created once and kept in <home>/tokens.json.

    Local development only: the file holds secrets, inside the git-ignored
    state folder. Tokens missing from the store (a fresh keyspace) are made anew.
    """
    path = Path(cfg.home) / "tokens.json"
    saved: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    async def ensure() -> dict[str, str]:
        store = CassandraStore(cfg)
        await store.connect()
        try:
            tokens: dict[str, str] = {}
            for role in ("admin", "worker", "client"):
                plaintext = saved.get(role, "")
                record = await store.get_token(parse(plaintext)[0]) if plaintext else None
                if record is None or record.revoked:
                    plaintext, record = new_token("default", role, name=f"local {role}")
                    await store.put_token(record)
                tokens[role] = plaintext
            return tokens
        finally:
            await store.close()

    tokens = asyncio.run(ensure())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tokens))
    path.chmod(0o600)
    return tokens
