"""Commands that run one leasesched process each, and the schema migrator."""

from __future__ import annotations

import logging
from typing import Any

import click

from leasesched import event_loop
from leasesched.config import Config
from leasesched.observability.setup import setup_process


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    logging.getLogger("kazoo").setLevel(logging.WARNING)


def observability_options(command: Any) -> Any:
    """``--metrics-port`` and ``--log-format``, shared by every process command."""
    command = click.option(
        "--metrics-port", type=int, default=None,
        help="Serve Prometheus /metrics on this port (default: config metrics_port; 0 = off).",
    )(command)  # fmt: skip
    return click.option(
        "--log-format", type=click.Choice(["json", "text"]), default=None,
        help="Log one JSON object per line, or text (default: config log_format, json).",
    )(command)  # fmt: skip


@click.command("task-service")
@click.option("--port", type=int, default=None, help="Port to serve on (default from config; 0 = any).")
@observability_options
@click.pass_obj
def task_service(cfg: Config, port: int | None, log_format: str | None, metrics_port: int | None) -> None:
    """Run the TaskService (user API) until SIGTERM/SIGINT."""
    from services.main import serve

    setup_process(cfg, "task-service", log_format, metrics_port)
    event_loop.run(serve(cfg, "task-service", cfg.task_service_port if port is None else port), cfg)


@click.command("task-updater")
@click.option("--port", type=int, default=None, help="Port to serve on (default from config; 0 = any).")
@observability_options
@click.pass_obj
def task_updater(cfg: Config, port: int | None, log_format: str | None, metrics_port: int | None) -> None:
    """Run the TaskUpdater (worker API) until SIGTERM/SIGINT."""
    from services.main import serve

    setup_process(cfg, "task-updater", log_format, metrics_port)
    event_loop.run(serve(cfg, "task-updater", cfg.task_updater_port if port is None else port), cfg)


@click.command("trigger")
@click.option("--port", type=int, default=None, help="Port to serve on (default from config; 0 = any).")
@observability_options
@click.pass_obj
def trigger(cfg: Config, port: int | None, log_format: str | None, metrics_port: int | None) -> None:
    """Run a trigger: owns shards through ZooKeeper, dispatches due tasks."""
    from trigger.main import serve

    setup_process(cfg, "trigger", log_format, metrics_port)
    event_loop.run(serve(cfg, cfg.trigger_port if port is None else port), cfg)


@click.command("worker")
@click.option("--module", "-m", default=None, help="Module with a `handlers` object (module or module:attribute).")
@click.option("--slots", type=int, default=4, show_default=True, help="Tasks run at once.")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True, help="Seconds to finish work on SIGTERM.")
@click.option("--ledger", default=None, help="Append accepted completions to this JSON-lines file.")
@click.option("--webhook", is_flag=True, help="Also serve task type `webhook` (signed HTTP POSTs; docs/webhooks.md).")
@click.option(
    "--webhook-secret-file", default=None, type=click.Path(exists=True, dir_okay=False),
    help="File holding the namespace's whsec_ signing secret (default: config webhook_secret).",
)  # fmt: skip
@click.option(
    "--webhook-allow", default=None,
    help="Comma-separated CIDRs webhooks may call although not public (default: config webhook_allow).",
)  # fmt: skip
@click.option(
    "--namespace", default=None,
    help="With --webhook and no --module: the namespace served (default: default).",
)  # fmt: skip
@observability_options
@click.pass_obj
def worker(
    cfg: Config, module: str | None, slots: int, drain_timeout: float, ledger: str | None, webhook: bool,
    webhook_secret_file: str | None, webhook_allow: str | None, namespace: str | None,
    log_format: str | None, metrics_port: int | None,
) -> None:  # fmt: skip
    """Run a worker with the handlers of MODULE (and/or the built-in webhook handler).

    Needs a token of role worker for the handlers' namespace (LEASESCHED_TOKEN).
    Exit status: 0 after SIGTERM/SIGINT; 75 fail-stop (restart it); 77 its
    credentials were refused for good (fix the token; see docs/operations.md).
    """
    import sys

    from worker.runner import serve
    from worker.webhook import WebhookSettings

    if slots < 1:
        raise click.BadParameter("must be at least 1", param_hint="--slots")
    if module is None and not webhook:
        raise click.UsageError("give --module (your handlers), --webhook (the built-in webhook handler), or both")
    if namespace is not None and module is not None:
        raise click.UsageError("--namespace is for a webhook-only worker; with --module, the handlers name it")
    settings = None
    if webhook:
        try:  # refuse to start without a usable secret, before connecting anywhere
            settings = WebhookSettings.from_config(cfg, webhook_secret_file, webhook_allow)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    elif webhook_secret_file or webhook_allow:
        raise click.UsageError("--webhook-secret-file and --webhook-allow need --webhook")
    sys.path.insert(0, ".")  # handler modules live in the user's project
    setup_process(cfg, "worker", log_format, metrics_port)
    status = event_loop.run(serve(cfg, module, slots, drain_timeout, ledger, settings, namespace or "default"), cfg)
    if status:
        sys.exit(status)


@click.group()
def schema() -> None:
    """Cassandra schema migrations."""


@schema.command("apply")
@click.pass_obj
def schema_apply(cfg: Config) -> None:
    """Create the keyspace and apply missing migrations (idempotent)."""
    from leasesched.store import schema as schema_mod

    applied = schema_mod.apply(cfg)
    if applied:
        for m in applied:
            click.echo(f"applied {m.version:03d}_{m.name}")
    else:
        click.echo(f"schema of keyspace {cfg.keyspace!r} is up to date")


def register(cli: click.Group) -> None:
    cli.add_command(task_service)
    cli.add_command(task_updater)
    cli.add_command(trigger)
    cli.add_command(worker)
    cli.add_command(schema)
