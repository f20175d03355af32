"""`leasesched infra up|down|status`: the local Cassandra and ZooKeeper.

Ports and folders come from the Config (``--home``, LEASESCHED_CASSANDRA_PORT,
LEASESCHED_CASSANDRA_STORAGE_PORT, LEASESCHED_ZK_HOSTS, ...), the same values
the scheduler processes read, so `infra up` starts the servers exactly where
they will connect.
"""

from __future__ import annotations

import logging
import sys

import click

from leasesched.config import Config
from leasesched.infra.local import LocalInfra
from leasesched.infra.process import InfraError, ServerStatus


def register(cli: click.Group) -> None:
    cli.add_command(infra)


@click.group()
def infra() -> None:
    """Install, start and stop the local Cassandra and ZooKeeper."""


@infra.command()
@click.option("--timeout", type=float, default=None, help="Seconds to wait for each server (default from config).")
@click.pass_obj
def up(cfg: Config, timeout: float | None) -> None:
    """Install (first time only) and start both servers; wait until they answer.

    Servers that are already running are left alone and only checked.
    """
    _show_progress()
    local = LocalInfra.from_config(cfg)
    try:
        results = local.up(timeout)
    except InfraError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in results:
        what = f"started, ready in {r.seconds:.1f} s" if r.started else "already running, ready"
        click.echo(f"{r.name}: {what}")
    _print_status(local.status())
    click.echo(f"CQL: 127.0.0.1:{cfg.cassandra_port}   ZooKeeper: {local.zookeeper.hosts}")


@infra.command()
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds before SIGKILL.")
@click.pass_obj
def down(cfg: Config, timeout: float) -> None:
    """Stop both servers. Their data stays in the home folder."""
    _show_progress()
    stopped = LocalInfra.from_config(cfg).down(timeout)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@infra.command()
@click.pass_obj
def status(cfg: Config) -> None:
    """Show whether each server is running, its PID, port and log.

    Exit status 0 only if both are running, 3 otherwise (as LSB status does).
    """
    statuses = LocalInfra.from_config(cfg).status()
    _print_status(statuses)
    if not all(s.running for s in statuses):
        sys.exit(3)


def _print_status(statuses: list[ServerStatus]) -> None:
    for s in statuses:
        if s.running:
            state = "paused" if s.paused else ("running" if s.listening else "starting")
        else:
            state = "stopped" if not s.listening else "port busy"  # someone else listens there
        pid = f"pid {s.pid}" if s.pid is not None else "-"
        click.echo(f"{s.name:<10} {state:<10} {pid:<11} port {s.port:<6} log {s.log_file}")


def _show_progress() -> None:
    """Show the infra modules' INFO messages (downloads, starts) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("leasesched.infra")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
