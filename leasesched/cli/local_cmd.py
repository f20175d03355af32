"""``leasesched local up``: the whole system on one machine, under one supervisor.

Starts Cassandra and ZooKeeper (``infra up``), applies the schema, then runs
TaskService, TaskUpdater, two triggers, two demo workers and the web dashboard
(``leasesched dashboard``, its URL printed) under a small
supervisor (leasesched/infra/supervisor.py), which prefixes each process's
output with its name, restarts a process that fails (a worker that ended
itself with exit code 75 to keep the at-most-one guarantee, a crashed
service) after a backoff of 1 s doubling to 30 s, and stops them all on
Ctrl-C. A short demo waits until the system is ready — the same waits the
tests and the load test use (``leasesched.testing``: TaskService SERVING,
every shard owned by exactly one trigger, every worker subscribed to every
trigger) — then schedules a task and follows it to the end, so a newcomer
sees the system work. The command lines of the programs are built by the
same harness, so they are the commands the tests run.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import click

from leasesched.config import Config
from leasesched.infra.tokens import local_tokens
from leasesched.testing import ProcessError, server_args, wait_ready, wait_serving, worker_args
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc


READY_TIMEOUT_S = 60.0


def token_banner(tokens: dict[str, str], path: Path, exe: str = "leasesched") -> str:
    """What ``local up`` prints: each token and which process needs it.

    A worker started with the client token is refused (it needs role worker)
    and exits with code 77; the task commands need the client token;
    ``cluster status`` is for admins."""
    return (
        f"\ntokens for namespace 'default' (kept in {path}):\n"
        f"    client token: {tokens['client']}\n"
        f"    worker token: {tokens['worker']}\n"
        f"    admin token:  {tokens['admin']}\n"
        "which process needs which: the CLI's task commands and your clients (TaskService) need the client token; "
        "a worker (leasesched worker --module ...) needs the worker token; cluster status and the services need the admin token.\n"
        f"    export LEASESCHED_TOKEN={tokens['client']}                  # this terminal: task schedule / poll / list\n"
        f"    LEASESCHED_TOKEN={tokens['worker']} {exe} worker --module my_handlers   # a worker of your own\n"
    )


def dashboard_url(cfg: Config) -> str:
    """Where ``local up``'s dashboard listens ("" when LEASESCHED_DASHBOARD_PORT=0)."""
    return f"http://127.0.0.1:{cfg.dashboard_port}/" if cfg.dashboard_port else ""


def _demo(cfg: Config, say: Callable[[str], None], admin_token: str = "", triggers: int = 2, workers: int = 2) -> None:
    target = cfg.task_service_target
    try:
        wait_serving(target, cfg, 60)
    except ProcessError:
        say("demo: TaskService did not come up; see the output above")
        return
    # Ready: the triggers have divided the shards and every worker holds a
    # stream to every trigger, so the demo task is dispatched at once.
    try:
        wait_ready(cfg, triggers, workers, READY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - NotReady, or ZooKeeper unreachable: say so, keep running
        say(f"demo: the cluster was not ready within {READY_TIMEOUT_S:.0f} s, no demo task scheduled ({exc}); see the output above")
        return
    with sync_channel(target, cfg) as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        spec = pb.TaskSpec(namespace="default", type="demo.sleep", payload=b"3")
        spec.lease_duration.FromSeconds(3)  # heartbeat (and progress) every second
        reply = stub.ScheduleTask(pb.ScheduleTaskRequest(task=spec), timeout=10)
        say(f"\n=== demo: scheduled demo.sleep task {reply.task_id}; following it ===")
        last = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            task = stub.PollTask(pb.PollTaskRequest(task_id=reply.task_id), timeout=10).task
            state = (task.status, round(task.progress.percent))
            if state != last:
                say(f"=== demo: {pb.TaskStatus.Name(task.status)} {task.progress.percent:.0f}% {task.progress.message}")
                last = state
            if task.status in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
                say(f"=== demo: finished with result {task.result.decode(errors='replace')!r}")
                break
            time.sleep(0.5)
    exe = shlex.quote(str(Path(sys.argv[0])))
    token_hint = f"    export LEASESCHED_TOKEN={cfg.token}   # the client token\n" if cfg.token else ""
    admin_hint = f"LEASESCHED_TOKEN={admin_token} " if admin_token else ""
    url = dashboard_url(cfg)
    dashboard_hint = f"=== dashboard: {url} (log in with the client token: read-only; the admin token: actions, cluster)\n" if url else ""
    say(
        "\n=== leasesched is running. In another terminal try:\n"
        f"{token_hint}"
        f"    {exe} task schedule demo.sleep --payload 5\n"
        f"    {exe} task poll <task id>\n"
        f"    {exe} task list\n"
        f"    {exe} schedule create ticker --every 10s --type demo.echo --payload tick\n"
        f"    {exe} schedule describe ticker   # next fire times, runs, skipped slots\n"
        f"    {admin_hint}{exe} cluster status\n"
        f"{dashboard_hint}"
        "=== Ctrl-C stops every process (Cassandra and ZooKeeper keep running: `leasesched infra down`).\n"
    )


@click.group()
def local() -> None:
    """The whole system on this machine."""


@local.command("up")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--triggers", type=int, default=2, show_default=True)
@click.option("--no-demo", is_flag=True, help="Do not schedule the demo task.")
@click.pass_obj
def up(cfg: Config, workers: int, triggers: int, no_demo: bool) -> None:
    """Start infra, schema and every service; Ctrl-C stops the services."""
    from leasesched.infra.local import LocalInfra
    from leasesched.infra.supervisor import Program, Supervisor
    from leasesched.store import schema

    click.echo("starting Cassandra and ZooKeeper (the first run fetches Cassandra 5.0 from Maven Central, ~1 min) ...")
    LocalInfra.from_config(cfg).up()
    for migration in schema.apply(cfg):
        click.echo(f"applied migration {migration.version:03d}_{migration.name}")
    if cfg.auth == "on":
        tokens = local_tokens(cfg)
        click.echo(token_banner(tokens, Path(cfg.home) / "tokens.json", shlex.quote(str(Path(sys.argv[0])))))
    else:
        tokens = {"admin": "", "worker": "", "client": ""}
        click.echo("auth is OFF (LEASESCHED_AUTH=off): local development only")
    exe = str(Path(sys.argv[0]).resolve())
    service_env = {**os.environ, "LEASESCHED_TOKEN": tokens["admin"]}
    worker_env = {**os.environ, "LEASESCHED_TOKEN": tokens["worker"]}
    base = [exe, "--home", cfg.home]
    programs = [
        Program("task-service", [*base, *server_args("task-service", None, "--log-format", "text")], service_env),
        Program("task-updater", [*base, *server_args("task-updater", None, "--log-format", "text")], service_env),
    ]
    for n in range(triggers):
        port = cfg.trigger_port if n == 0 else 0
        programs.append(Program(f"trigger-{n + 1}", [*base, *server_args("trigger", port, "--log-format", "text")], service_env))
    for n in range(workers):
        command = [*base, *worker_args("worker.demo_handlers", 4, "--log-format", "text")]
        programs.append(Program(f"worker-{n + 1}", command, worker_env))
    if cfg.dashboard_port:
        # The dashboard needs no token of its own: each person logs in with theirs.
        dashboard_env = {k: v for k, v in os.environ.items() if k != "LEASESCHED_TOKEN"}
        programs.append(Program("dashboard", [*base, "dashboard", "--port", str(cfg.dashboard_port)], dashboard_env))
        click.echo(f"dashboard: {dashboard_url(cfg)} (log in with a token above)")
    if not no_demo:
        demo_cfg = cfg.with_overrides(token=tokens["client"])
        threading.Thread(target=_demo, args=(demo_cfg, click.echo, tokens["admin"], triggers, workers), daemon=True).start()
    # Every program is restarted when it fails: workers because fail-stop
    # (exit 75) is part of how they keep the at-most-one guarantee; the
    # services and triggers because they are stateless and a local system
    # that heals itself is what a newcomer expects.
    sys.exit(Supervisor(programs).run())


def register(cli: click.Group) -> None:
    cli.add_command(local)
