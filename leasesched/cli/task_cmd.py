"""``leasesched task schedule|poll|cancel|list``: the user API for people.

Human-readable by default, ``--json`` for scripts (protobuf's canonical JSON).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from typing import Any, Callable

import click
import grpc
from google.protobuf import json_format

from leasesched.config import Config
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """'500ms', '10s', '5m', '2h', '1d' or plain seconds → seconds."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 500ms, 10s, 5m, 2h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _fmt_ts(ts: Any) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return ts.ToDatetime(tzinfo=dt.timezone.utc).isoformat(timespec="milliseconds")


def _call(obj: dict[str, Any], fn: Callable[[pb_grpc.TaskServiceStub], Any]) -> Any:
    with sync_channel(obj["target"], obj["cfg"]) as channel:
        try:
            return fn(pb_grpc.TaskServiceStub(channel))
        except grpc.RpcError as err:
            click.echo(f"error: {err.code().name}: {err.details()}", err=True)
            sys.exit(1)


def _emit(message: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2))
    else:
        human()


def _print_task(view: pb.TaskView) -> None:
    status = pb.TaskStatus.Name(view.status)
    lines = [
        ("task", view.task_id),
        ("status", status + (" (cancel requested)" if view.cancel_requested and status == "RUNNING" else "")),
        ("type", f"{view.type}  namespace={view.namespace}  priority={view.priority}"),
        ("attempt", f"{view.attempt} of {view.max_attempts}"),
        ("run at", _fmt_ts(view.run_at)),
        ("created", _fmt_ts(view.created_at)),
        ("started", _fmt_ts(view.started_at)),
        ("finished", _fmt_ts(view.finished_at)),
        ("progress", f"{view.progress.percent:.0f}% {view.progress.message}".rstrip()),
    ]
    if view.lease_owner:
        lines.append(("lease", f"{view.lease_owner} token={view.lease_token} until {_fmt_ts(view.lease_expires_at)}"))
    if view.error:
        lines.append(("error", f"{view.error_type + ': ' if view.error_type else ''}{view.error}"))
    if view.result:
        lines.append(("result", view.result.decode("utf-8", "replace")[:200]))
    for key, value in lines:
        click.echo(f"{key:>9}  {value}")


@click.group()
@click.option("--target", default=None, help="TaskService address host:port (default from config).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--token", default=None, help="Bearer token (default: env LEASESCHED_TOKEN).")
@click.pass_context
def task(ctx: click.Context, target: str | None, as_json: bool, token: str | None) -> None:
    """Schedule, poll, cancel and list tasks."""
    cfg: Config = ctx.obj.with_overrides(token=token)
    ctx.obj = {"target": target or cfg.task_service_target, "json": as_json, "cfg": cfg}


@task.command()
@click.argument("task_type")
@click.option("--payload", default="", help="Payload as text.")
@click.option("--payload-file", type=click.File("rb"), default=None, help="Payload from a file ('-' = stdin).")
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option("--delay", default=None, help="Run after this long (10s, 5m, 2h).")
@click.option("--at", "run_at", default=None, help="Run at this ISO-8601 time (UTC if no offset).")
@click.option("--priority", type=int, default=None, help="0..9, higher first (default 5).")
@click.option("--key", "idempotency_key", default="", help="Idempotency key: retries with it never duplicate.")
@click.option("--max-attempts", type=int, default=0, help="Attempts before FAILED (default from server).")
@click.option("--lease", default=None, help="Lease duration (default from server).")
@click.pass_obj
def schedule(
    obj: dict[str, Any],
    task_type: str,
    payload: str,
    payload_file: Any,
    namespace: str,
    delay: str | None,
    run_at: str | None,
    priority: int | None,
    idempotency_key: str,
    max_attempts: int,
    lease: str | None,
) -> None:
    """Schedule a task of TASK_TYPE."""
    spec = pb.TaskSpec(namespace=namespace, type=task_type)
    spec.payload = payload_file.read() if payload_file else payload.encode()
    if delay and run_at:
        raise click.UsageError("give --delay or --at, not both")
    if delay:
        spec.delay.FromTimedelta(dt.timedelta(seconds=parse_duration(delay)))
    if run_at:
        when = dt.datetime.fromisoformat(run_at)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        spec.run_at.FromDatetime(when)
    if priority is not None:
        spec.priority, spec.has_priority = priority, True
    if max_attempts:
        spec.retry_policy.maximum_attempts = max_attempts
    if lease:
        spec.lease_duration.FromTimedelta(dt.timedelta(seconds=parse_duration(lease)))
    request = pb.ScheduleTaskRequest(task=spec, idempotency_key=idempotency_key)
    reply = _call(obj, lambda s: s.ScheduleTask(request, timeout=10))

    def human() -> None:
        verb = "scheduled" if reply.created else "already scheduled (idempotency key)"
        click.echo(f"{verb} {reply.task_id} to run at {_fmt_ts(reply.run_at)}")

    _emit(reply, obj["json"], human)


@task.command()
@click.argument("task_id")
@click.pass_obj
def poll(obj: dict[str, Any], task_id: str) -> None:
    """Show a task's status, progress and result."""
    reply = _call(obj, lambda s: s.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10))
    _emit(reply, obj["json"], lambda: _print_task(reply.task))


@task.command()
@click.argument("task_id")
@click.pass_obj
def cancel(obj: dict[str, Any], task_id: str) -> None:
    """Cancel a task (at once if not running; a running one is asked to stop)."""
    reply = _call(obj, lambda s: s.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=10))
    _emit(reply, obj["json"], lambda: _print_task(reply.task))


@task.command("list")
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option("--status", type=click.Choice(["SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]), default=None)
@click.option("--limit", type=int, default=20, show_default=True, help="Page size.")
@click.option("--page-token", default="")
@click.pass_obj
def list_tasks(obj: dict[str, Any], namespace: str, status: str | None, limit: int, page_token: str) -> None:
    """List a namespace's tasks, newest first."""
    request = pb.ListTasksRequest(
        namespace=namespace,
        status=pb.TaskStatus.Value(status) if status else pb.TASK_STATUS_UNSPECIFIED,
        page_size=limit,
        page_token=page_token,
    )
    reply = _call(obj, lambda s: s.ListTasks(request, timeout=30))

    def human() -> None:
        click.echo(f"{'TASK':36}  {'STATUS':9}  {'TYPE':20}  {'ATTEMPT':7}  RUN AT")
        for t in reply.tasks:
            click.echo(
                f"{t.task_id:36}  {pb.TaskStatus.Name(t.status):9}  {t.type[:20]:20}  "
                f"{t.attempt}/{t.max_attempts:<5}  {_fmt_ts(t.run_at)}"
            )
        if reply.next_page_token:
            click.echo(f"more: --page-token {reply.next_page_token}")

    _emit(reply, obj["json"], human)


def register(cli: click.Group) -> None:
    cli.add_command(task)
