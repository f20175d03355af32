"""``leasesched gate set|get|list|pause|unpause|delete``: gates, the cluster-wide
rate limits of tasks (GateService, served at the TaskService address; docs/gates.md).

``task``'s twin like ``schedule``: the same ``--target``/``--token``/``--json``,
durations and exit codes (0 success; 1 the server refused the call or could not
be reached, one line ``CODE: details`` on stderr; 2 a bad command line).
Changes need an admin token; ``get`` and ``list`` a client token of the namespace.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from leasesched.cli.task_cmd import (
    DURATION,
    DURATION_HELP,
    call,
    connect,
    connection_options,
    emit,
    fmt_ts,
    json_option,
    namespace_option,
    session,
    text_option,
)
from leasesched.client import GateView, gate_ref, gate_request
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

SERVICE = pb_grpc.GateServiceStub
INT64_MAX = 2**63 - 1

name_argument = click.argument("name", callback=text_option)


def _line(view: GateView) -> str:
    warmup = f", warm-up {view.warmup.total_seconds():g}s" if view.warmup else ""
    closed = f" until {view.closed_until.isoformat()}" if view.state == "closed" and view.closed_until else ""
    cap = f", at most {view.max_in_flight} running" if view.max_in_flight else ""
    return (
        f"{view.namespace}/{view.name}: {view.rate:g}/s burst {view.burst}{warmup}{cap}; {view.state}{closed}; "
        f"{view.tokens_available:.1f} tokens now; version {view.version}"
    )


def _emit_gate(obj: dict[str, Any], reply: Any) -> None:
    emit(reply, obj["json"], lambda: click.echo(_line(GateView.from_pb(reply.gate))))


@click.group()
@connection_options
@click.pass_context
def gate(ctx: click.Context, target: str | None, as_json: bool, token: str | None) -> None:
    """Gates: named rate limits (rate, burst, warm-up) that hold for the whole cluster.
    A task names its gate (task schedule --gate); it starts only as the gate allows."""
    ctx.obj = connect(ctx.obj, target, as_json, token)


@gate.command("set", help=f"Create or change gate NAME (admin). Durations: {DURATION_HELP}.")
@name_argument
@namespace_option
@click.option("--rate", type=click.FloatRange(0, None, min_open=True), required=True, help="Tasks a second (> 0), for the whole cluster.")
@click.option("--burst", type=click.IntRange(1, None), default=1, show_default=True, help="Tasks that may start at once.")
@click.option("--warmup", type=DURATION, default=None,
              help="After an unpause or a long idle the rate ramps from 10 %% to 100 %% over this long (default: no ramp).")
@click.option("--max-in-flight", type=click.IntRange(0, None), default=0, show_default=True,
              help="At most this many of the gate's tasks run at once (0 = no cap).")
@click.option("--expected-version", type=click.IntRange(0, INT64_MAX), default=0, show_default=True,
              help="Change only if the gate is still at this version (get shows it); 0 = create or change.")
@json_option
@click.pass_obj
def set_gate(obj: dict[str, Any], name: str, namespace: str, rate: float, burst: int, warmup: float | None,
             max_in_flight: int, expected_version: int) -> None:  # fmt: skip
    request = gate_request(
        namespace, name, rate, burst, None if warmup is None else dt.timedelta(seconds=warmup), expected_version,
        max_in_flight=max_in_flight,
    )
    _emit_gate(obj, call(obj, lambda s: s.SetGate(request, timeout=10), SERVICE))


@gate.command("get")
@name_argument
@namespace_option
@json_option
@click.pass_obj
def get_gate(obj: dict[str, Any], name: str, namespace: str) -> None:
    """Show a gate: definition, state (open, paused, closed), tokens available now, version."""
    request = pb.GetGateRequest(gate=gate_ref(namespace, name))
    _emit_gate(obj, call(obj, lambda s: s.GetGate(request, timeout=10), SERVICE))


@gate.command("list")
@namespace_option
@click.option("--page-size", type=click.IntRange(1, 1000), default=100, show_default=True, help="Gates per call; every page is read.")
@json_option
@click.pass_obj
def list_gates(obj: dict[str, Any], namespace: str, page_size: int) -> None:
    """List every gate of a namespace."""
    found: list[pb.GateView] = []
    token = ""
    with session(obj, SERVICE) as stub:
        while True:
            page = stub.ListGates(pb.ListGatesRequest(namespace=namespace, page_size=page_size, page_token=token), timeout=30)
            found.extend(page.gates)
            token = page.next_page_token
            if not token:
                break
    reply = pb.ListGatesResponse(gates=found)

    def human() -> None:
        click.echo(f"{'GATE':24}  {'RATE/S':>8}  {'BURST':>6}  {'STATE':7}  {'TOKENS':>7}  CLOSED UNTIL")
        for view in reply.gates:
            until = fmt_ts(view.closed_until) if view.HasField("closed_until") else "-"
            click.echo(f"{view.name:24}  {view.definition.rate:8g}  {view.definition.burst:6}  {view.state:7}  "
                       f"{view.tokens_available:7.1f}  {until}")  # fmt: skip

    emit(reply, obj["json"], human)


@gate.command()
@name_argument
@namespace_option
@json_option
@click.pass_obj
def pause(obj: dict[str, Any], name: str, namespace: str) -> None:
    """No task of the gate starts until unpause (admin); running ones go on."""
    request = pb.PauseGateRequest(gate=gate_ref(namespace, name))
    _emit_gate(obj, call(obj, lambda s: s.PauseGate(request, timeout=10), SERVICE))


@gate.command()
@name_argument
@namespace_option
@json_option
@click.pass_obj
def unpause(obj: dict[str, Any], name: str, namespace: str) -> None:
    """Open the gate again (also one a rate-limited handler closed), starting the warm-up (admin)."""
    request = pb.UnpauseGateRequest(gate=gate_ref(namespace, name))
    _emit_gate(obj, call(obj, lambda s: s.UnpauseGate(request, timeout=10), SERVICE))


@gate.command()
@name_argument
@namespace_option
@click.option("--expected-version", type=click.IntRange(0, INT64_MAX), default=0, show_default=True,
              help="Delete only if the gate is still at this version; 0 = any.")  # fmt: skip
@json_option
@click.pass_obj
def delete(obj: dict[str, Any], name: str, namespace: str, expected_version: int) -> None:
    """Delete a gate (admin). Tasks that name it wait until a gate of that name exists again."""
    request = pb.DeleteGateRequest(gate=gate_ref(namespace, name), expected_version=expected_version)
    reply = call(obj, lambda s: s.DeleteGate(request, timeout=10), SERVICE)
    emit(reply, obj["json"], lambda: click.echo(f"deleted {namespace}/{name}"))


def register(cli: click.Group) -> None:
    cli.add_command(gate)
