"""``leasesched schedule ...`` and the client's schedule methods, against a fake
ScheduleService served over real gRPC in this process: the requests the CLI and
the client build, what they print, and their retries. The server's own rules
(cron syntax, time zones, overlap) are not checked here; only that they are
passed on as given."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from leasesched.cli import schedule_cmd
from leasesched.cli.task_cmd import parse_duration
from leasesched.client import (
    AsyncClient,
    CallRetry,
    Client,
    Overlap,
    RetryPolicy,
    ScheduleDefinition,
    ScheduleView,
    TaskStatus,
    UnavailableError,
    format_duration,
)
from leasesched.config import Config
from leasesched.testing.processes import free_port
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

UTC = dt.timezone.utc
TASK_ID = "00000000-0000-0000-0000-000000001234"
FAST = CallRetry(initial_backoff=dt.timedelta(milliseconds=10), max_backoff=dt.timedelta(milliseconds=50))


def ts(hour: int, minute: int = 0, day: int = 3) -> dt.datetime:
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=UTC)


def description(schedule: pb.Schedule | None = None, version: int = 1) -> pb.ScheduleDescription:
    """A schedule as a server would describe it: every section filled."""
    if schedule is None:
        schedule = pb.Schedule(
            namespace="default", schedule_id="nightly", paused=True, note="deploy freeze", limited_actions=True,
            remaining_actions=3, spec=pb.ScheduleSpec(cron=["30 2 * * *"], time_zone="Europe/Berlin"),
            action=pb.TaskSpec(namespace="default", type="report", payload=b"{\"month\": 12}", priority=7, has_priority=True),
            policy=pb.SchedulePolicy(overlap=pb.OVERLAP_BUFFER_ONE, pause_on_failure=True),
        )  # fmt: skip
        schedule.spec.jitter.FromSeconds(30)
        schedule.policy.catchup_window.FromSeconds(5400)
    desc = pb.ScheduleDescription(schedule=schedule, version=version, fired_total=12, skipped_total=4, backfills_pending=1)
    for day in range(4, 9):
        desc.next_fire_times.add().FromDatetime(ts(1, 30, day))
    run = desc.recent_runs.add(task_id=TASK_ID, status=pb.FAILED, cause="schedule")
    run.nominal_time.FromDatetime(ts(1, 30))
    unknown = desc.recent_runs.add(task_id="t-2", cause="trigger")  # status UNSPECIFIED: not known
    unknown.nominal_time.FromDatetime(ts(0, 10))
    skipped = desc.skipped.add(count=3, reason="overlap")
    skipped.first.FromDatetime(ts(1, 30, 1))
    skipped.last.FromDatetime(ts(1, 30, 2))
    desc.buffered.add().FromDatetime(ts(2, 0))
    return desc


@dataclass
class FakeSchedules(pb_grpc.ScheduleServiceServicer):
    """Records every request; a method's queued failures come first (``failures``),
    then its answer. ListSchedules answers ``pages`` (schedule ids) by opaque token."""

    requests: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, list[grpc.StatusCode]] = field(default_factory=lambda: defaultdict(list))
    pages: list[list[str]] = field(default_factory=lambda: [["nightly"]])
    trigger_reply: pb.TriggerScheduleResponse = field(default_factory=lambda: pb.TriggerScheduleResponse(task_id=TASK_ID, outcome="started"))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.requests[method].append(request)
            code = self.failures[method].pop(0) if self.failures[method] else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")

    def CreateSchedule(self, request: pb.CreateScheduleRequest, context: grpc.ServicerContext) -> pb.CreateScheduleResponse:
        self._enter("CreateSchedule", request, context)
        return pb.CreateScheduleResponse(schedule=description(request.schedule))

    def UpdateSchedule(self, request: pb.UpdateScheduleRequest, context: grpc.ServicerContext) -> pb.UpdateScheduleResponse:
        self._enter("UpdateSchedule", request, context)
        return pb.UpdateScheduleResponse(schedule=description(request.schedule, version=2))

    def DeleteSchedule(self, request: pb.DeleteScheduleRequest, context: grpc.ServicerContext) -> pb.DeleteScheduleResponse:
        self._enter("DeleteSchedule", request, context)
        return pb.DeleteScheduleResponse()

    def DescribeSchedule(self, request: pb.DescribeScheduleRequest, context: grpc.ServicerContext) -> pb.DescribeScheduleResponse:
        self._enter("DescribeSchedule", request, context)
        return pb.DescribeScheduleResponse(schedule=description())

    def ListSchedules(self, request: pb.ListSchedulesRequest, context: grpc.ServicerContext) -> pb.ListSchedulesResponse:
        self._enter("ListSchedules", request, context)
        index = int(request.page_token.removeprefix("opaque:")) if request.page_token else 0
        token = f"opaque:{index + 1}" if index + 1 < len(self.pages) else ""
        found = []
        for schedule_id in self.pages[index]:
            desc = description()
            desc.schedule.schedule_id = schedule_id
            found.append(desc)
        return pb.ListSchedulesResponse(schedules=found, next_page_token=token)

    def PauseSchedule(self, request: pb.PauseScheduleRequest, context: grpc.ServicerContext) -> pb.PauseScheduleResponse:
        self._enter("PauseSchedule", request, context)
        desc = description()
        desc.schedule.note = request.note
        return pb.PauseScheduleResponse(schedule=desc)

    def UnpauseSchedule(self, request: pb.UnpauseScheduleRequest, context: grpc.ServicerContext) -> pb.UnpauseScheduleResponse:
        self._enter("UnpauseSchedule", request, context)
        desc = description()
        desc.schedule.paused, desc.schedule.note = False, ""
        return pb.UnpauseScheduleResponse(schedule=desc)

    def TriggerSchedule(self, request: pb.TriggerScheduleRequest, context: grpc.ServicerContext) -> pb.TriggerScheduleResponse:
        self._enter("TriggerSchedule", request, context)
        return self.trigger_reply

    def BackfillSchedule(self, request: pb.BackfillScheduleRequest, context: grpc.ServicerContext) -> pb.BackfillScheduleResponse:
        self._enter("BackfillSchedule", request, context)
        return pb.BackfillScheduleResponse(slots=24)

    @property
    def calls(self) -> int:
        return sum(len(r) for r in self.requests.values())

    def last(self, method: str) -> Any:
        return self.requests[method][-1]


@pytest.fixture
def server() -> Iterator[tuple[FakeSchedules, str]]:
    fake = FakeSchedules()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ScheduleServiceServicer_to_server(fake, srv)
    target = f"127.0.0.1:{free_port()}"
    srv.add_insecure_port(target)
    srv.start()
    try:
        yield fake, target
    finally:
        srv.stop(0)


@pytest.fixture
def fake(server: tuple[FakeSchedules, str]) -> FakeSchedules:
    return server[0]


@pytest.fixture
def run(server: tuple[FakeSchedules, str]) -> Any:
    def invoke(args: list[str], stdin: bytes | None = None) -> Result:
        return CliRunner().invoke(schedule_cmd.schedule, ["--target", server[1], *args], obj=Config(), input=stdin)

    return invoke


# ---------------------------------------------------------------- the requests the CLI builds


def test_create_sends_the_whole_definition(run: Any, fake: FakeSchedules) -> None:
    result = run([
        "create", "nightly", "-n", "team-a", "--cron", "30 2 * * *", "--cron", "0 12 * * 6", "--time-zone", "Europe/Berlin",
        "--start-at", "2026-12-01T00:00:00+01:00", "--end-at", "2027-01-01", "--jitter", "30s", "--type", "report",
        "--payload", "p", "--priority", "0", "--max-attempts", "5", "--initial-interval", "250ms",
        "--non-retryable", "ValueError", "--start-to-close", "1h30m", "--lease", "45s", "--overlap", "buffer-one",
        "--catchup-window", "2h", "--pause-on-failure", "--paused", "--note", "not yet", "--remaining-actions", "0",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    schedule = fake.last("CreateSchedule").schedule
    assert (schedule.namespace, schedule.schedule_id) == ("team-a", "nightly")
    spec = schedule.spec
    assert list(spec.cron) == ["30 2 * * *", "0 12 * * 6"] and spec.time_zone == "Europe/Berlin"
    assert spec.start_at.ToJsonString() == "2026-11-30T23:00:00Z" and spec.end_at.ToJsonString() == "2027-01-01T00:00:00Z"
    assert spec.jitter.ToSeconds() == 30 and not spec.HasField("every")
    action = schedule.action
    assert (action.namespace, action.type, action.payload) == ("team-a", "report", b"p")
    assert action.has_priority and action.priority == 0 and action.WhichOneof("when") is None
    assert action.retry_policy.maximum_attempts == 5 and action.retry_policy.initial_interval.ToMilliseconds() == 250
    assert list(action.retry_policy.non_retryable_error_types) == ["ValueError"]
    assert action.timeouts.start_to_close.ToSeconds() == 5400 and action.lease_duration.ToSeconds() == 45
    policy = schedule.policy
    assert policy.overlap == pb.OVERLAP_BUFFER_ONE and policy.catchup_window.ToSeconds() == 7200 and policy.pause_on_failure
    assert schedule.paused and schedule.note == "not yet"
    assert schedule.limited_actions and schedule.remaining_actions == 0, "0 remaining is a limit, not 'no limit'"
    assert "   schedule  team-a/nightly\n" in result.stdout  # the created schedule is shown


def test_create_every_and_defaults_left_to_the_server(run: Any, fake: FakeSchedules) -> None:
    assert run(["create", "tick", "--every", "1h30m", "--offset", "5m", "--type", "t"]).exit_code == 0
    schedule = fake.last("CreateSchedule").schedule
    assert schedule.namespace == "default" and not schedule.spec.cron and schedule.spec.time_zone == ""
    assert schedule.spec.every.ToSeconds() == 5400 and schedule.spec.offset.ToSeconds() == 300
    assert not schedule.spec.HasField("jitter") and not schedule.spec.HasField("start_at")
    assert schedule.policy == pb.SchedulePolicy(), "overlap, catch-up window: the server's defaults"
    assert not schedule.limited_actions and not schedule.paused
    assert not schedule.action.has_priority and schedule.action.retry_policy == pb.RetryPolicy()


def test_cron_and_every_together_are_the_servers_to_refuse(run: Any, fake: FakeSchedules) -> None:
    fake.failures["CreateSchedule"] = [grpc.StatusCode.INVALID_ARGUMENT]
    result = run(["create", "x", "--cron", "* * * * *", "--every", "1m", "--type", "t"])
    assert result.exit_code == 1 and result.stderr == "INVALID_ARGUMENT: scripted INVALID_ARGUMENT\n"
    assert len(fake.requests["CreateSchedule"]) == 1


def test_update_sends_the_expected_version_and_says_it_replaces_everything(run: Any, fake: FakeSchedules) -> None:
    result = run(["update", "nightly", "--cron", "0 3 * * *", "--type", "report", "--expected-version", "7"])
    assert result.exit_code == 0, result.output
    request = fake.last("UpdateSchedule")
    assert request.expected_version == 7 and list(request.schedule.spec.cron) == ["0 3 * * *"]
    assert "    version  2 " in result.stdout
    assert run(["update", "nightly", "--every", "10m", "--type", "report"]).exit_code == 0
    assert fake.last("UpdateSchedule").expected_version == 0, "0 = any version"
    text = " ".join(run(["update", "--help"]).stdout.split())
    assert "Replace the whole definition" in text and "left out goes back to its default" in text
    assert "--paused" not in text, "an update keeps the pause state: pause/unpause change it"


def test_trigger_prints_the_task_id_alone_and_sends_the_overlap(run: Any, fake: FakeSchedules) -> None:
    result = run(["trigger", "nightly", "-n", "team-a", "--overlap", "allow-all"])
    assert result.exit_code == 0 and result.stdout == f"{TASK_ID}\n" and result.stderr == ""
    request = fake.last("TriggerSchedule")
    assert (request.ref.namespace, request.ref.schedule_id, request.overlap) == ("team-a", "nightly", pb.OVERLAP_ALLOW_ALL)
    assert run(["trigger", "nightly"]).exit_code == 0
    assert fake.last("TriggerSchedule").overlap == pb.OVERLAP_POLICY_UNSPECIFIED, "the schedule's own policy"


def test_trigger_that_was_skipped_says_so_on_stderr_and_exits_0(run: Any, fake: FakeSchedules) -> None:
    fake.trigger_reply = pb.TriggerScheduleResponse(outcome="skipped: overlap")
    result = run(["trigger", "nightly"])
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == "skipped: overlap (no task created)\n"


def test_backfill_sends_the_range_and_prints_the_slot_count(run: Any, fake: FakeSchedules) -> None:
    result = run(["backfill", "nightly", "--start-at", "2026-11-01", "--end-at", "2026-11-24T23:59:59Z", "--overlap", "buffer-all"])
    assert result.exit_code == 0 and result.stdout == "24\n"
    request = fake.last("BackfillSchedule")
    assert request.start_at.ToJsonString() == "2026-11-01T00:00:00Z" and request.end_at.ToJsonString() == "2026-11-24T23:59:59Z"
    assert request.overlap == pb.OVERLAP_BUFFER_ALL


def test_pause_unpause_delete(run: Any, fake: FakeSchedules) -> None:
    result = run(["pause", "nightly", "--note", "deploy freeze"])
    assert result.exit_code == 0 and result.stdout == "default/nightly: paused: deploy freeze\n"
    assert fake.last("PauseSchedule").note == "deploy freeze"
    assert run(["unpause", "nightly"]).stdout == "default/nightly: active\n"
    result = run(["delete", "nightly", "-n", "team-a", "--expected-version", "4"])
    assert result.exit_code == 0 and result.stdout == "deleted team-a/nightly\n"
    request = fake.last("DeleteSchedule")
    assert (request.ref.namespace, request.ref.schedule_id, request.expected_version) == ("team-a", "nightly", 4)


# ---------------------------------------------------------------- what describe and list print


def test_describe_prints_every_section(run: Any, fake: FakeSchedules) -> None:
    result = run(["describe", "nightly"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:7] == [
        "   schedule  default/nightly",
        "       spec  cron '30 2 * * *' in Europe/Berlin, jitter 30s",
        '     action  report  priority=7  payload={"month": 12}',
        "     policy  overlap=buffer-one  catchup-window=1h30m  pause-on-failure=yes",
        "      state  paused: deploy freeze",
        "    actions  3 remaining",
        "    version  1  created -  updated -",
    ]
    fires = [line for line in lines if line.startswith("  next fire") or (line.startswith(" " * 13) and "T01:30" in line)]
    assert len(fires) == 5 and fires[0] == "  next fire  2026-12-04T01:30:00.000+00:00"
    assert f"recent runs  2026-12-03T01:30:00.000+00:00  {TASK_ID}  FAILED  schedule" in lines
    assert "             2026-12-03T00:10:00.000+00:00  t-2  UNKNOWN  trigger" in lines
    assert "    skipped  2026-12-01T01:30:00.000+00:00 .. 2026-12-02T01:30:00.000+00:00  3 x overlap" in lines
    assert "   buffered  2026-12-03T02:00:00.000+00:00" in lines
    assert lines[-1] == "     totals  fired 12  skipped 4  backfills pending 1"
    assert fake.last("DescribeSchedule").ref == pb.ScheduleRef(namespace="default", schedule_id="nightly")


def test_list_reads_every_page(run: Any, fake: FakeSchedules) -> None:
    fake.pages = [["a", "b"], ["c"], ["d"]]
    result = run(["list", "-n", "team-a", "--page-size", "2"])
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["a", "b", "c", "d"]
    assert rows[0].split("  ", 1)[1].split() == ["yes", "2026-12-04T01:30:00.000+00:00", "cron", "'30", "2", "*", "*",
                                                 "*'", "in", "Europe/Berlin,", "jitter", "30s"]  # fmt: skip
    requests = fake.requests["ListSchedules"]
    assert [(r.namespace, r.page_size, r.page_token) for r in requests] == [
        ("team-a", 2, ""), ("team-a", 2, "opaque:1"), ("team-a", 2, "opaque:2")
    ]  # fmt: skip


# ---------------------------------------------------------------- --json


JSON_COMMANDS = [
    ["create", "n", "--cron", "* * * * *", "--type", "t", "--payload", "hi"],
    ["update", "n", "--every", "1m", "--type", "t"],
    ["describe", "n"], ["list"], ["pause", "n"], ["unpause", "n"], ["trigger", "n"],
    ["backfill", "n", "--start-at", "2026-01-01", "--end-at", "2026-01-02"], ["delete", "n"],
]  # fmt: skip


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: a[0])
def test_every_command_prints_json_after_or_before_the_sub_command(run: Any, fake: FakeSchedules, args: list[str]) -> None:
    for argv in ([*args, "--json"], ["--json", *args]):
        result = run(argv)
        assert result.exit_code == 0, result.output
        assert isinstance(json.loads(result.stdout), dict)


def test_json_shapes(run: Any, fake: FakeSchedules) -> None:
    described = json.loads(run(["describe", "nightly", "--json"]).stdout)["schedule"]
    assert described["schedule"]["action"]["payload"] == '{"month": 12}', "a UTF-8 payload as text"
    assert described["schedule"]["action"]["payload_encoding"] == "utf-8"
    assert described["version"] == "1" and len(described["next_fire_times"]) == 5
    assert json.loads(run(["trigger", "nightly", "--json"]).stdout) == {"task_id": TASK_ID, "outcome": "started"}
    assert json.loads(run(["backfill", "n", "--start-at", "2026-01-01", "--end-at", "2026-01-02", "--json"]).stdout) == {"slots": "24"}
    fake.pages = [["a"], ["b"]]
    listed = json.loads(run(["list", "--json"]).stdout)
    assert [s["schedule"]["schedule_id"] for s in listed["schedules"]] == ["a", "b"] and "next_page_token" not in listed


# ---------------------------------------------------------------- bad input: one line, exit 2, no call


BAD_INPUT = [
    ["create", "x", "--every", "soon", "--type", "t"],
    ["create", "x", "--every", "0s", "--type", "t"],
    ["create", "x", "--every", "1m1h", "--type", "t"],
    ["create", "x", "--cron", "* * * * *", "--jitter", "-5s", "--type", "t"],
    ["create", "x", "--cron", "* * * * *", "--catchup-window", "1y", "--type", "t"],
    ["create", "x", "--cron", "* * * * *", "--overlap", "queue", "--type", "t"],
    ["create", "x", "--cron", "* * * * *", "--start-at", "tomorrow", "--type", "t"],
    ["create", "x", "--cron", "* * * * *", "--remaining-actions", "-1", "--type", "t"],
    ["create", "x", "--cron", "* * * * *", "--priority", "10", "--type", "t"],
    ["create", "x", "--cron", "* * * * *", "--type", "t", "--payload", "x", "--payload-file", "/dev/null"],
    ["create", "x", "--cron", "* * * * *"],
    ["create", "x", "--cron", "* * * * *", "--type", "bad\udcff"],
    ["create", "--cron", "* * * * *", "--type", "t"],
    ["update", "x", "--every", "1m", "--type", "t", "--expected-version", "-1"],
    ["update", "x", "--every", "1m", "--type", "t", "--paused"],
    ["trigger", "x", "--overlap", "never"],
    ["backfill", "x", "--start-at", "2026-01-01"],
    ["backfill", "x", "--start-at", "2026-01-01", "--end-at", "2026-13-01"],
    ["delete", "x", "--expected-version", "v3"],
    ["list", "--page-size", "0"],
    ["--token", "a b", "describe", "x"],
]


@pytest.mark.parametrize("args", BAD_INPUT, ids=lambda a: " ".join(a).encode("ascii", "backslashreplace").decode())
def test_every_input_error_is_one_line_and_exit_2(run: Any, fake: FakeSchedules, args: list[str]) -> None:
    result = run(args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    assert fake.calls == 0


def test_a_bad_time_names_its_option(run: Any) -> None:
    result = run(["backfill", "x", "--start-at", "2026-01-01", "--end-at", "later"])
    assert "Invalid value for '--end-at': 'later' is not an ISO-8601 time" in result.stderr


def test_the_group_is_registered_with_the_main_command() -> None:
    from leasesched.cli.main import _register, cli

    _register()
    assert "schedule" in cli.commands  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the Python client


def client(target: str) -> Client:
    return Client(target, config=Config(), call_retry=FAST)


def test_client_create_is_retried_and_returns_a_typed_view(server: tuple[FakeSchedules, str]) -> None:
    fake, target = server
    fake.failures["CreateSchedule"] = [grpc.StatusCode.UNAVAILABLE]
    definition = ScheduleDefinition(
        type="report", cron="30 2 * * *", time_zone="Europe/Berlin", every=None, jitter=dt.timedelta(seconds=30),
        overlap=Overlap.CANCEL_OTHER, catchup_window=600.0, remaining_actions=10, priority=3,
        retry_policy=RetryPolicy(maximum_attempts=2), start_at=ts(0),
    )  # fmt: skip
    with client(target) as c:
        view = c.create_schedule("nightly", definition, namespace="team-a")
    sent = fake.requests["CreateSchedule"]
    assert len(sent) == 2 and sent[0] == sent[1], "the same request again"
    schedule = sent[0].schedule
    assert list(schedule.spec.cron) == ["30 2 * * *"], "a lone string is one expression, not its characters"
    assert schedule.policy.overlap == pb.OVERLAP_CANCEL_OTHER and schedule.policy.catchup_window.ToSeconds() == 600
    assert schedule.limited_actions and schedule.remaining_actions == 10 and schedule.action.priority == 3
    assert view.schedule_id == "nightly" and view.namespace == "team-a" and view.overlap is Overlap.CANCEL_OTHER
    assert view.spec == "cron '30 2 * * *' in Europe/Berlin, from 2026-12-03T00:00:00Z, jitter 30s"
    assert view.remaining_actions == 10 and view.catchup_window == dt.timedelta(minutes=10)


def test_client_refuses_naive_times_before_any_call(server: tuple[FakeSchedules, str]) -> None:
    fake, target = server
    with client(target) as c:
        with pytest.raises(ValueError, match="start_at must be timezone-aware"):
            c.create_schedule("x", ScheduleDefinition(type="t", every=60, start_at=dt.datetime(2027, 1, 1)))
        with pytest.raises(ValueError, match="end_at must be timezone-aware"):
            c.backfill_schedule("x", ts(0), dt.datetime(2027, 1, 1))
    assert fake.calls == 0


def test_trigger_is_not_retried_after_an_unknown_outcome(server: tuple[FakeSchedules, str]) -> None:
    fake, target = server
    fake.failures["TriggerSchedule"] = [grpc.StatusCode.UNAVAILABLE]
    with client(target) as c:
        with pytest.raises(UnavailableError):
            c.trigger_schedule("nightly")
        assert len(fake.requests["TriggerSchedule"]) == 1, "a second attempt could start a second run"
        fake.failures["TriggerSchedule"] = [grpc.StatusCode.RESOURCE_EXHAUSTED]  # shed: nothing was done
        result = c.trigger_schedule("nightly", overlap=Overlap.SKIP)
    assert result.started and result.task_id == TASK_ID and len(fake.requests["TriggerSchedule"]) == 3
    assert fake.last("TriggerSchedule").overlap == pb.OVERLAP_SKIP


async def test_async_trigger_is_not_retried_after_an_unknown_outcome(server: tuple[FakeSchedules, str]) -> None:
    fake, target = server
    fake.failures["TriggerSchedule"] = [grpc.StatusCode.CANCELLED]
    async with AsyncClient(target, config=Config(), call_retry=FAST) as c:
        with pytest.raises(UnavailableError):
            await c.trigger_schedule("nightly")
        fake.trigger_reply = pb.TriggerScheduleResponse(outcome="buffered")
        assert not (await c.trigger_schedule("nightly")).started
    assert len(fake.requests["TriggerSchedule"]) == 2


def test_a_retried_delete_that_finds_nothing_has_deleted(server: tuple[FakeSchedules, str]) -> None:
    fake, target = server
    fake.failures["DeleteSchedule"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND]
    with client(target) as c:
        c.delete_schedule("nightly", expected_version=3)
        fake.failures["DeleteSchedule"] = [grpc.StatusCode.NOT_FOUND]
        with pytest.raises(Exception, match="NOT_FOUND"):
            c.delete_schedule("nightly")  # not retried: a real NOT_FOUND
    assert [r.expected_version for r in fake.requests["DeleteSchedule"]] == [3, 3, 0]


def test_a_retried_update_that_applied_returns_the_schedule(server: tuple[FakeSchedules, str]) -> None:
    fake, target = server
    fake.failures["UpdateSchedule"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION]
    with client(target) as c, pytest.raises(Exception, match="FAILED_PRECONDITION"):
        # The schedule the server describes is not the one sent: the refusal stands.
        c.update_schedule("nightly", ScheduleDefinition(type="t", every=60), expected_version=1)
    assert len(fake.requests["DescribeSchedule"]) == 1


async def test_async_list_schedules_follows_the_pages(server: tuple[FakeSchedules, str]) -> None:
    fake, target = server
    fake.pages = [["a"], ["b", "c"]]
    async with AsyncClient(target, config=Config(), call_retry=FAST, namespace="ns") as c:
        ids = [v.schedule_id async for v in c.list_schedules(page_size=2)]
    assert ids == ["a", "b", "c"]
    assert {(r.namespace, r.page_size) for r in fake.requests["ListSchedules"]} == {("ns", 2)}


def test_schedule_view_from_pb() -> None:
    view = ScheduleView.from_pb(description())
    assert view.paused and view.note == "deploy freeze" and view.version == 1
    assert view.next_fire_times[0] == ts(1, 30, 4) and len(view.next_fire_times) == 5
    assert view.recent_runs[0].status is TaskStatus.FAILED and view.recent_runs[1].status is None
    assert view.recent_runs[0].nominal_time == ts(1, 30) and view.recent_runs[0].cause == "schedule"
    assert (view.skipped[0].count, view.skipped[0].reason, view.skipped[0].first) == (3, "overlap", ts(1, 30, 1))
    assert view.buffered == (ts(2, 0),) and (view.fired_total, view.skipped_total) == (12, 4)
    assert view.every is None and view.time_zone == "Europe/Berlin" and view.created_at is None
    assert ScheduleView.from_pb(pb.ScheduleDescription()).overlap is Overlap.SKIP, "unspecified is the default, skip"


@pytest.mark.parametrize("text", ["500ms", "1s", "90s", "1h30m", "2d", "1d2h3m4s5ms", "0s"])
def test_format_duration_is_what_parse_duration_reads(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == seconds
    assert format_duration(dt.timedelta(seconds=seconds)) == format_duration(seconds)
    assert format_duration(90) == "1m30s" and format_duration(1e-6) == "1e-06"



def test_create_and_update_pass_the_key_and_gate_and_print_them(run: Any, fake: FakeSchedules) -> None:
    for command, method in (("create", "CreateSchedule"), ("update", "UpdateSchedule")):
        result = run([command, "keyed", "--every", "1h", "--type", "t", "--concurrency-key", "partner-7", "--gate", "stripe"])
        assert result.exit_code == 0, result.output
        action = fake.last(method).schedule.action
        assert (action.concurrency_key, action.gate) == ("partner-7", "stripe")
        assert "concurrency-key=partner-7  gate=stripe" in result.stdout  # the answer's action, as printed
    plain = ScheduleView.from_pb(description())
    assert (plain.concurrency_key, plain.gate) == ("", "")
