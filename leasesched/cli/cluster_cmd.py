"""``leasesched cluster status``: who owns which shards, which workers hold
which leases, and how many tasks are in each status.

It reads ZooKeeper and Cassandra directly, not through a service, so it
checks the caller itself: with auth on, only an **admin** token may run it
(``LEASESCHED_TOKEN``), verified against the token store the way the
services verify one (``leasesched.auth.Authenticator``). What it shows spans
every namespace (workers, their task types and lease tokens, task counts),
which a client or worker token, confined to one namespace, may not see.
Anything else is refused with one line and exit status 1 before ZooKeeper
or the tasks are read. (Whoever can reach ZooKeeper and Cassandra with their
credentials can read them anyway: this check keeps the command honest, the
network and the stores' own access control protect the data.)"""

from __future__ import annotations

import asyncio
import json

import click

from leasesched.auth import Authenticator, Principal
from leasesched.config import Config
from leasesched.coordination import cluster_meta, registry, zk
from leasesched.errors import SchedulerError

STATUS_ROLE = "admin"


def _ranges(shards: list[int]) -> str:
    """[0,1,2,5,7,8] → '0-2,5,7-8'."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive shards
    for s in sorted(shards):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs) or "-"


def require_admin(cfg: Config) -> Principal | None:
    """The caller's principal when auth is on and ``cfg.token`` is a valid admin
    token; None when auth is off; ``click.ClickException`` (exit 1) otherwise."""
    from leasesched.store.cassandra import CassandraStore, TaskCounts

    if cfg.auth == "off":
        return None
    if cfg.auth != "on":
        raise click.ClickException(f"auth must be 'on' or 'off', not {cfg.auth!r}")
    if not cfg.token:
        raise click.ClickException(f"cluster status needs an {STATUS_ROLE} token: set LEASESCHED_TOKEN (auth is on)")

    async def check() -> Principal:
        store = CassandraStore(cfg)
        try:
            await store.connect()
            return await Authenticator(store, cache_s=0).authenticate(f"Bearer {cfg.token}")
        finally:
            await store.close()

    try:
        principal = asyncio.run(check())
    except SchedulerError as exc:  # unknown, revoked or malformed token; store unavailable
        raise click.ClickException(f"cluster status refused: {exc} (it needs an {STATUS_ROLE} token in LEASESCHED_TOKEN)") from None
    except Exception as exc:  # noqa: BLE001 - Cassandra unreachable: fail closed, in one line
        raise click.ClickException(f"cluster status: cannot check the token against the store: {exc}") from None
    if principal.role != STATUS_ROLE:
        raise click.ClickException(
            f"cluster status refused: LEASESCHED_TOKEN is a {principal.role} token of namespace {principal.namespace!r}; "
            f"it needs an {STATUS_ROLE} token (it shows every namespace)"
        )
    return principal


@click.group()
def cluster() -> None:
    """Cluster-wide views."""


@cluster.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--count-limit", type=int, default=100_000, show_default=True, help="Rows read to count tasks by status.")
@click.pass_obj
def status(cfg: Config, as_json: bool, count_limit: int) -> None:
    """Triggers and their shards, services, workers and their leases, tasks by status.

    With auth on it needs an admin token (LEASESCHED_TOKEN), checked against
    the token store: it shows every namespace. Any other token, or none, is
    refused with one line and exit status 1.
    """
    from leasesched.store.cassandra import CassandraStore, TaskCounts

    require_admin(cfg)
    client = zk.connect(cfg)
    try:
        meta = cluster_meta.ensure(client, cfg)
        roles = {role: registry.members(client, cfg.zk_root, role) for role in ("task-service", "task-updater", "trigger", "worker")}
    finally:
        client.stop()
        client.close()

    async def count() -> TaskCounts:
        store = CassandraStore(cfg)
        try:
            await store.connect()
            return await store.count_tasks(count_limit)
        finally:
            await store.close()

    unserved: dict[str, int] = {}  # "namespace/type" → SCHEDULED tasks no registered worker serves
    try:
        found = asyncio.run(count())
        counts: dict[str, int] | str = found.by_status
        served = {(d.get("namespace"), t) for d in roles["worker"].values() for t in d.get("types", [])}
        unserved = {f"{ns}/{t}": n for (ns, t), n in sorted(found.scheduled_by_type.items()) if (ns, t) not in served}
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
        "scheduled_without_worker": unserved,
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
    for group, n in unserved.items():
        click.echo(f"  NO WORKER for {group}: {n} SCHEDULED task(s) wait until one subscribes")


def register(cli: click.Group) -> None:
    cli.add_command(cluster)
