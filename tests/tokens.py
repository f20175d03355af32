"""Bearer tokens for tests that run with auth on: made the way
``leasesched token create`` makes them, written straight to the store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from leasesched.auth import new_token
from leasesched.config import Config
from leasesched.store.cassandra import CassandraStore


def issue_tokens(cfg: Config, wanted: Sequence[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """One token per (namespace, role, name): [(plaintext, token id)], in order."""

    async def run() -> list[tuple[str, str]]:
        store = CassandraStore(cfg)
        await store.connect()
        try:
            made = []
            for namespace, role, name in wanted:
                plaintext, record = new_token(namespace, role, name)
                await store.put_token(record)
                made.append((plaintext, record.token_id))
            return made
        finally:
            await store.close()

    return asyncio.run(run())
