"""``leasesched cluster status``: who owns which shards, which workers hold
which leases, and how many tasks are in each status."""

from __future__ import annotations

import asyncio
import json

import click

from leasesched.config import Config
from leasesched.coordination import cluster_meta, registry, zk


def _ranges(shards: list[int]) -> str:
    """[0,1,2,5,7,8] → '0-2,5,7-8'."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive shards
    for s in sorted(shards):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs) or "-"


@click.group()
def cluster() -> None:
    """Cluster-wide views."""


@cluster.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--count-limit", type=int, default=100_000, show_default=True, help="Rows read to count tasks by status.")
@click.pass_obj
def status(cfg: Config, as_json: bool, count_limit: int) -> None:
    """Triggers and their shards, services, workers and their leases, tasks by status."""
    from leasesched.store.cassandra import CassandraStore

    client = zk.connect(cfg)
    try:
        meta = cluster_meta.ensure(client, cfg)
        roles = {role: registry.members(client, cfg.zk_root, role) for role in ("task-service", "task-updater", "trigger", "worker")}
    finally:
        client.stop()
        client.close()

    async def count() -> dict[str, int]:
        store = CassandraStore(cfg)
        try:
            await store.connect()
            return await store.count_by_status(count_limit)
        finally:
            await store.close()

    try:
        counts: dict[str, int] | str = asyncio.run(count())
    except Exception as exc:  # noqa: BLE001 - show what we can
        counts = f"unavailable: {exc}"
    owned = sorted(s for data in roles["trigger"].values() for s in data.get("shards", []))
    without_owner = sorted(set(range(meta.logical_shards)) - set(owned))
    report = {
        "logical_shards": meta.logical_shards,
        "shards_owned": len(set(owned)),
        "shards_without_owner": without_owner,
        "services": roles,
        "tasks_by_status": counts,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"logical shards: {meta.logical_shards}, owned: {report['shards_owned']}")
    if without_owner:
        click.echo(f"  WITHOUT OWNER: {_ranges(without_owner)}")
    for address, data in sorted(roles["trigger"].items()):
        shards, workers = data.get("shards", []), data.get("workers", [])
        click.echo(f"trigger {address}: {len(shards)} shards ({_ranges(shards)}), {len(workers)} workers subscribed")
    for role in ("task-service", "task-updater"):
        for address in sorted(roles[role]):
            click.echo(f"{role} {address}")
    for worker_id, data in sorted(roles["worker"].items()):
        click.echo(f"worker {worker_id}: {data.get('busy', 0)}/{data.get('slots', 0)} slots busy, types {data.get('types')}")
        for task_id, token in data.get("leases", []):
            click.echo(f"    lease {task_id} token {token}")
    if isinstance(counts, str):
        click.echo(f"tasks: {counts}")
    else:
        click.echo("tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "tasks: none")


def register(cli: click.Group) -> None:
    cli.add_command(cluster)
