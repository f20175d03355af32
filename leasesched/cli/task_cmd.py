"""``leasesched task schedule|poll|cancel|list``: the user API for people.

Human-readable by default, ``--json`` for scripts (protobuf's canonical JSON,
with ``result`` and ``payload`` as text when they are UTF-8 and an
``<field>_encoding`` saying which: ``utf-8`` or ``base64``). ``--json`` may be
given before or after the sub-command.

Exit codes: 0 success; 1 the server refused the call or could not be reached
(one line ``CODE: details`` on stderr); 2 a bad command line (one line from
click); ``task poll --wait`` adds 3 FAILED, 4 CANCELLED, 5 not final before
``--timeout``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, NoReturn

import click
import grpc
from google.protobuf import json_format

from leasesched.client import DEFAULT_NAMESPACE, RetryPolicy, Timeouts, duration_pb, task_spec
from leasesched.config import Config
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

EXIT_RPC_ERROR = 1
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_TIMEOUT = 5

INT32_MAX = 2**31 - 1
# protobuf's Duration range (about 10,000 years); the server's own bounds are far smaller.
MAX_DURATION_S = 315_576_000_000
# Calls that may go again while ``poll --wait`` follows a task (a server restarting or shedding load).
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
STATUSES = ["SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]

# ---------------------------------------------------------------- durations

DURATION_HELP = "units ms, s, m, h, d, combined largest first (500ms, 90s, 1m30s, 1h30m, 2d); a bare number is seconds"
_UNIT_SECONDS = {"d": Decimal(86400), "h": Decimal(3600), "m": Decimal(60), "s": Decimal(1), "ms": Decimal("0.001")}
_UNIT_ORDER = list(_UNIT_SECONDS)  # largest first
_NUMBER = r"\d+(?:\.\d+)?"
_BARE_RE = re.compile(rf"^{_NUMBER}$")
_COMPOUND_RE = re.compile(rf"^(?:{_NUMBER}(?:ms|s|m|h|d))+$")
_PART_RE = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """'500ms', '10s', '1m30s', '1h30m', '2d' or a bare number of seconds → seconds.

    Strict: each unit at most once and largest first, no signs, no spaces
    inside, so a typo ('1m1h', '5 m', '1.5.2s') is refused instead of guessed.
    Raises ``click.BadParameter`` with one line naming the value.
    """
    raw = text.strip()
    if _BARE_RE.match(raw):
        seconds = Decimal(raw)
    elif _COMPOUND_RE.match(raw):
        parts = _PART_RE.findall(raw)
        ranks = [_UNIT_ORDER.index(unit) for _, unit in parts]
        if any(a >= b for a, b in zip(ranks, ranks[1:])):
            raise click.BadParameter(f"{text!r}: give each unit once, largest first (like 1h30m or 1m30s)")
        seconds = sum((Decimal(number) * _UNIT_SECONDS[unit] for number, unit in parts), Decimal(0))
    else:
        raise click.BadParameter(f"{text!r} is not a duration ({DURATION_HELP})")
    if seconds > MAX_DURATION_S:
        raise click.BadParameter(f"{text!r} is too long (at most {MAX_DURATION_S} s)")
    return float(seconds)


class DurationType(click.ParamType):
    """A click parameter holding a duration in seconds (a float)."""

    name = "DURATION"

    def __init__(self, allow_zero: bool = True) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        seconds = parse_duration(_text(str(value), param))
        if seconds == 0 and not self.allow_zero:
            self.fail(f"{value!r} must be longer than 0 (leave the option out for the server's default)", param, ctx)
        return seconds


DURATION = DurationType()
POSITIVE_DURATION = DurationType(allow_zero=False)


# ---------------------------------------------------------------- other input


def _text(value: str, param: click.Parameter | None = None) -> str:
    """Refuse text that is not valid Unicode (undecodable bytes in argv arrive as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter(f"{value.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8", param=param) from None
    return value


def text_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A click callback refusing text that is not valid Unicode (one value or a tuple of them)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_text(v, param) for v in value)
    return _text(value, param)


def _task_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"{value[:80]!r} is not a task id (a UUID)", param=param) from None


def parse_run_at(text: str, option: str = "--at") -> dt.datetime:
    """An ISO-8601 time ('2026-12-03T10:00:00Z', '2026-12-03 10:00+01:00'); UTC when no offset is given.
    ``option`` names the option in the one-line error."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO-8601 time like 2026-12-03T10:00:00Z", param_hint=f"'{option}'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    try:
        return when.astimezone(dt.timezone.utc)
    except OverflowError:
        raise click.BadParameter(f"{text!r} is out of range", param_hint=f"'{option}'") from None


class TimeType(click.ParamType):
    """A click parameter holding a time (``parse_run_at``: ISO-8601, UTC when no offset), as an aware datetime."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        option = param.opts[0] if param is not None and param.opts else "--at"
        return parse_run_at(_text(str(value), param), option)


TIME = TimeType()


def _coefficient(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value < 1.0):
        raise click.BadParameter(f"{value} must be a number >= 1", param=param)
    return value


def read_payload(payload: str | None, payload_file: Any) -> bytes:
    """``--payload TEXT`` (``@PATH``: a file's bytes, ``-``: stdin, ``@@TEXT``: text that starts with '@'),
    or ``--payload-file PATH|-``; not both."""
    if payload is not None and payload_file is not None:
        raise click.UsageError("give --payload or --payload-file, not both")
    if payload_file is not None:
        return bytes(payload_file.read())
    if payload is None:
        return b""
    if payload == "-":
        with click.open_file("-", "rb") as stdin:
            data = stdin.read()
        return bytes(data)
    if payload.startswith("@@"):
        return os.fsencode(payload[1:])
    if payload.startswith("@"):
        path = payload[1:]
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise click.BadParameter(f"cannot read {path!r}: {err.strerror or err}", param_hint="'--payload'") from None
    return os.fsencode(payload)  # keeps bytes that are not UTF-8 as they were given


# ---------------------------------------------------------------- output


def fmt_ts(ts: Any) -> str:
    """A proto Timestamp (or a datetime) as ISO-8601 UTC with milliseconds; unset (or None) is '-'."""
    if isinstance(ts, dt.datetime):
        return ts.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return str(ts.ToDatetime(tzinfo=dt.timezone.utc).isoformat(timespec="milliseconds"))


def decode_bytes(raw: bytes) -> tuple[str, str]:
    """(text, encoding): the text itself when ``raw`` is UTF-8, else its base64."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def _view_dict(view: pb.TaskView) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(view, preserving_proto_field_name=True)
    for name in ("result", "payload"):
        raw = getattr(view, name)
        if raw:
            data[name], data[f"{name}_encoding"] = decode_bytes(raw)
    return data


def _description_dict(description: pb.ScheduleDescription) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(description, preserving_proto_field_name=True)
    raw = description.schedule.action.payload
    if raw:
        action = data["schedule"]["action"]
        action["payload"], action["payload_encoding"] = decode_bytes(raw)
    return data


def to_json(message: Any) -> dict[str, Any]:
    """Canonical protobuf JSON, with every TaskView's bytes (and every schedule action's
    payload) as text plus their encoding."""
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if isinstance(message, pb.TaskView):
        return _view_dict(message)
    if isinstance(message, (pb.PollTaskResponse, pb.CancelTaskResponse)):
        data["task"] = _view_dict(message.task)
    elif isinstance(message, pb.ListTasksResponse):
        data["tasks"] = [_view_dict(t) for t in message.tasks]
    elif isinstance(getattr(message, "schedule", None), pb.ScheduleDescription):
        data["schedule"] = _description_dict(message.schedule)
    elif isinstance(message, pb.ListSchedulesResponse):
        data["schedules"] = [_description_dict(d) for d in message.schedules]
    return data


def emit(message: Any, as_json: bool, human: Callable[[], None]) -> None:
    """Print ``message`` as JSON (``to_json``) for --json, else call ``human`` to print text."""
    if as_json:
        click.echo(json.dumps(to_json(message), indent=2, ensure_ascii=False))
    else:
        human()


def printable(text: str) -> str:
    """One line for a terminal: control characters (newlines, escapes) shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def human_bytes(raw: bytes, limit: int = 200) -> str:
    text, encoding = decode_bytes(raw)
    shown = printable(text)
    if len(shown) > limit:
        shown = f"{shown[:limit]}… ({len(raw)} bytes)"
    return shown if encoding == "utf-8" else f"[base64] {shown}"


def _print_task(view: pb.TaskView) -> None:
    status = pb.TaskStatus.Name(view.status)
    lines = [
        ("task", view.task_id),
        ("status", status + (" (cancel requested)" if view.cancel_requested and status == "RUNNING" else "")),
        ("type", f"{view.type}  namespace={view.namespace}  priority={view.priority}"
                 + (f"  concurrency_key={view.concurrency_key}" if view.concurrency_key else "")),
        ("attempt", f"{view.attempt} of {view.max_attempts}"),
        ("run at", fmt_ts(view.run_at)),
        ("created", fmt_ts(view.created_at)),
        ("started", fmt_ts(view.started_at)),
        ("finished", fmt_ts(view.finished_at)),
        ("progress", f"{view.progress.percent:.0f}% {printable(view.progress.message)}".rstrip()),
    ]
    if view.version:
        lines.append(("version", view.version))
    if view.no_worker_for_type:
        lines.append(("waiting", f"no running worker serves {view.namespace}/{view.type}: it starts once one subscribes"))
    if view.lease_owner:
        lines.append(("lease", f"{view.lease_owner} token={view.lease_token} until {fmt_ts(view.lease_expires_at)}"))
    if view.error:
        lines.append(("error", printable(f"{view.error_type + ': ' if view.error_type else ''}{view.error}")))
    if view.lease_losses:
        lines.append(("leases", f"lost {view.lease_losses} time(s){'  STUCK' if view.stuck else ''}  (leasesched task history {view.task_id})"))
    if view.payload:
        lines.append(("payload", human_bytes(view.payload)))
    if view.result:
        lines.append(("result", human_bytes(view.result)))
    for key, value in lines:
        click.echo(f"{key:>9}  {value}")


# ---------------------------------------------------------------- calls


class RpcFailure(click.ClickException):
    """A call the server refused or that could not be made: one line ``CODE: details``, exit 1."""

    exit_code = EXIT_RPC_ERROR

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {' '.join((details or '').split()) or '(no details)'}")

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True)


def rpc_failure(err: grpc.RpcError) -> RpcFailure:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return RpcFailure(code.name if code is not None else "UNKNOWN", details or "")


@contextlib.contextmanager
def open_stub(target: str, cfg: Config, service: Callable[[grpc.Channel], Any] = pb_grpc.TaskServiceStub) -> Iterator[Any]:
    """A stub of ``service`` (TaskService unless told; ScheduleService is served at the
    same address) on a channel closed afterwards (unit tests replace this function)."""
    with sync_channel(target, cfg) as channel:
        yield service(channel)


@contextlib.contextmanager
def session(obj: dict[str, Any], service: Callable[[grpc.Channel], Any] = pb_grpc.TaskServiceStub) -> Iterator[Any]:
    """A stub for the command's target and token (``obj`` from ``connect``); a failed call
    or connection ends the command with one line on stderr (exit 1)."""
    try:
        with open_stub(obj["target"], obj["cfg"], service) as stub:
            yield stub
    except grpc.RpcError as err:
        raise rpc_failure(err) from None
    except OSError as err:  # e.g. a TLS file named in the configuration cannot be read
        raise click.ClickException(f"cannot connect to {obj['target']}: {err}") from None


def call(obj: dict[str, Any], fn: Callable[[Any], Any], service: Callable[[grpc.Channel], Any] = pb_grpc.TaskServiceStub) -> Any:
    """``fn(stub)`` in a ``session``: one call, its answer returned."""
    with session(obj, service) as stub:
        return fn(stub)


# ---------------------------------------------------------------- shared options


def _json_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and isinstance(ctx.obj, dict):
        ctx.obj["json"] = True


json_option = click.option(
    "--json", "as_json", is_flag=True, expose_value=False, callback=_json_flag,
    help="Print JSON instead of text (also accepted before the sub-command).",
)  # fmt: skip


def connection_options(group: Callable[..., None]) -> Callable[..., None]:
    """``--target``, ``--json`` and ``--token`` of a command group that calls the services
    (``task``, ``schedule``); the group hands them to ``connect``."""
    for option in (
        click.option("--token", default=None, help="Bearer token (default: env LEASESCHED_TOKEN)."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text (also accepted after the sub-command)."),
        click.option("--target", default=None, help="TaskService address host:port, which also serves ScheduleService (default from config)."),
    ):  # fmt: skip
        group = option(group)
    return group


def connect(cfg: Config, target: str | None, as_json: bool, token: str | None) -> dict[str, Any]:
    """The ``ctx.obj`` a group's sub-commands use (``session``, ``call``, ``emit``): the
    target, the --json choice and the configuration with the token. A token gRPC would
    refuse only at the call is a command-line error (exit 2) before any call."""
    cfg = cfg.with_overrides(token=token)
    if cfg.token and not _TOKEN_RE.match(cfg.token):
        # gRPC would refuse it only at the call, with a multi-line trace from its core.
        source = "--token" if token is not None else "LEASESCHED_TOKEN"
        raise click.BadParameter("a bearer token is printable ASCII without spaces", param_hint=f"'{source}'")
    return {"target": target or cfg.task_service_target, "json": as_json, "cfg": cfg}


namespace_option = click.option("--namespace", "-n", default=DEFAULT_NAMESPACE, show_default=True, callback=text_option)


@dataclass(frozen=True)
class ActionOptions:
    """The options of a task a command makes (``action_options``), as given; ``None`` leaves a
    field to the server's default. ``task schedule`` and ``schedule create|update`` share them,
    so a task and a schedule's action are spelled and checked the same way."""

    payload: str | None
    payload_file: Any
    priority: int | None
    lease: float | None
    max_attempts: int | None
    initial_interval: float | None
    backoff_coefficient: float | None
    max_interval: float | None
    non_retryable: tuple[str, ...]
    schedule_to_start: float | None
    start_to_close: float | None
    schedule_to_close: float | None

    def read_payload(self) -> bytes:
        return read_payload(self.payload, self.payload_file)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            initial_interval=_timedelta(self.initial_interval), backoff_coefficient=self.backoff_coefficient,
            maximum_interval=_timedelta(self.max_interval), maximum_attempts=self.max_attempts,
            non_retryable_error_types=self.non_retryable,
        )  # fmt: skip

    def timeouts(self) -> Timeouts:
        return Timeouts(_timedelta(self.schedule_to_start), _timedelta(self.start_to_close), _timedelta(self.schedule_to_close))

    def lease_duration(self) -> dt.timedelta | None:
        return _timedelta(self.lease)

    def task_spec(self, task_type: str, namespace: str) -> pb.TaskSpec:
        """The TaskSpec without a time (a schedule's action; ``task schedule`` adds --delay/--at)."""
        return task_spec(task_type, self.read_payload(), namespace=namespace, priority=self.priority,
                         retry_policy=self.retry_policy(), timeouts=self.timeouts(), lease_duration=self.lease_duration())  # fmt: skip


def _timedelta(seconds: float | None) -> dt.timedelta | None:
    return None if seconds is None else dt.timedelta(seconds=seconds)


_ACTION_OPTIONS = (
    click.option("--payload", default=None, help="Payload as text; @PATH reads a file, - reads stdin, @@TEXT is text starting with '@'."),
    click.option("--payload-file", type=click.File("rb"), default=None, help="Payload from a file ('-' = stdin)."),
    click.option("--priority", type=click.IntRange(0, 9), default=None, help="0..9, higher first (default 5)."),
    click.option("--lease", type=POSITIVE_DURATION, default=None, help="Lease duration a worker holds and renews (default from server)."),
    click.option("--max-attempts", type=click.IntRange(1, INT32_MAX), default=None, help="Attempts before FAILED; 1 = no retry (default from server)."),
    click.option("--initial-interval", type=POSITIVE_DURATION, default=None, help="Retry: wait before the first retry (default 1s)."),
    click.option("--backoff-coefficient", type=float, default=None, callback=_coefficient, help="Retry: each wait is this times the previous, >= 1 (default 2.0)."),
    click.option("--max-interval", type=POSITIVE_DURATION, default=None, help="Retry: longest wait between attempts (default 100 x initial interval)."),
    click.option("--non-retryable", "non_retryable", multiple=True, callback=text_option, metavar="ERROR_TYPE",
                 help="Retry: an error type that fails the task at once (repeat the option for more)."),
    click.option("--schedule-to-start", type=POSITIVE_DURATION, default=None, help="Timeout: longest wait from due to started."),
    click.option("--start-to-close", type=POSITIVE_DURATION, default=None, help="Timeout: longest one attempt may run."),
    click.option("--schedule-to-close", type=POSITIVE_DURATION, default=None, help="Timeout: longest from due to final, over all attempts."),
)  # fmt: skip


def option_group(
    cls: type[Any], options: Sequence[Callable[[Any], Any]], argument: str
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator that adds ``options`` to a command and hands the command their values
    as one ``cls`` instance (a dataclass whose fields are the options' names) in ``argument``:
    commands that share options share their definitions and one typed value, not a dozen arguments."""
    names = [f.name for f in dataclasses.fields(cls)]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def grouped(*args: Any, **kwargs: Any) -> None:
            kwargs[argument] = cls(**{name: kwargs.pop(name) for name in names})
            command(*args, **kwargs)

        for option in reversed(options):
            grouped = option(grouped)
        return grouped

    return decorate


action_options = option_group(ActionOptions, _ACTION_OPTIONS, "action")


# ---------------------------------------------------------------- commands


@click.group()
@connection_options
@click.pass_context
def task(ctx: click.Context, target: str | None, as_json: bool, token: str | None) -> None:
    """Schedule, poll, cancel and list tasks.

    Exit codes: 0 ok; 1 the server refused the call or is unreachable
    (one line CODE: details on stderr); 2 a bad command line.
    """
    ctx.obj = connect(ctx.obj, target, as_json, token)


@task.command(
    help="Schedule a task of TASK_TYPE. Prints its task id alone on stdout, so ID=$(leasesched task schedule ...) "
    f"works (-v: details on stderr). Durations: {DURATION_HELP}."
)
@click.argument("task_type", callback=text_option)
@namespace_option
@click.option("--delay", type=DURATION, default=None, help=f"Run after this long ({DURATION_HELP}).")
@click.option("--at", "run_at", default=None, help="Run at this ISO-8601 time, e.g. 2026-12-03T10:00:00Z (UTC if no offset).")
@click.option("--key", "--idempotency-key", "idempotency_key", default="", callback=text_option,
              help="Idempotency key: the same key and request give the same task, never a duplicate.")
@click.option("--concurrency-key", default="", callback=text_option,
              help="Fair-share group (e.g. a partner id): due tasks of one priority go out round robin across groups.")
@action_options
@click.option("--gate", default="", callback=text_option, help="The gate (leasesched gate) the task waits for before it starts.")
@click.option("-v", "--verbose", is_flag=True, help="Also say on stderr when it runs and whether it was new.")
@json_option
@click.pass_obj
def schedule(
    obj: dict[str, Any],
    task_type: str,
    namespace: str,
    delay: float | None,
    run_at: str | None,
    idempotency_key: str,
    concurrency_key: str,
    action: ActionOptions,
    gate: str,
    verbose: bool,
) -> None:
    if delay is not None and run_at is not None:
        raise click.UsageError("give --delay or --at, not both")
    spec = action.task_spec(task_type, namespace)
    spec.concurrency_key = concurrency_key
    spec.gate = gate
    if delay is not None:
        spec.delay.CopyFrom(duration_pb(delay))
    if run_at is not None:
        spec.run_at.FromDatetime(parse_run_at(run_at))
    request = pb.ScheduleTaskRequest(task=spec, idempotency_key=idempotency_key)
    reply = call(obj, lambda s: s.ScheduleTask(request, timeout=10))
    if verbose:
        verb = "scheduled" if reply.created else "already scheduled (idempotency key matched)"
        click.echo(f"{verb} {reply.task_id} to run at {fmt_ts(reply.run_at)}", err=True)
    emit(reply, obj["json"], lambda: click.echo(reply.task_id))


def _state_line(view: pb.TaskView) -> str:
    """What ``poll --wait`` shows of a task: a new line whenever this text changes."""
    status = pb.TaskStatus.Name(view.status)
    if view.cancel_requested and view.status == pb.RUNNING:
        status += " (cancel requested)"
    line = f"{status}  attempt {view.attempt}/{view.max_attempts}"
    if view.progress.percent or view.progress.message:
        line += f"  {view.progress.percent:.0f}% {printable(view.progress.message)}".rstrip()
    if view.error and view.status != pb.SUCCEEDED:
        line += f"  last error: {printable(view.error)[:120]}"
    return line


def _follow(stub: Any, task_id: str, timeout: float | None, interval: float) -> tuple[pb.TaskView | None, bool]:
    """Poll until the task is final or ``timeout`` passes, printing each change on stderr.
    Returns (last view, final?)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last: pb.TaskView | None = None
    shown = ""
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            call_timeout = 10.0 if remaining is None else max(0.5, min(10.0, remaining))
            last = stub.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=call_timeout).task
        except grpc.RpcError as err:
            failure = rpc_failure(err)
            if err.code() not in TRANSIENT_CODES:
                raise failure from None
            click.echo(f"{failure.format_message()} (trying again)", err=True)
        if last is not None:
            line = _state_line(last)
            if line != shown:  # the same state again is not shown twice
                shown = line
                click.echo(f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S}  {line}", err=True)
            if last.status in TERMINAL:
                return last, True
        if deadline is not None and time.monotonic() >= deadline:
            return last, False
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))


@task.command()
@click.argument("task_id", callback=_task_id)
@click.option("--wait", is_flag=True, help="Follow the task until it is final, showing each change on stderr; "
              "exit 0 if SUCCEEDED, 3 FAILED, 4 CANCELLED, 5 still not final at --timeout.")  # fmt: skip
@click.option("--timeout", type=POSITIVE_DURATION, default=None, help=f"With --wait: give up after this long (default: no limit; {DURATION_HELP}).")
@click.option("--interval", type=POSITIVE_DURATION, default="500ms", show_default=True, help="With --wait: time between polls.")
@json_option
@click.pass_obj
def poll(obj: dict[str, Any], task_id: str, wait: bool, timeout: float | None, interval: float) -> None:
    """Show a task's status, progress and result."""
    if timeout is not None and not wait:
        raise click.UsageError("--timeout needs --wait")
    if not wait:
        reply = call(obj, lambda s: s.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10))
        emit(reply, obj["json"], lambda: _print_task(reply.task))
        return
    with session(obj) as stub:
        view, final = _follow(stub, task_id, timeout, interval)
    if view is None:  # every call failed (transiently) until the timeout
        click.echo(f"gave up after {timeout} s: the task could not be read", err=True)
        _exit(EXIT_TIMEOUT)
    response = pb.PollTaskResponse(task=view)
    emit(response, obj["json"], lambda: _print_task(view))
    if not final:
        click.echo(f"gave up after {timeout:g} s: the task is still {pb.TaskStatus.Name(view.status)}", err=True)
        _exit(EXIT_TIMEOUT)
    if view.status == pb.FAILED:
        _exit(EXIT_FAILED)
    if view.status == pb.CANCELLED:
        _exit(EXIT_CANCELLED)


def _exit(code: int) -> NoReturn:
    raise SystemExit(code)


@task.command()
@click.argument("task_id", callback=_task_id)
@json_option
@click.pass_obj
def cancel(obj: dict[str, Any], task_id: str) -> None:
    """Cancel a task (at once if not running; a running one is asked to stop)."""
    reply = call(obj, lambda s: s.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=10))
    emit(reply, obj["json"], lambda: _print_task(reply.task))


def parse_since(text: str, option: str) -> dt.datetime:
    """A time for --since/--until: an ISO-8601 time (UTC when no offset), or a
    duration meaning that long ago ('90m', '2d')."""
    raw = text.strip()
    if _BARE_RE.match(raw) or _COMPOUND_RE.match(raw):  # an ISO time always has a '-'
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=parse_duration(raw))
    return parse_run_at(raw, option)


class SinceType(click.ParamType):
    """A click parameter: an ISO-8601 time or a duration ago (``parse_since``), as an aware datetime."""

    name = "TIME|AGO"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        option = param.opts[0] if param is not None and param.opts else "--since"
        return parse_since(_text(str(value), param), option)


SINCE = SinceType()
SINCE_HELP = "an ISO-8601 time (UTC if no offset) or a duration ago (90m, 2d)"


@task.command("list")
@namespace_option
@click.option("--status", type=click.Choice(STATUSES), default=None)
@click.option("--type", "task_type", default=None, callback=text_option,
              help="Only tasks of this type (filtered by the server; a page may hold fewer tasks than --limit, "
              "so the CLI reads pages until --limit matches or --max-pages pages).")  # fmt: skip
@click.option("--since", type=SINCE, default=None, help=f"Only tasks created at or after this: {SINCE_HELP}.")
@click.option("--until", type=SINCE, default=None, help=f"Only tasks created before this: {SINCE_HELP}.")
@click.option("--limit", type=click.IntRange(1, INT32_MAX), default=20, show_default=True, help="Page size (with --type or --status: matches wanted).")
@click.option("--max-pages", type=click.IntRange(1, 100_000), default=50, show_default=True, help="With --type or --status: pages read at most.")
@click.option("--page-token", default="", callback=text_option, help="Resume where a previous listing stopped (with the same filters).")
@json_option
@click.pass_obj
def list_tasks(
    obj: dict[str, Any], namespace: str, status: str | None, task_type: str | None, since: dt.datetime | None,
    until: dt.datetime | None, limit: int, max_pages: int, page_token: str,
) -> None:
    """List a namespace's tasks, newest first."""

    def request(token: str) -> pb.ListTasksRequest:
        request = pb.ListTasksRequest(
            namespace=namespace,
            status=pb.TaskStatus.Value(status) if status else pb.TASK_STATUS_UNSPECIFIED,
            page_size=limit,
            page_token=token,
            type=task_type or "",
        )
        if since is not None:
            request.created_after.FromDatetime(since)
        if until is not None:
            request.created_before.FromDatetime(until)
        return request

    pages = 0
    filtered = task_type is not None or status is not None
    with session(obj) as stub:
        if not filtered:
            reply = stub.ListTasks(request(page_token), timeout=30)
        else:
            # The server filters, but bounds the rows one call examines: a page
            # may be short, even empty, with a token to go on.
            found: list[pb.TaskView] = []
            token = page_token
            while True:
                page = stub.ListTasks(request(token), timeout=30)
                pages += 1
                found.extend(t for t in page.tasks if task_type is None or t.type == task_type)
                token = page.next_page_token
                if not token or len(found) >= limit or pages >= max_pages:
                    break
            reply = pb.ListTasksResponse(tasks=found, next_page_token=token)

    def human() -> None:
        click.echo(f"{'TASK':36}  {'STATUS':9}  {'TYPE':20}  {'ATTEMPT':7}  RUN AT")
        for t in reply.tasks:
            click.echo(
                f"{t.task_id:36}  {pb.TaskStatus.Name(t.status):9}  {t.type[:20]:20}  "
                f"{t.attempt}/{t.max_attempts:<5}  {fmt_ts(t.run_at)}"
            )
        if task_type is not None:
            click.echo(f"({len(reply.tasks)} of type {task_type} in {pages} page(s) read)", err=True)
        if reply.next_page_token:
            click.echo(f"more: --page-token {reply.next_page_token}")

    emit(reply, obj["json"], human)


@task.command("count")
@namespace_option
@click.option("--status", type=click.Choice(STATUSES), default=None,
              help="FAILED: the dead letters, counted exactly from their index; others: a bounded scan of recent tasks.")  # fmt: skip
@click.option("--type", "task_type", default=None, callback=text_option, help="Only tasks of this type.")
@json_option
@click.pass_obj
def count_tasks(obj: dict[str, Any], namespace: str, status: str | None, task_type: str | None) -> None:
    """Count a namespace's tasks per type and status (failed tasks: --status FAILED)."""
    request = pb.CountTasksRequest(
        namespace=namespace,
        status=pb.TaskStatus.Value(status) if status else pb.TASK_STATUS_UNSPECIFIED,
        type=task_type or "",
    )
    reply = call(obj, lambda s: s.CountTasks(request, timeout=60))

    def human() -> None:
        click.echo(f"{'TYPE':40}  {'STATUS':9}  COUNT")
        for row in reply.rows:
            click.echo(f"{row.type[:40]:40}  {pb.TaskStatus.Name(row.status):9}  {row.count}")
        how = "exact" if reply.exact else "at least (the server's bound of rows read was reached)"
        click.echo(f"({how}; {pb.CountMethod.Name(reply.method)}, {reply.scanned} rows read)", err=True)

    emit(reply, obj["json"], human)
@task.command()
@click.argument("task_id", callback=_task_id)
@click.option("--limit", type=click.IntRange(0, INT32_MAX), default=0, help="At most this many entries (0: the server's history_max_entries).")
@json_option
@click.pass_obj
def history(obj: dict[str, Any], task_id: str, limit: int) -> None:
    """Show a task's attempts (worker, lease token, start, end, outcome, error, last progress)
    and operator actions, newest first."""
    reply = call(obj, lambda s: s.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id, limit=limit), timeout=10))
    emit(reply, obj["json"], lambda: _print_history(reply.entries))


def _print_history(entries: Any) -> None:
    """One line per entry, newest first; an attempt's error and progress message follow on their own line."""
    click.echo(f"{'ATTEMPT':7}  {'TOKEN':>5}  {'OUTCOME':12}  {'STARTED':29}  {'ENDED':29}  {'WORKER':24}  PROGRESS")
    for e in entries:
        if e.kind == pb.HISTORY_ENTRY_KIND_OPERATION:
            operation = pb.HistoryOperation.Name(e.operation).removeprefix("HISTORY_OPERATION_")
            click.echo(f"{'-':7}  {e.lease_token:>5}  {operation:12}  {fmt_ts(e.started_at):29}  {'-':29}  "
                       f"{printable(e.operator or '-')[:24]:24}  {printable(e.reason)}")  # fmt: skip
            continue
        outcome = pb.HistoryOutcome.Name(e.outcome).removeprefix("HISTORY_OUTCOME_")
        progress = f"{e.progress.percent:.0f}% {printable(e.progress.message)[:60]}".rstrip()
        click.echo(f"{e.attempt:<7}  {e.lease_token:>5}  {outcome:12}  {fmt_ts(e.started_at):29}  "
                   f"{fmt_ts(e.ended_at):29}  {printable(e.worker_id)[:24]:24}  {progress}")  # fmt: skip
        if e.error or e.error_type:
            click.echo(f"{'':7}  {'':>5}  {printable((e.error_type + ': ' if e.error_type else '') + e.error)[:200]}")
    if not entries:
        click.echo("(no history: the task has not been claimed yet)")
# ---------------------------------------------------------------- operator actions (docs/operations.md)

_version_option = click.option(
    "--version", "expected_version", default=None, callback=text_option,
    help="The task's version as you read it (task poll shows it). Omitted: the command reads the current "
    "version and says so on stderr (it then acts on whatever state the task is in now).",
)  # fmt: skip
_reason_option = click.option("--reason", required=True, callback=text_option, help="Why (1..500 characters; kept in the task's history).")


def _operate(obj: dict[str, Any], task_id: str, expected_version: str | None, act: Callable[[Any, str], Any]) -> None:
    """Read the version when none was given (saying so), then ``act(stub, version)`` on OperatorService."""
    if expected_version is None:
        view = call(obj, lambda s: s.PollTask(pb.PollTaskRequest(task_id=task_id), timeout=10)).task
        expected_version = view.version
        click.echo(
            f"no --version given: read {expected_version} (task {task_id} is {pb.TaskStatus.Name(view.status)}, "
            f"attempt {view.attempt}) and acting on it", err=True,
        )  # fmt: skip
    version = expected_version
    reply = call(obj, lambda s: act(s, version), pb_grpc.OperatorServiceStub)
    emit(reply, obj["json"], lambda: _print_task(reply.task))


@task.command("retry")
@click.argument("task_id", callback=_task_id)
@_version_option
@_reason_option
@click.option("--at", "run_at", default=None, help="Run at this ISO-8601 time (default now).")
@click.option("--payload", default=None, help="A new payload (as task schedule's --payload: @PATH, -, @@TEXT).")
@click.option("--payload-file", type=click.File("rb"), default=None, help="A new payload from a file ('-' = stdin).")
@json_option
@click.pass_obj
def retry_task(
    obj: dict[str, Any], task_id: str, expected_version: str | None, reason: str, run_at: str | None,
    payload: str | None, payload_file: Any,
) -> None:  # fmt: skip
    """Run a FAILED or CANCELLED task again from attempt 1 (operator token)."""
    new_payload = read_payload(payload, payload_file) if payload is not None or payload_file is not None else None
    request = pb.RetryTaskRequest(task_id=task_id, reason=reason)
    if run_at is not None:
        request.run_at.FromDatetime(parse_run_at(run_at))
    if new_payload is not None:
        request.payload, request.has_payload = new_payload, True

    def act(stub: Any, version: str) -> Any:
        request.expected_version = version
        return stub.RetryTask(request, timeout=10)

    _operate(obj, task_id, expected_version, act)


@task.command("resume")
@click.argument("task_id", callback=_task_id)
@_version_option
@_reason_option
@json_option
@click.pass_obj
def resume_task(obj: dict[str, Any], task_id: str, expected_version: str | None, reason: str) -> None:
    """Run a task waiting for its retry backoff now (operator token)."""
    _operate(obj, task_id, expected_version, lambda s, v: s.ResumeTask(
        pb.ResumeTaskRequest(task_id=task_id, expected_version=v, reason=reason), timeout=10))  # fmt: skip


@task.command("mark-failed")
@click.argument("task_id", callback=_task_id)
@_version_option
@_reason_option
@json_option
@click.pass_obj
def mark_failed(obj: dict[str, Any], task_id: str, expected_version: str | None, reason: str) -> None:
    """Stop a SCHEDULED task (one waiting to retry): FAILED, MarkedFailed (operator token)."""
    _operate(obj, task_id, expected_version, lambda s, v: s.MarkTaskFailed(
        pb.MarkTaskFailedRequest(task_id=task_id, expected_version=v, reason=reason), timeout=10))  # fmt: skip


@task.command("terminate")
@click.argument("task_id", callback=_task_id)
@_version_option
@_reason_option
@json_option
@click.pass_obj
def terminate(obj: dict[str, Any], task_id: str, expected_version: str | None, reason: str) -> None:
    """Revoke a RUNNING task's lease now: FAILED, Terminated; its worker stops it (operator token)."""
    _operate(obj, task_id, expected_version, lambda s, v: s.TerminateTask(
        pb.TerminateTaskRequest(task_id=task_id, expected_version=v, reason=reason), timeout=10))  # fmt: skip


BULK_OPERATIONS = {"retry": pb.BULK_RETRY, "resume": pb.BULK_RESUME, "mark-failed": pb.BULK_MARK_FAILED,
                   "terminate": pb.BULK_TERMINATE}  # fmt: skip


@task.command("bulk")
@click.argument("operation", type=click.Choice(sorted(BULK_OPERATIONS)))
@namespace_option
@click.option("--type", "task_type", default="", callback=text_option, help="Only tasks of this type.")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only tasks in this status (default: every status the operation applies to).")
@click.option("--created-after", default=None, help="Only tasks created at or after this ISO-8601 time.")
@click.option("--created-before", default=None, help="Only tasks created before this ISO-8601 time.")
@click.option("--max-count", type=click.IntRange(1, 10_000), required=True, help="Act on at most this many tasks (1..10000).")
@click.option("--rate", type=click.FloatRange(0, 1000, min_open=True), default=50.0, show_default=True, help="Tasks per second at most.")
@_reason_option
@click.option("--dry-run", is_flag=True, help="Only count the tasks that match.")
@json_option
@click.pass_obj
def bulk(
    obj: dict[str, Any], operation: str, namespace: str, task_type: str, status: str | None, created_after: str | None,
    created_before: str | None, max_count: int, rate: float, reason: str, dry_run: bool,
) -> None:  # fmt: skip
    """Apply an operator action to every task a filter matches, each on its own current version
    (a task that changed since it was listed is counted as a conflict and left alone)."""
    request = pb.BulkOperateRequest(
        operation=BULK_OPERATIONS[operation], namespace=namespace, type=task_type, max_count=max_count,
        rate_per_second=rate, reason=reason, dry_run=dry_run,
        status=pb.TaskStatus.Value(status) if status else pb.TASK_STATUS_UNSPECIFIED,
    )  # fmt: skip
    if created_after is not None:
        request.created_after.FromDatetime(parse_run_at(created_after, "--created-after"))
    if created_before is not None:
        request.created_before.FromDatetime(parse_run_at(created_before, "--created-before"))
    # The server stops before its own ceiling (rpc_timeout_s) and says so; this deadline is only the backstop.
    reply = call(obj, lambda s: s.BulkOperate(request, timeout=60), pb_grpc.OperatorServiceStub)

    def human() -> None:
        click.echo(
            f"{'dry run: ' if dry_run else ''}matched {reply.matched}, applied {reply.applied}, "
            f"conflicts {reply.conflicts}, failed {reply.failed}"
        )
        for task_id in reply.applied_task_ids:
            click.echo(task_id)
        if reply.stopped_at_time_limit:
            click.echo("stopped at the call's time limit before --max-count: run it again for the rest", err=True)

    emit(reply, obj["json"], human)


def register(cli: click.Group) -> None:
    cli.add_command(task)
