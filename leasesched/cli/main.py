"""The ``leasesched`` command: one entry point, one sub-command module per area."""

from __future__ import annotations

import click

from leasesched.config import Config


@click.group()
@click.option("--home", default=None, help="Folder for local state (default ./.leasesched, env LEASESCHED_HOME).")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """leasesched: a lease-based distributed task scheduler."""
    try:
        ctx.obj = Config.from_env(home=home)
    except ValueError as exc:  # a LEASESCHED_* variable that does not parse: one line, exit 2
        raise ConfigError(str(exc)) from None


class ConfigError(click.ClickException):
    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(f"bad configuration: {message}")


def _register() -> None:
    # Imported here so that `leasesched --help` lists every area in one place.
    from leasesched.cli import (
        cluster_cmd, dashboard_cmd, gate_cmd, infra_cmd, limit_cmd, local_cmd, process_cmd, schedule_cmd, task_cmd,
        token_cmd,
    )  # fmt: skip

    for module in (
        infra_cmd, process_cmd, task_cmd, schedule_cmd, gate_cmd, limit_cmd, local_cmd, cluster_cmd, token_cmd, dashboard_cmd,
    ):  # fmt: skip
        module.register(cli)
    from leasesched.cli import loadtest_cmd  # issue 4: `leasesched loadtest`

    loadtest_cmd.register(cli)


def main() -> None:
    _register()
    cli()


if __name__ == "__main__":
    main()
