"""``leasesched dashboard``: the web dashboard (services/dashboard, docs/dashboard.md).

It serves HTTP on ``--host``/``--port`` and talks to TaskService at
``--target`` (default: the configuration's TaskService address) with the token
each person logs in with; it needs no token of its own. ZooKeeper's address
(for the admin-only cluster page) comes from the configuration too.
"""

from __future__ import annotations

import os

import click

from leasesched.config import Config

SECRET_ENV = "LEASESCHED_DASHBOARD_SECRET"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface; use TLS in front).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: LEASESCHED_DASHBOARD_PORT, 8080).")
@click.option("--target", default=None, help="TaskService host:port (default: the configuration's).")
@click.option("--namespace", default="default", show_default=True, help="The login form's default namespace.")
@click.option("--https-only", is_flag=True, help="Mark the session cookie Secure (behind an HTTPS proxy).")
@click.pass_obj
def dashboard(cfg: Config, host: str, port: int | None, target: str | None, namespace: str, https_only: bool) -> None:
    """Serve the web dashboard. The session cookie is signed with LEASESCHED_DASHBOARD_SECRET
    (a random key when unset: sessions then end with the process, which they do anyway)."""
    from services.dashboard.app import DashboardConfig
    from services.dashboard.server import uvicorn_server

    config = DashboardConfig(
        target=target or cfg.task_service_target, cfg=cfg, session_secret=os.environ.get(SECRET_ENV, ""),
        default_namespace=namespace, https_only=https_only,
    )  # fmt: skip
    port = cfg.dashboard_port if port is None else port
    click.echo(f"dashboard: http://{host}:{port}/ (TaskService {config.target})")
    uvicorn_server(config, host, port).run()


def register(cli: click.Group) -> None:
    cli.add_command(dashboard)
