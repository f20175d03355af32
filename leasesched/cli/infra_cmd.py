"""`leasesched infra up|down|status`: the local Cassandra and ZooKeeper.

Ports and folders come from the Config (``--home``, LEASESCHED_CASSANDRA_PORT,
LEASESCHED_CASSANDRA_STORAGE_PORT, LEASESCHED_ZK_HOSTS, ...), the same values
the scheduler processes read, so `infra up` starts the servers exactly where
they will connect. ``--cassandra-nodes 3 --zk-nodes 3`` (or
LEASESCHED_CASSANDRA_NODES / LEASESCHED_ZK_NODES) makes it a replicated local
cluster: node n on 127.0.0.n. The processes need the same two settings (they
decide the contact points, the ZooKeeper connection string and the keyspace's
replication), so export them rather than passing the flags.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from leasesched.config import Config
from leasesched.infra.local import LocalInfra
from leasesched.infra.process import InfraError, ServerStatus


def register(cli: click.Group) -> None:
    cli.add_command(infra)


@click.group()
def infra() -> None:
    """Install, start and stop the local Cassandra and ZooKeeper."""


def _shape(command: Callable[..., Any]) -> Callable[..., Any]:
    """The cluster-shape options every infra command takes (they must agree)."""
    command = click.option(
        "--zk-nodes", type=int, default=None, help="ZooKeeper servers: 1, or an odd ensemble size (LEASESCHED_ZK_NODES)."
    )(command)
    return click.option(
        "--cassandra-nodes", type=int, default=None, help="Cassandra nodes, node n on 127.0.0.n (LEASESCHED_CASSANDRA_NODES)."
    )(command)


def _local(cfg: Config, cassandra_nodes: int | None, zk_nodes: int | None) -> LocalInfra:
    cfg = cfg.with_overrides(cassandra_nodes=cassandra_nodes, zk_nodes=zk_nodes)  # flags not given are None: kept
    try:
        return LocalInfra.from_config(cfg)
    except InfraError as exc:
        raise click.UsageError(str(exc)) from exc


@infra.command()
@click.option("--timeout", type=float, default=None, help="Seconds to wait for each server (default from config).")
@_shape
@click.pass_obj
def up(cfg: Config, timeout: float | None, cassandra_nodes: int | None, zk_nodes: int | None) -> None:
    """Install (first time only) and start every server; wait until they answer.

    Servers that are already running are left alone and only checked.
    """
    _show_progress()
    local = _local(cfg, cassandra_nodes, zk_nodes)
    try:
        results = local.up(timeout)
    except InfraError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in results:
        what = f"started, ready in {r.seconds:.1f} s" if r.started else "already running, ready"
        click.echo(f"{r.name}: {what}")
    statuses = local.status()
    _print_status(statuses)
    _print_quorums(local, statuses)
    shaped = local.config
    click.echo(
        f"CQL: {', '.join(f'{h}:{shaped.cassandra_port}' for h in shaped.cassandra_contact_points)}   "
        f"ZooKeeper: {shaped.zk_connection}   replication: {shaped.replication_spec}"
    )
    if shaped.cassandra_nodes > 1 or shaped.zk_nodes > 1:
        click.echo(
            "the scheduler's processes must know the shape too:\n"
            f"    export LEASESCHED_CASSANDRA_NODES={shaped.cassandra_nodes} LEASESCHED_ZK_NODES={shaped.zk_nodes}"
        )


@infra.command()
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds before SIGKILL.")
@_shape
@click.pass_obj
def down(cfg: Config, timeout: float, cassandra_nodes: int | None, zk_nodes: int | None) -> None:
    """Stop every server. Their data stays in the home folder."""
    _show_progress()
    stopped = _local(cfg, cassandra_nodes, zk_nodes).down(timeout)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@infra.command()
@_shape
@click.pass_obj
def status(cfg: Config, cassandra_nodes: int | None, zk_nodes: int | None) -> None:
    """Show whether each server is running, its PID, address and log, and
    whether Cassandra and ZooKeeper have a quorum.

    Exit status 0 only if every server is running, 3 otherwise (as LSB status does).
    """
    local = _local(cfg, cassandra_nodes, zk_nodes)
    statuses = local.status()
    _print_status(statuses)
    _print_quorums(local, statuses)
    if not all(s.running for s in statuses):
        sys.exit(3)


def _print_status(statuses: list[ServerStatus]) -> None:
    for s in statuses:
        if s.running:
            state = "paused" if s.paused else ("running" if s.listening else "starting")
        else:
            state = "stopped" if not s.listening else "port busy"  # someone else listens there
        pid = f"pid {s.pid}" if s.pid is not None else "-"
        role = f" ({s.role})" if s.role else ""
        click.echo(f"{s.name:<12} {state + role:<20} {pid:<11} {s.host}:{s.port:<6} log {s.log_file}")


def _print_quorums(local: LocalInfra, statuses: list[ServerStatus]) -> None:
    for q in local.quorums(statuses):
        verdict = "quorum" if q.has_quorum else "NO QUORUM"
        click.echo(f"{q.name}: {q.up} of {q.size} up: {verdict}")


def _show_progress() -> None:
    """Show the infra modules' INFO messages (downloads, starts) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("leasesched.infra")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
