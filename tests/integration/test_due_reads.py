"""Reads of the due index on the real Cassandra: a trigger's scan sees every
entry of its window, however many (the driver hands an answer over in pages
of 5,000 rows; a scan that kept only the first page skipped the rest of a
flood for good: they fell out of the re-read window before any pass saw
them)."""

from __future__ import annotations

import asyncio
import uuid

from leasesched.config import Config
from leasesched.model import DueEntry, now_ms
from leasesched.store.cassandra import CassandraStore

FLOOD = 5_300  # over the driver's page of 5,000 rows


def test_a_scan_reads_every_entry_of_a_flood_in_one_shard(module_config: Config) -> None:
    async def run() -> None:
        store = CassandraStore(module_config)
        await store.connect()
        try:
            bucket_s = module_config.due_bucket_s
            due_at = (now_ms() // (bucket_s * 1000)) * bucket_s * 1000 + 1_000  # one bucket, one partition
            written = {uuid.uuid4() for _ in range(FLOOD)}
            pending = list(written)
            while pending:
                chunk, pending = pending[:200], pending[200:]
                await asyncio.gather(
                    *(store.add_due(DueEntry(shard=7, due_at=due_at, task_id=t, kind=DueEntry.RUN)) for t in chunk)
                )
            entries = await store.read_due(7, due_at - 1_000, due_at + 1_000, bucket_s)
            assert len(entries) == FLOOD
            assert {e.task_id for e in entries} == written
            assert await store.read_due(8, due_at - 1_000, due_at + 1_000, bucket_s) == []
        finally:
            await store.close()

    asyncio.run(run())
