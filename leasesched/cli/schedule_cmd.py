"""``leasesched schedule create|update|list|describe|pause|unpause|trigger|backfill|delete``:
periodic schedules (ScheduleService, served at the TaskService address) for people.

The command group is ``task``'s twin: the same ``--target``/``--token``/``--json``
(before or after the sub-command), the same durations, times, payload and task
options (imported from ``task_cmd``, never copied), the same request builders as
the Python client (``ScheduleDefinition``, ``trigger_request``, ...), and the
same exit codes: 0 success; 1 the server refused the call or could not be
reached (one line ``CODE: details`` on stderr); 2 a bad command line (one line).

What the server validates (a cron expression, a time zone, both --cron and
--every) it refuses with INVALID_ARGUMENT (exit 1); what the command line can
check itself (a duration, a time, an overlap name) never reaches it (exit 2).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import click

from leasesched.cli.task_cmd import (
    DURATION,
    DURATION_HELP,
    POSITIVE_DURATION,
    TIME,
    ActionOptions,
    action_options,
    call,
    connect,
    connection_options,
    emit,
    fmt_ts,
    human_bytes,
    json_option,
    namespace_option,
    option_group,
    printable,
    session,
    text_option,
)
from leasesched.client import (
    Overlap,
    ScheduleDefinition,
    ScheduleView,
    backfill_request,
    format_duration,
    list_schedules_request,
    schedule_ref,
    trigger_request,
)
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

SERVICE = pb_grpc.ScheduleServiceStub
INT64_MAX = 2**63 - 1
_LABEL = 11  # width of describe's labels ("recent runs")


def _overlap(ctx: click.Context, param: click.Parameter, value: str | None) -> Overlap | None:
    return None if value is None else Overlap(value)


def overlap_option(help: str) -> Any:
    return click.option("--overlap", type=click.Choice([o.value for o in Overlap]), default=None, callback=_overlap, help=help)


schedule_id_argument = click.argument("schedule_id", callback=text_option)


# ---------------------------------------------------------------- the definition (create, update)


@dataclass(frozen=True)
class DefinitionOptions:
    """``create``'s and ``update``'s options besides the task's (``ActionOptions``): when
    the schedule fires, the action's type, and the policy. ``None``: the server's default."""

    task_type: str
    cron: tuple[str, ...]
    every: float | None
    offset: float | None
    time_zone: str
    start_at: dt.datetime | None
    end_at: dt.datetime | None
    jitter: float | None
    overlap: Overlap | None
    catchup_window: float | None
    pause_on_failure: bool
    remaining_actions: int | None
    concurrency_key: str
    gate: str

    def definition(self, action: ActionOptions, paused: bool = False, note: str = "") -> ScheduleDefinition:
        return ScheduleDefinition(
            type=self.task_type, payload=action.read_payload(), cron=self.cron, every=self.every, offset=self.offset,
            time_zone=self.time_zone, start_at=self.start_at, end_at=self.end_at, jitter=self.jitter,
            overlap=self.overlap, catchup_window=self.catchup_window, pause_on_failure=self.pause_on_failure,
            paused=paused, note=note, remaining_actions=self.remaining_actions, priority=action.priority,
            retry_policy=action.retry_policy(), timeouts=action.timeouts(), lease_duration=action.lease_duration(),
            concurrency_key=self.concurrency_key, gate=self.gate,
        )  # fmt: skip


definition_options = option_group(
    DefinitionOptions,
    (
        click.option("--type", "task_type", required=True, callback=text_option, help="Task type each slot's task has."),
        click.option("--cron", multiple=True, callback=text_option, metavar="EXPR",
                     help="Cron expression, 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), "
                     "read in --time-zone; repeat for more. Give --cron or --every."),
        click.option("--every", type=POSITIVE_DURATION, default=None, help="Fire every this long (at k x every + offset since the epoch)."),
        click.option("--offset", type=DURATION, default=None, help="With --every: shift the slots by this much (less than --every)."),
        click.option("--time-zone", default="", callback=text_option, help="IANA time zone of --cron, e.g. Europe/Berlin (default UTC)."),
        click.option("--start-at", type=TIME, default=None, help="No slot before this ISO-8601 time (UTC if no offset)."),
        click.option("--end-at", type=TIME, default=None, help="No slot after this ISO-8601 time (UTC if no offset)."),
        click.option("--jitter", type=DURATION, default=None, help="Each slot's task is due up to this much later (fixed per slot)."),
        overlap_option("What a slot does while the previous run still goes (default skip)."),
        click.option("--catchup-window", type=POSITIVE_DURATION, default=None,
                     help="Slots missed during an outage still run when at most this old (default 1h, at least 10s)."),
        click.option("--pause-on-failure", is_flag=True, help="A run that ends FAILED pauses the schedule."),
        click.option("--remaining-actions", type=click.IntRange(0, INT64_MAX), default=None, metavar="N",
                     help="Create N more tasks, then stop firing (triggers count too; default: no limit)."),
        click.option("--concurrency-key", default="", callback=text_option,
                     help="Every task's concurrency key: its fair-share group and key limits (leasesched limit)."),
        click.option("--gate", default="", callback=text_option,
                     help="The gate (leasesched gate) every task waits for before it starts; it must exist."),
    ),  # fmt: skip
    "when",
)


# ---------------------------------------------------------------- output


def _state(view: ScheduleView) -> str:
    if not view.paused:
        return "active"
    return f"paused: {printable(view.note)}" if view.note else "paused"


def _section(label: str, lines: list[str]) -> None:
    """A label and its lines, the first beside the label, the rest under it; '-' when none."""
    for index, line in enumerate(lines or ["-"]):
        click.echo(f"{label if index == 0 else '':>{_LABEL}}  {line}")


def _default(value: dt.timedelta | None) -> str:
    return "default" if value is None else format_duration(value)


def print_description(view: ScheduleView) -> None:
    """What ``describe`` (and create, update) print: the definition, the state, what comes next
    and what happened, so one look tells whether and when the schedule runs."""
    action = f"{view.type}  priority={'default' if view.priority is None else view.priority}"
    if view.concurrency_key:
        action += f"  concurrency-key={view.concurrency_key}"
    if view.gate:
        action += f"  gate={view.gate}"
    if view.payload:
        action += f"  payload={human_bytes(view.payload, limit=80)}"
    policy = (f"overlap={view.overlap.value}  catchup-window={_default(view.catchup_window)}  "
              f"pause-on-failure={'yes' if view.pause_on_failure else 'no'}")  # fmt: skip
    _section("schedule", [f"{view.namespace}/{view.schedule_id}"])
    _section("spec", [view.spec])
    _section("action", [action])
    _section("policy", [policy])
    _section("state", [_state(view)])
    _section("actions", ["unlimited" if view.remaining_actions is None else f"{view.remaining_actions} remaining"])
    _section("version", [f"{view.version}  created {fmt_ts(view.created_at)}  updated {fmt_ts(view.updated_at)}"])
    _section("next fire", [fmt_ts(t) for t in view.next_fire_times])
    _section("recent runs", [
        f"{fmt_ts(r.nominal_time)}  {r.task_id}  {r.status.value if r.status else 'UNKNOWN'}  {r.cause}" for r in view.recent_runs
    ])  # fmt: skip
    _section("skipped", [f"{fmt_ts(s.first)} .. {fmt_ts(s.last)}  {s.count} x {s.reason}" for s in view.skipped])
    _section("buffered", [fmt_ts(t) for t in view.buffered])
    _section("totals", [f"fired {view.fired_total}  skipped {view.skipped_total}  backfills pending {view.backfills_pending}"])


def _emit_description(obj: dict[str, Any], reply: Any) -> None:
    emit(reply, obj["json"], lambda: print_description(ScheduleView.from_pb(reply.schedule)))


# ---------------------------------------------------------------- commands


@click.group()
@connection_options
@click.pass_context
def schedule(ctx: click.Context, target: str | None, as_json: bool, token: str | None) -> None:
    """Periodic schedules: each slot of a cron or interval spec creates one task.

    Exit codes: 0 ok; 1 the server refused the call or is unreachable
    (one line CODE: details on stderr); 2 a bad command line.
    """
    ctx.obj = connect(ctx.obj, target, as_json, token)


@schedule.command(
    help="Create schedule SCHEDULE_ID: a task of --type at every slot of --cron or --every. "
    f"Prints the new schedule with its next fire times. Durations: {DURATION_HELP}."
)
@schedule_id_argument
@namespace_option
@definition_options
@action_options
@click.option("--paused", is_flag=True, help="Create it paused (unpause starts it).")
@click.option("--note", default="", callback=text_option, help="A note on its state (why it is paused).")
@json_option
@click.pass_obj
def create(obj: dict[str, Any], schedule_id: str, namespace: str, when: DefinitionOptions, action: ActionOptions,
           paused: bool, note: str) -> None:  # fmt: skip
    schedule = when.definition(action, paused=paused, note=note).to_pb(namespace, schedule_id)
    reply = call(obj, lambda s: s.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule), timeout=10), SERVICE)
    _emit_description(obj, reply)


@schedule.command(
    help="Replace the whole definition of schedule SCHEDULE_ID: spec, action, policy and action limit. "
    "An option left out goes back to its default, it is not kept from the current definition; "
    "the pause state and note are kept (pause/unpause change them). "
    f"Prints the schedule as updated. Durations: {DURATION_HELP}."
)
@schedule_id_argument
@namespace_option
@definition_options
@action_options
@click.option("--expected-version", type=click.IntRange(0, INT64_MAX), default=0, show_default=True,
              help="Change only if the schedule is still at this version (describe shows it); 0 = any.")  # fmt: skip
@json_option
@click.pass_obj
def update(obj: dict[str, Any], schedule_id: str, namespace: str, when: DefinitionOptions, action: ActionOptions,
           expected_version: int) -> None:  # fmt: skip
    schedule = when.definition(action).to_pb(namespace, schedule_id)
    request = pb.UpdateScheduleRequest(schedule=schedule, expected_version=expected_version)
    reply = call(obj, lambda s: s.UpdateSchedule(request, timeout=10), SERVICE)
    _emit_description(obj, reply)


@schedule.command("list")
@namespace_option
@click.option("--page-size", type=click.IntRange(1, 10_000), default=100, show_default=True, help="Schedules per call; every page is read.")
@json_option
@click.pass_obj
def list_schedules(obj: dict[str, Any], namespace: str, page_size: int) -> None:
    """List every schedule of a namespace: id, paused, next fire time and spec."""
    found: list[pb.ScheduleDescription] = []
    token = ""
    with session(obj, SERVICE) as stub:
        while True:
            page = stub.ListSchedules(list_schedules_request(namespace, page_size, token), timeout=30)
            found.extend(page.schedules)
            token = page.next_page_token
            if not token:
                break
    reply = pb.ListSchedulesResponse(schedules=found)

    def human() -> None:
        click.echo(f"{'SCHEDULE':24}  {'PAUSED':6}  {'NEXT FIRE':29}  SPEC")
        for view in (ScheduleView.from_pb(d) for d in reply.schedules):
            next_fire = fmt_ts(view.next_fire_times[0]) if view.next_fire_times else "-"
            click.echo(f"{view.schedule_id:24}  {'yes' if view.paused else 'no':6}  {next_fire:29}  {view.spec}")

    emit(reply, obj["json"], human)


@schedule.command()
@schedule_id_argument
@namespace_option
@json_option
@click.pass_obj
def describe(obj: dict[str, Any], schedule_id: str, namespace: str) -> None:
    """Show a schedule: spec, action, policy, state, version, next 5 fire times, recent runs,
    skipped slots, buffered slots and totals."""
    request = pb.DescribeScheduleRequest(ref=schedule_ref(namespace, schedule_id))
    _emit_description(obj, call(obj, lambda s: s.DescribeSchedule(request, timeout=10), SERVICE))


def _print_state(reply: Any) -> None:
    view = ScheduleView.from_pb(reply.schedule)
    click.echo(f"{view.namespace}/{view.schedule_id}: {_state(view)}")


@schedule.command()
@schedule_id_argument
@namespace_option
@click.option("--note", default="", callback=text_option, help="Why it is paused (describe shows it).")
@json_option
@click.pass_obj
def pause(obj: dict[str, Any], schedule_id: str, namespace: str, note: str) -> None:
    """Stop firing; slots while paused are recorded as skipped (reason paused)."""
    request = pb.PauseScheduleRequest(ref=schedule_ref(namespace, schedule_id), note=note)
    reply = call(obj, lambda s: s.PauseSchedule(request, timeout=10), SERVICE)
    emit(reply, obj["json"], lambda: _print_state(reply))


@schedule.command()
@schedule_id_argument
@namespace_option
@click.option("--note", default="", callback=text_option, help="A note on the change.")
@json_option
@click.pass_obj
def unpause(obj: dict[str, Any], schedule_id: str, namespace: str, note: str) -> None:
    """Fire again from the next slot on (slots missed while paused are not caught up)."""
    request = pb.UnpauseScheduleRequest(ref=schedule_ref(namespace, schedule_id), note=note)
    reply = call(obj, lambda s: s.UnpauseSchedule(request, timeout=10), SERVICE)
    emit(reply, obj["json"], lambda: _print_state(reply))


@schedule.command(
    help="Run the schedule's action now. Prints the new task's id alone on stdout, so "
    "ID=$(leasesched schedule trigger ...) works. When the overlap policy skips or buffers the run, "
    "stdout stays empty, the outcome goes to stderr and the exit code is still 0 (the request was "
    "served). Not retried: a second attempt would be a second run."
)
@schedule_id_argument
@namespace_option
@overlap_option("Overlap policy for this run instead of the schedule's.")
@json_option
@click.pass_obj
def trigger(obj: dict[str, Any], schedule_id: str, namespace: str, overlap: Overlap | None) -> None:
    request = trigger_request(namespace, schedule_id, overlap)
    reply = call(obj, lambda s: s.TriggerSchedule(request, timeout=10), SERVICE)

    def human() -> None:
        if reply.task_id:
            click.echo(reply.task_id)
        else:
            click.echo(f"{printable(reply.outcome) or 'not started'} (no task created)", err=True)

    emit(reply, obj["json"], human)


@schedule.command(help="Run the slots of the schedule's spec in [--start-at, --end-at], oldest first and paced. "
                  "Prints the number of slots in the range; a slot that already has its task is not run again.")  # fmt: skip
@schedule_id_argument
@namespace_option
@click.option("--start-at", type=TIME, required=True, help="First time of the range (ISO-8601, UTC if no offset).")
@click.option("--end-at", type=TIME, required=True, help="Last time of the range (ISO-8601, UTC if no offset).")
@overlap_option("Overlap policy for these runs instead of the schedule's.")
@json_option
@click.pass_obj
def backfill(obj: dict[str, Any], schedule_id: str, namespace: str, start_at: dt.datetime, end_at: dt.datetime,
             overlap: Overlap | None) -> None:  # fmt: skip
    request = backfill_request(namespace, schedule_id, start_at, end_at, overlap)
    reply = call(obj, lambda s: s.BackfillSchedule(request, timeout=10), SERVICE)
    emit(reply, obj["json"], lambda: click.echo(str(reply.slots)))


@schedule.command()
@schedule_id_argument
@namespace_option
@click.option("--expected-version", type=click.IntRange(0, INT64_MAX), default=0, show_default=True,
              help="Delete only if the schedule is still at this version; 0 = any.")  # fmt: skip
@json_option
@click.pass_obj
def delete(obj: dict[str, Any], schedule_id: str, namespace: str, expected_version: int) -> None:
    """Delete a schedule (tasks it already created are not touched)."""
    request = pb.DeleteScheduleRequest(ref=schedule_ref(namespace, schedule_id), expected_version=expected_version)
    reply = call(obj, lambda s: s.DeleteSchedule(request, timeout=10), SERVICE)
    emit(reply, obj["json"], lambda: click.echo(f"deleted {namespace}/{schedule_id}"))


def register(cli: click.Group) -> None:
    cli.add_command(schedule)
