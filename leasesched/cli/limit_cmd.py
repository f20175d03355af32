"""``leasesched limit set|get|list|delete``: concurrency limits, how many tasks
of a namespace, a task type or a concurrency key may run at once (LimitService,
served at the TaskService address; docs/concurrency.md).

``gate``'s twin: the same ``--target``/``--token``/``--json`` and exit codes
(0 success; 1 the server refused the call or could not be reached, one line
``CODE: details`` on stderr; 2 a bad command line). The group a limit is for
is chosen by at most one of ``--type``, ``--key`` and ``--default-key``;
none of them is the namespace's own limit. Changes need an admin token;
``get`` and ``list NAMESPACE`` a client token of the namespace.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from leasesched.cli.task_cmd import call, connect, connection_options, emit, json_option, session, text_option
from leasesched.client import LimitInfo, LimitScope, limit_ref, limit_request
from leasesched.concurrency import DEFAULT_KEY, MAX_RUNNING
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

SERVICE = pb_grpc.LimitServiceStub
INT64_MAX = 2**63 - 1

namespace_argument = click.argument("namespace", callback=text_option)


def group_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--type``, ``--key`` and ``--default-key``: which group of the namespace."""
    for option in (
        click.option("--default-key", is_flag=True, help=f"The limit of every concurrency key without its own (name {DEFAULT_KEY!r})."),
        click.option("--key", "key", default=None, callback=text_option, help="The limit of the tasks of this concurrency key."),
        click.option("--type", "type_", default=None, callback=text_option, help="The limit of the tasks of this type."),
    ):
        command = option(command)
    return command


def _group(type_: str | None, key: str | None, default_key: bool) -> tuple[LimitScope, str]:
    """The (scope, name) the options choose; more than one is a usage error (exit 2)."""
    chosen = [c for c in ((LimitScope.TYPE, type_), (LimitScope.KEY, key)) if c[1] is not None]
    if default_key:
        chosen.append((LimitScope.KEY, DEFAULT_KEY))
    if len(chosen) > 1:
        raise click.UsageError("give at most one of --type, --key and --default-key")
    if not chosen:
        return LimitScope.NAMESPACE, ""
    scope, name = chosen[0]
    return scope, name or ""


def _line(info: LimitInfo) -> str:
    return f"{info.label()}: at most {info.max_running} running; version {info.version}"


def _emit_limit(obj: dict[str, Any], reply: Any) -> None:
    emit(reply, obj["json"], lambda: click.echo(_line(LimitInfo.from_pb(reply.limit))))


@click.group()
@connection_options
@click.pass_context
def limit(ctx: click.Context, target: str | None, as_json: bool, token: str | None) -> None:
    """Concurrency limits: at most MAX_RUNNING tasks of a namespace, of a task type or
    of a concurrency key run at once. A task over a limit waits (SCHEDULED)."""
    ctx.obj = connect(ctx.obj, target, as_json, token)


@limit.command("set")
@namespace_argument
@group_options
@click.argument("max_running", type=click.IntRange(1, MAX_RUNNING))
@click.option("--expected-version", type=click.IntRange(0, INT64_MAX), default=0, show_default=True,
              help="Change only if the limit is still at this version (get shows it); 0 = create or change.")  # fmt: skip
@json_option
@click.pass_obj
def set_limit(obj: dict[str, Any], namespace: str, type_: str | None, key: str | None, default_key: bool, max_running: int,
              expected_version: int) -> None:  # fmt: skip
    """Create or change the limit of a group of NAMESPACE (admin): MAX_RUNNING (1..1000) at once."""
    scope, name = _group(type_, key, default_key)
    request = limit_request(namespace, scope, name, max_running, expected_version)
    _emit_limit(obj, call(obj, lambda s: s.SetLimit(request, timeout=10), SERVICE))


@limit.command("get")
@namespace_argument
@group_options
@json_option
@click.pass_obj
def get_limit(obj: dict[str, Any], namespace: str, type_: str | None, key: str | None, default_key: bool) -> None:
    """Show the limit of a group of NAMESPACE: max running and version."""
    scope, name = _group(type_, key, default_key)
    request = pb.GetLimitRequest(limit=limit_ref(namespace, scope, name))
    _emit_limit(obj, call(obj, lambda s: s.GetLimit(request, timeout=10), SERVICE))


@limit.command("list")
@click.argument("namespace", required=False, default="", callback=text_option)
@click.option("--page-size", type=click.IntRange(1, 1000), default=100, show_default=True, help="Limits per call; every page is read.")
@json_option
@click.pass_obj
def list_limits(obj: dict[str, Any], namespace: str, page_size: int) -> None:
    """List the limits of NAMESPACE, or of every namespace (admin) without one."""
    found: list[pb.LimitView] = []
    token = ""
    with session(obj, SERVICE) as stub:
        while True:
            page = stub.ListLimits(pb.ListLimitsRequest(namespace=namespace, page_size=page_size, page_token=token), timeout=30)
            found.extend(page.limits)
            token = page.next_page_token
            if not token:
                break
    reply = pb.ListLimitsResponse(limits=found)

    def human() -> None:
        click.echo(f"{'NAMESPACE':24}  {'SCOPE':9}  {'NAME':32}  {'MAX RUNNING':>11}  {'VERSION':>7}")
        for view in reply.limits:
            info = LimitInfo.from_pb(view)
            click.echo(f"{info.namespace:24}  {info.scope.value:9}  {info.name or '-':32}  {info.max_running:11}  {info.version:7}")

    emit(reply, obj["json"], human)


@limit.command()
@namespace_argument
@group_options
@click.option("--expected-version", type=click.IntRange(0, INT64_MAX), default=0, show_default=True,
              help="Delete only if the limit is still at this version; 0 = any.")  # fmt: skip
@json_option
@click.pass_obj
def delete(obj: dict[str, Any], namespace: str, type_: str | None, key: str | None, default_key: bool, expected_version: int) -> None:
    """Delete the limit of a group of NAMESPACE (admin): its tasks are no longer held by it."""
    scope, name = _group(type_, key, default_key)
    request = pb.DeleteLimitRequest(limit=limit_ref(namespace, scope, name), expected_version=expected_version)
    reply = call(obj, lambda s: s.DeleteLimit(request, timeout=10), SERVICE)
    label = namespace if scope == LimitScope.NAMESPACE else f"{namespace}/{scope.value}={name}"
    emit(reply, obj["json"], lambda: click.echo(f"deleted {label}"))


def register(cli: click.Group) -> None:
    cli.add_command(limit)
