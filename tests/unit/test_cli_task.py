"""``leasesched task ...``: parsing and printing, against a fake TaskService stub (issue 11).

The end-to-end checks against a real cluster are in tests/integration/test_cli_task.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from leasesched.cli import task_cmd
from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb

TASK_ID = str(uuid.UUID(int=0x1234))
OTHER_ID = str(uuid.UUID(int=0x5678))


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeStub:
    """Records every request; answers from ``replies`` (a list per method: popped
    in order, the last one repeated), an exception in the list is raised."""

    def __init__(self) -> None:
        self.requests: dict[str, list[Any]] = {}
        self.replies: dict[str, list[Any]] = {
            "ScheduleTask": [pb.ScheduleTaskResponse(task_id=TASK_ID, created=True)],
            "PollTask": [pb.PollTaskResponse(task=view())],
            "CancelTask": [pb.CancelTaskResponse(task=view(status=pb.CANCELLED))],
            "ListTasks": [pb.ListTasksResponse(tasks=[view()])],
        }

    def _answer(self, method: str, request: Any) -> Any:
        self.requests.setdefault(method, []).append(request)
        queue = self.replies[method]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def ScheduleTask(self, request: Any, timeout: float | None = None) -> Any:
        return self._answer("ScheduleTask", request)

    def PollTask(self, request: Any, timeout: float | None = None) -> Any:
        return self._answer("PollTask", request)

    def CancelTask(self, request: Any, timeout: float | None = None) -> Any:
        return self._answer("CancelTask", request)

    def ListTasks(self, request: Any, timeout: float | None = None) -> Any:
        return self._answer("ListTasks", request)

    @property
    def calls(self) -> int:
        return sum(len(r) for r in self.requests.values())


def view(**fields: Any) -> pb.TaskView:
    base: dict[str, Any] = {"task_id": TASK_ID, "namespace": "default", "type": "demo.echo", "status": pb.SCHEDULED,
                            "attempt": 1, "max_attempts": 3}  # fmt: skip
    base.update(fields)
    return pb.TaskView(**base)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> FakeStub:
    fake = FakeStub()

    @contextlib.contextmanager
    def open_stub(target: str, cfg: Config, service: Any = None) -> Iterator[FakeStub]:
        yield fake

    monkeypatch.setattr(task_cmd, "open_stub", open_stub)
    return fake


def run(args: list[str], stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(task_cmd.task, args, obj=Config(), input=stdin)


def scheduled(stub: FakeStub) -> pb.ScheduleTaskRequest:
    request: pb.ScheduleTaskRequest = stub.requests["ScheduleTask"][-1]
    return request


# ---------------------------------------------------------------- item 1: the id alone


def test_schedule_prints_the_task_id_alone_on_stdout(stub: FakeStub) -> None:
    result = run(["schedule", "demo.echo", "--payload", "hi"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{TASK_ID}\n"
    assert result.stderr == ""


def test_schedule_verbose_says_the_details_on_stderr_only(stub: FakeStub) -> None:
    stub.replies["ScheduleTask"] = [pb.ScheduleTaskResponse(task_id=TASK_ID, created=False)]
    result = run(["schedule", "demo.echo", "-v", "--key", "k1"])
    assert result.exit_code == 0
    assert result.stdout == f"{TASK_ID}\n"
    assert "already scheduled (idempotency key matched)" in result.stderr and TASK_ID in result.stderr


def test_schedule_json_still_prints_the_json(stub: FakeStub) -> None:
    result = run(["--json", "schedule", "demo.echo"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"task_id": TASK_ID, "created": True}


# ---------------------------------------------------------------- item 2: input errors


BAD_INPUT = [
    ["schedule", "t", "--at", "tomorrow"],
    ["schedule", "t", "--at", "2026-13-45"],
    ["schedule", "t", "--at", "0001-01-01T00:00:00+05:00"],
    ["schedule", "t", "--delay", "soon"],
    ["schedule", "t", "--delay", "-5s"],
    ["schedule", "t", "--delay", "1m1h"],
    ["schedule", "t", "--delay", "99999999999999d"],
    ["schedule", "t", "--delay", "5s", "--at", "2030-01-01T00:00:00Z"],
    ["schedule", "t", "--priority", "10"],
    ["schedule", "t", "--priority", "99999999999"],
    ["schedule", "t", "--priority", "high"],
    ["schedule", "t", "--max-attempts", "0"],
    ["schedule", "t", "--max-attempts", "4294967296"],
    ["schedule", "t", "--lease", "0s"],
    ["schedule", "t", "--lease", "long"],
    ["schedule", "t", "--initial-interval", "0"],
    ["schedule", "t", "--max-interval", "x"],
    ["schedule", "t", "--backoff-coefficient", "0.5"],
    ["schedule", "t", "--backoff-coefficient", "nan"],
    ["schedule", "t", "--backoff-coefficient", "inf"],
    ["schedule", "t", "--backoff-coefficient", "two"],
    ["schedule", "t", "--schedule-to-start", "1y"],
    ["schedule", "t", "--start-to-close", "0ms"],
    ["schedule", "t", "--schedule-to-close", ""],
    ["schedule", "t", "--payload", "@/nonexistent/payload.json"],
    ["schedule", "t", "--payload", "x", "--payload-file", "/dev/null"],
    ["schedule", "t", "--payload-file", "/nonexistent/payload.bin"],
    ["schedule", "bad\udcfftype"],
    ["schedule", "t", "--key", "k\udcff"],
    ["schedule", "t", "--unknown-option"],
    ["schedule"],
    ["poll", "not-a-uuid"],
    ["poll", TASK_ID, "--timeout", "5s"],
    ["poll", TASK_ID, "--wait", "--timeout", "forever"],
    ["poll", TASK_ID, "--wait", "--interval", "0s"],
    ["cancel", "42"],
    ["list", "--limit", "0"],
    ["list", "--limit", "many"],
    ["list", "--status", "DONE"],
    ["list", "--max-pages", "0"],
    ["list", "--type", "x\udcff"],
    ["--token", "tök", "poll", TASK_ID],
    ["--token", "a b", "list"],
]


@pytest.mark.parametrize("args", BAD_INPUT, ids=lambda a: " ".join(a).encode("ascii", "backslashreplace").decode())
def test_every_input_error_is_one_line_and_exit_2(stub: FakeStub, args: list[str]) -> None:
    result = run(args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # no other exception escaped (no traceback)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    assert stub.calls == 0  # refused before any call


def test_a_bad_token_from_the_environment_is_refused_before_any_call(stub: FakeStub) -> None:
    result = CliRunner().invoke(task_cmd.task, ["poll", TASK_ID], obj=Config(token="line\nbreak"))
    assert result.exit_code == 2 and "Invalid value for 'LEASESCHED_TOKEN'" in result.stderr
    assert stub.calls == 0


def test_at_accepts_iso_times_utc_when_no_offset(stub: FakeStub) -> None:
    assert run(["schedule", "t", "--at", "2030-01-02T03:04:05"]).exit_code == 0
    assert scheduled(stub).task.run_at.ToJsonString() == "2030-01-02T03:04:05Z"
    assert run(["schedule", "t", "--at", "2030-01-02T03:04:05+01:00"]).exit_code == 0
    assert scheduled(stub).task.run_at.ToJsonString() == "2030-01-02T02:04:05Z"
    assert run(["schedule", "t", "--at", "2030-01-02T03:04:05.250Z"]).exit_code == 0
    assert scheduled(stub).task.run_at.ToJsonString() == "2030-01-02T03:04:05.250Z"


@pytest.mark.parametrize("command", [["schedule", "demo.echo"], ["poll", TASK_ID], ["cancel", TASK_ID], ["list"],
                                     ["poll", TASK_ID, "--wait"], ["list", "--type", "x"]])  # fmt: skip
def test_grpc_errors_are_one_line_code_and_details(stub: FakeStub, command: list[str]) -> None:
    error = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "lease_duration must be between 1 s and 3600 s,\nnot 7200 s")
    for method in stub.replies:
        stub.replies[method] = [error]
    result = run(command)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr == "INVALID_ARGUMENT: lease_duration must be between 1 s and 3600 s, not 7200 s\n"
    assert result.stdout == ""


# ---------------------------------------------------------------- item 3: --json in both places


@pytest.mark.parametrize(
    "args",
    [["--json", "poll", TASK_ID], ["poll", "--json", TASK_ID], ["poll", TASK_ID, "--json"]],
)
def test_json_is_accepted_before_and_after_the_sub_command(stub: FakeStub, args: list[str]) -> None:
    result = run(args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["task"]["task_id"] == TASK_ID


@pytest.mark.parametrize("sub", [["schedule", "t"], ["cancel", TASK_ID], ["list"]])
def test_json_after_every_sub_command(stub: FakeStub, sub: list[str]) -> None:
    result = run([*sub, "--json"])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), dict)


# ---------------------------------------------------------------- item 4: durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10), ("5m", 300), ("2h", 7200), ("1d", 86400), ("2d", 172800), ("1m30s", 90),
     ("1h30m", 5400), ("1d2h3m4s5ms", 93784.005), ("1.5h", 5400), ("90", 90), ("0.25", 0.25), (" 1m ", 60), ("0s", 0)],
)  # fmt: skip
def test_durations_single_and_compound(text: str, seconds: float) -> None:
    assert task_cmd.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1", "1x", "-1s", "+1s", "1m1h", "1s1s", "1ms1s", "1 m", "1h 30m", "1.5.2s",
                                  "nan", "inf", "1e3s", "1S", "1m30"])  # fmt: skip
def test_durations_refused(text: str) -> None:
    if text == "1":
        assert task_cmd.parse_duration(text) == 1  # a bare number is seconds
        return
    with pytest.raises(Exception) as info:
        task_cmd.parse_duration(text)
    assert type(info.value).__name__ == "BadParameter"


def test_compound_delay_reaches_the_request(stub: FakeStub) -> None:
    result = run(["schedule", "t", "--delay", "1m30s"])
    assert result.exit_code == 0, result.output
    assert scheduled(stub).task.delay.ToMilliseconds() == 90_000
    run(["schedule", "t", "--delay", "500ms"])
    assert scheduled(stub).task.delay.ToMilliseconds() == 500


def test_help_lists_every_unit(stub: FakeStub) -> None:
    text = " ".join(run(["schedule", "--help"]).stdout.split())
    for unit in ("ms", "s,", "m,", "h,", "d,", "1m30s", "1h30m"):
        assert unit in text


# ---------------------------------------------------------------- item 5: result encoding


def test_json_result_is_text_when_utf8_and_says_the_encoding(stub: FakeStub) -> None:
    stub.replies["PollTask"] = [pb.PollTaskResponse(task=view(status=pb.SUCCEEDED, result="héllo".encode(), payload=b"{}"))]
    task = json.loads(run(["poll", TASK_ID, "--json"]).stdout)["task"]
    assert task["result"] == "héllo" and task["result_encoding"] == "utf-8"
    assert task["payload"] == "{}" and task["payload_encoding"] == "utf-8"


def test_json_binary_result_is_base64_and_says_so(stub: FakeStub) -> None:
    raw = b"\xff\x00\xfe"
    stub.replies["ListTasks"] = [pb.ListTasksResponse(tasks=[view(result=raw)])]
    task = json.loads(run(["list", "--json"]).stdout)["tasks"][0]
    assert task["result_encoding"] == "base64" and base64.b64decode(task["result"]) == raw


def test_human_result_text_or_labelled_base64(stub: FakeStub) -> None:
    stub.replies["PollTask"] = [pb.PollTaskResponse(task=view(result=b"done\nok"))]
    out = run(["poll", TASK_ID]).stdout
    assert "   result  done\\nok\n" in out  # one line, the newline shown escaped
    stub.replies["PollTask"] = [pb.PollTaskResponse(task=view(result=b"\xff\x00"))]
    out = run(["poll", TASK_ID]).stdout
    assert "   result  [base64] /wA=\n" in out


# ---------------------------------------------------------------- item 6: the whole ScheduleTask contract


def test_schedule_sets_every_field_of_the_contract(stub: FakeStub) -> None:
    result = run([
        "schedule", "report.build", "-n", "team-a", "--payload", "p", "--delay", "1h30m", "--priority", "0",
        "--key", "key-1", "--lease", "45s", "--max-attempts", "7", "--initial-interval", "250ms",
        "--backoff-coefficient", "1.5", "--max-interval", "2m", "--non-retryable", "ValueError",
        "--non-retryable", "KeyError", "--schedule-to-start", "10m", "--start-to-close", "1m30s",
        "--schedule-to-close", "2h",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    request = scheduled(stub)
    spec = request.task
    assert request.idempotency_key == "key-1"
    assert (spec.namespace, spec.type, spec.payload) == ("team-a", "report.build", b"p")
    assert spec.delay.ToSeconds() == 5400
    assert spec.has_priority and spec.priority == 0
    assert spec.lease_duration.ToSeconds() == 45
    retry = spec.retry_policy
    assert retry.maximum_attempts == 7 and retry.initial_interval.ToMilliseconds() == 250
    assert retry.backoff_coefficient == 1.5 and retry.maximum_interval.ToSeconds() == 120
    assert list(retry.non_retryable_error_types) == ["ValueError", "KeyError"]
    assert spec.timeouts.schedule_to_start.ToSeconds() == 600
    assert spec.timeouts.start_to_close.ToSeconds() == 90
    assert spec.timeouts.schedule_to_close.ToSeconds() == 7200


def test_schedule_leaves_unset_fields_to_the_server(stub: FakeStub) -> None:
    assert run(["schedule", "t"]).exit_code == 0
    spec = scheduled(stub).task
    assert spec.WhichOneof("when") is None and not spec.has_priority
    assert spec.retry_policy == pb.RetryPolicy() and spec.timeouts == pb.Timeouts()
    assert not spec.HasField("lease_duration") and spec.payload == b""


def test_payload_from_file_stdin_and_escaped_at(stub: FakeStub, tmp_path: Path) -> None:
    path = tmp_path / "payload.bin"
    path.write_bytes(b"\x00\x01binary")
    assert run(["schedule", "t", "--payload", f"@{path}"]).exit_code == 0
    assert scheduled(stub).task.payload == b"\x00\x01binary"
    assert run(["schedule", "t", "--payload", "-"], stdin=b"from stdin").exit_code == 0
    assert scheduled(stub).task.payload == b"from stdin"
    assert run(["schedule", "t", "--payload", "@@handle"]).exit_code == 0
    assert scheduled(stub).task.payload == b"@handle"
    assert run(["schedule", "t", "--payload-file", str(path)]).exit_code == 0
    assert scheduled(stub).task.payload == b"\x00\x01binary"


def _progressing(final: int, **final_fields: Any) -> list[Any]:
    return [
        pb.PollTaskResponse(task=view(status=pb.SCHEDULED)),
        pb.PollTaskResponse(task=view(status=pb.RUNNING, progress=pb.Progress(percent=10, message="step 1"))),
        pb.PollTaskResponse(task=view(status=pb.RUNNING, progress=pb.Progress(percent=10, message="step 1"))),
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection reset"),  # a restart: tried again
        pb.PollTaskResponse(task=view(status=pb.RUNNING, progress=pb.Progress(percent=60, message="step 6"))),
        pb.PollTaskResponse(task=view(status=final, **final_fields)),
    ]


@pytest.mark.parametrize(
    ("final", "code", "fields"),
    [(pb.SUCCEEDED, 0, {"result": b"done"}), (pb.FAILED, 3, {"error": "boom", "error_type": "RuntimeError"}),
     (pb.CANCELLED, 4, {})],
)  # fmt: skip
def test_poll_wait_follows_until_final_and_the_exit_code_says_how(
    stub: FakeStub, final: int, code: int, fields: dict[str, Any]
) -> None:
    stub.replies["PollTask"] = _progressing(final, **fields)
    result = run(["poll", TASK_ID, "--wait", "--interval", "1ms", "--timeout", "1m"])
    assert result.exit_code == code, result.output
    progress = [line.split("  ", 1)[1] for line in result.stderr.splitlines() if "attempt" in line]
    assert progress == [
        "SCHEDULED  attempt 1/3",
        "RUNNING  attempt 1/3  10% step 1",  # shown once, not per poll
        "RUNNING  attempt 1/3  60% step 6",
        f"{pb.TaskStatus.Name(final)}  attempt 1/3" + ("  last error: boom" if final == pb.FAILED else ""),
    ]
    assert "UNAVAILABLE: connection reset (trying again)" in result.stderr
    assert f"   status  {pb.TaskStatus.Name(final)}" in result.stdout  # the final task on stdout


def test_poll_wait_json_prints_only_the_final_json_on_stdout(stub: FakeStub) -> None:
    stub.replies["PollTask"] = _progressing(pb.SUCCEEDED, result=b"done")
    result = run(["poll", "--wait", "--json", TASK_ID, "--interval", "1ms"])
    assert result.exit_code == 0
    task = json.loads(result.stdout)["task"]
    assert task["status"] == "SUCCEEDED" and task["result"] == "done"


def test_poll_wait_gives_up_at_the_timeout(stub: FakeStub) -> None:
    stub.replies["PollTask"] = [pb.PollTaskResponse(task=view(status=pb.RUNNING))]
    result = run(["poll", TASK_ID, "--wait", "--timeout", "200ms", "--interval", "20ms"])
    assert result.exit_code == 5
    assert "gave up after 0.2 s: the task is still RUNNING" in result.stderr


def test_poll_wait_stops_at_once_on_a_refusal(stub: FakeStub) -> None:
    stub.replies["PollTask"] = [FakeRpcError(grpc.StatusCode.NOT_FOUND, f"task {TASK_ID} not found")]
    result = run(["poll", TASK_ID, "--wait"])
    assert result.exit_code == 1 and result.stderr == f"NOT_FOUND: task {TASK_ID} not found\n"


def test_list_type_filters_over_pages(stub: FakeStub) -> None:
    ids = [str(uuid.UUID(int=i)) for i in range(6)]
    stub.replies["ListTasks"] = [
        pb.ListTasksResponse(tasks=[view(task_id=ids[0], type="a"), view(task_id=ids[1], type="b")], next_page_token="p2"),
        pb.ListTasksResponse(tasks=[view(task_id=ids[2], type="b")], next_page_token="p3"),
        pb.ListTasksResponse(tasks=[view(task_id=ids[3], type="a"), view(task_id=ids[4], type="a")], next_page_token="p4"),
        pb.ListTasksResponse(tasks=[view(task_id=ids[5], type="a")]),
    ]
    result = run(["list", "--type", "a", "--limit", "2", "--status", "RUNNING", "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert [t["task_id"] for t in reply["tasks"]] == [ids[0], ids[3], ids[4]]  # whole pages: nothing skipped
    assert reply["next_page_token"] == "p4"
    requests = stub.requests["ListTasks"]
    assert [r.page_token for r in requests] == ["", "p2", "p3"]
    assert all(r.page_size == 2 and r.status == pb.RUNNING for r in requests)


def test_list_type_stops_at_max_pages_and_says_where_to_resume(stub: FakeStub) -> None:
    stub.replies["ListTasks"] = [pb.ListTasksResponse(tasks=[view(type="other")], next_page_token="next")]
    result = run(["list", "--type", "a", "--max-pages", "3"])
    assert result.exit_code == 0
    assert len(stub.requests["ListTasks"]) == 3
    assert "more: --page-token next" in result.stdout
    assert "(0 of type a in 3 page(s) read)" in result.stderr


def test_list_without_type_reads_one_page(stub: FakeStub) -> None:
    stub.replies["ListTasks"] = [pb.ListTasksResponse(tasks=[view()], next_page_token="n")]
    result = run(["list", "--limit", "5", "--page-token", "t0"])
    assert result.exit_code == 0
    assert [(r.page_size, r.page_token) for r in stub.requests["ListTasks"]] == [(5, "t0")]
    assert "more: --page-token n" in result.stdout


def test_poll_says_when_no_worker_serves_the_type(stub: FakeStub) -> None:
    stub.replies["PollTask"] = [pb.PollTaskResponse(task=view(no_worker_for_type=True))]
    assert "  waiting  no running worker serves default/demo.echo" in run(["poll", TASK_ID]).stdout
    stub.replies["PollTask"] = [pb.PollTaskResponse(task=view())]
    assert "waiting" not in run(["poll", TASK_ID]).stdout


def test_a_bad_configuration_variable_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from leasesched.cli.main import _register, cli

    _register()  # what main() does before running
    monkeypatch.setenv("LEASESCHED_TASK_SERVICE_PORT", "abc")
    result = CliRunner().invoke(cli, ["task", "poll", TASK_ID])
    assert result.exit_code == 2 and "bad configuration: LEASESCHED_TASK_SERVICE_PORT='abc': expected int" in result.output
    assert "Traceback" not in result.output
