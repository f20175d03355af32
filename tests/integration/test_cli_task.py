"""``leasesched task ...`` end to end (issue 11): the real console script, as a
user runs it, against a real cluster (TaskService, TaskUpdater, a trigger and
a worker running ``tests.chaos_handlers`` in namespace "chaos").

One cluster serves the whole module; every test schedules its own tasks.
Parsing and printing details are covered by tests/unit/test_cli_task.py.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from leasesched.infra.local import LocalInfra
from leasesched.testing import LEASESCHED_BIN
from tests.cluster import NAMESPACE, LiveCluster, cluster_config, wait_for
from tests.processes import REPO, SessionGroup
from worker.handlers import Handlers, TaskContext

WAIT = ["--timeout", "90s"]  # generous on a loaded machine; a hang still ends

# A second worker runs these (``--module tests.integration.test_cli_task:binary_handlers``):
# a result that is not UTF-8, which the chaos handlers never return.
BINARY_NAMESPACE = "cli"
binary_handlers = Handlers(namespace=BINARY_NAMESPACE)


@binary_handlers.task("cli.binary")
def binary_result(ctx: TaskContext) -> bytes:
    return b"\xff" + bytes(ctx.payload)


@pytest.fixture(scope="module")
def cluster(infra: LocalInfra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    folder = tmp_path_factory.mktemp("cli-task")
    cfg = cluster_config(infra.config, "test_cli_task")
    live = LiveCluster(cfg=cfg, group=SessionGroup(log_dir=folder / "logs"), folder=folder)
    try:
        live.start(triggers=1, workers=1, slots=4)
        argv = ["worker", "--module", f"{__name__}:binary_handlers", "--slots", "2", "--drain-timeout", "5"]
        live.workers.append(live.group.start("worker", cfg, argv=argv))
        live.wait_workers_subscribed()
        yield live
    finally:
        live.dispose()


def _env() -> dict[str, str]:
    # Nothing of the test session's own configuration leaks into the CLI: it finds the server by --target.
    return {k: v for k, v in os.environ.items() if not k.startswith("LEASESCHED_")}


def cli(cluster: LiveCluster, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """``leasesched task --target <TaskService> ARGS``, as a user types it."""
    assert cluster.task_service is not None and cluster.task_service.target
    argv = [str(LEASESCHED_BIN), "task", "--target", cluster.task_service.target, *args]
    return subprocess.run(argv, input=stdin.decode() if stdin else None, capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=150)  # fmt: skip


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert result.returncode == code, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def work(seconds: float = 0.2, **extra: Any) -> str:
    return json.dumps({"seconds": seconds, **extra})


def schedule(cluster: LiveCluster, *args: str, task_type: str = "chaos.work") -> str:
    out = ok(cli(cluster, "schedule", task_type, "-n", NAMESPACE, *args)).stdout
    task_id = out.strip()
    assert out == f"{task_id}\n" and str(uuid.UUID(task_id)) == task_id, f"not a task id alone: {out!r}"
    return task_id


def ms(json_time: str) -> int:
    ts = Timestamp()
    ts.FromJsonString(json_time)
    return int(ts.ToMilliseconds())


def poll_json(cluster: LiveCluster, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = json.loads(ok(cli(cluster, "poll", task_id, "--json")).stdout)["task"]
    return task


# ---------------------------------------------------------------- item 1 (+ poll --wait): the README's walkthrough


def test_readme_walkthrough_id_then_poll_wait(cluster: LiveCluster) -> None:
    """``ID=$(leasesched task schedule ...)`` then ``poll --wait "$ID"``, in a real shell."""
    assert cluster.task_service is not None
    script = (
        'set -e\n'
        'ID=$("$BIN" task --target "$TARGET" schedule chaos.work -n chaos --payload "$PAYLOAD")\n'
        'echo "id=$ID"\n'
        '"$BIN" task --target "$TARGET" poll --wait "$ID" --timeout 90s\n'
    )  # fmt: skip
    env = {**_env(), "BIN": str(LEASESCHED_BIN), "TARGET": cluster.task_service.target,
           "PAYLOAD": work(0.3, progress=True)}  # fmt: skip
    result = ok(subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=150))
    first, rest = result.stdout.split("\n", 1)
    task_id = first.removeprefix("id=")
    assert str(uuid.UUID(task_id)) == task_id, first
    assert f"     task  {task_id}" in rest and "   status  SUCCEEDED" in rest
    assert "   result  done by " in rest
    # The states it saw on stderr (how many depends on timing), the last one final.
    progress = [line.split("  ", 1)[1] for line in result.stderr.splitlines() if "attempt" in line]
    assert progress and progress[-1].startswith("SUCCEEDED  attempt 1/"), result.stderr


def test_poll_wait_shows_progress_as_it_changes(cluster: LiveCluster) -> None:
    """A long task: ``poll --wait`` prints each new progress while it runs, then ends (exit 4) when it is cancelled."""
    assert cluster.task_service is not None and cluster.task_service.target
    task_id = schedule(cluster, "--payload", work(120, progress=True), "--lease", "1500ms")  # heartbeat every 0.5 s
    argv = [str(LEASESCHED_BIN), "task", "--target", cluster.task_service.target, "poll", "--wait", task_id,
            "--interval", "100ms", *WAIT]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        def running_steps() -> set[str]:
            return {line.split("  ", 1)[1] for line in list(lines) if "  RUNNING  attempt 1/" in line and "% step " in line}

        wait_for(lambda: len(running_steps()) >= 2, 60, "two different progress reports shown while it runs")
        ok(cli(cluster, "cancel", task_id))
        assert proc.wait(timeout=60) == 4
        reader.join(10)
        assert proc.stdout is not None and "   status  CANCELLED" in proc.stdout.read()
        shown = [line.split("  ", 1)[1] for line in lines if "attempt" in line]
        assert len(shown) == len(set(shown)), "a state was shown twice in a row"
        assert shown[-1].startswith("CANCELLED  attempt 1/"), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_schedule_verbose_and_idempotency_key(cluster: LiveCluster) -> None:
    key = f"cli-{uuid.uuid4().hex}"
    args = ["schedule", "chaos.work", "-n", NAMESPACE, "--payload", work(0.05), "--key", key, "-v"]
    first, again = ok(cli(cluster, *args)), ok(cli(cluster, *args))
    assert first.stdout == again.stdout and str(uuid.UUID(first.stdout.strip()))
    assert first.stderr.startswith(f"scheduled {first.stdout.strip()} to run at ")
    assert again.stderr.startswith(f"already scheduled (idempotency key matched) {first.stdout.strip()}")
    assert json.loads(ok(cli(cluster, "--json", *args)).stdout)["task_id"] == first.stdout.strip()


# ---------------------------------------------------------------- item 2: input errors and server refusals


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--at", "tomorrow"], "Invalid value for '--at'"), (["--at", "2026-13-45"], "Invalid value for '--at'"),
     (["--delay", "1m1h"], "Invalid value for '--delay'"), (["--priority", "10"], "Invalid value for '--priority'")],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(cluster: LiveCluster, args: list[str], says: str) -> None:
    result = ok(cli(cluster, "schedule", "chaos.work", "-n", NAMESPACE, *args), code=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--lease", "2h"], "INVALID_ARGUMENT: lease_duration must be between 1 s and 3600 s, not 7200 s"),
     (["--max-attempts", "1000000"], "INVALID_ARGUMENT: retry_policy.maximum_attempts 1000000 is out of range 1.."),
     (["--initial-interval", "10s", "--max-interval", "1s"],
      "INVALID_ARGUMENT: retry_policy.maximum_interval is shorter than initial_interval"),
     (["--non-retryable", "not a type"], "INVALID_ARGUMENT: retry_policy.non_retryable_error_types entry 'not a type'")],
)  # fmt: skip
def test_server_refusal_is_one_line_code_and_details(cluster: LiveCluster, args: list[str], says: str) -> None:
    result = ok(cli(cluster, "schedule", "chaos.work", "-n", NAMESPACE, *args), code=1)
    assert result.stderr.startswith(says) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_unknown_task_is_one_line_for_poll_wait_and_cancel(cluster: LiveCluster) -> None:
    missing = str(uuid.uuid4())
    for args in (["poll", missing], ["poll", "--wait", missing], ["cancel", missing]):
        result = ok(cli(cluster, *args), code=1)
        assert result.stderr.startswith("NOT_FOUND: ") and result.stderr.count("\n") == 1, result.stderr


# ---------------------------------------------------------------- item 3: --json in both places


def test_json_before_and_after_the_sub_command(cluster: LiveCluster) -> None:
    task_id = schedule(cluster, "--payload", work(0.05))
    before = json.loads(ok(cli(cluster, "--json", "poll", task_id)).stdout)
    after = json.loads(ok(cli(cluster, "poll", "--json", task_id)).stdout)
    assert before["task"]["task_id"] == after["task"]["task_id"] == task_id
    listed = json.loads(ok(cli(cluster, "list", "-n", NAMESPACE, "--json")).stdout)
    assert "tasks" in listed


# ---------------------------------------------------------------- item 4: compound durations


def test_compound_delay_is_honoured(cluster: LiveCluster) -> None:
    task_id = schedule(cluster, "--delay", "1s500ms", "--payload", work(0.05))
    task = poll_json(cluster, task_id)
    # run_at = created + 1.5 s exactly (TaskService stamps both from one clock reading).
    assert ms(task["run_at"]) - ms(task["created_at"]) == 1500, task
    done = json.loads(ok(cli(cluster, "poll", "--wait", "--json", task_id, *WAIT)).stdout)["task"]
    assert done["status"] == "SUCCEEDED" and ms(done["started_at"]) >= ms(task["run_at"])


# ---------------------------------------------------------------- item 5: result and payload encodings


def test_result_text_or_base64_says_its_encoding(cluster: LiveCluster, tmp_path: Path) -> None:
    task_id = schedule(cluster, "--payload", work(0.05))
    ok(cli(cluster, "poll", "--wait", task_id, *WAIT))
    task = poll_json(cluster, task_id)
    assert task["result"].startswith("done by ") and task["result_encoding"] == "utf-8"
    assert "   result  done by " in ok(cli(cluster, "poll", task_id)).stdout

    path = tmp_path / "payload.bin"
    path.write_bytes(b"\x00binary\xfe")  # from a file, bytes as they are; echoed after a 0xff
    out = ok(cli(cluster, "schedule", "cli.binary", "-n", BINARY_NAMESPACE, "--payload", f"@{path}")).stdout
    binary_id = out.strip()
    ok(cli(cluster, "poll", "--wait", binary_id, *WAIT))
    task = poll_json(cluster, binary_id)
    assert task["result_encoding"] == "base64" and base64.b64decode(task["result"]) == b"\xff\x00binary\xfe"
    human = ok(cli(cluster, "poll", binary_id)).stdout
    assert f"   result  [base64] {task['result']}\n" in human


# ---------------------------------------------------------------- item 6: the ScheduleTask contract, poll --wait, list --type


def test_retry_policy_retries_with_backoff_then_succeeds(cluster: LiveCluster) -> None:
    task_id = schedule(cluster, "--payload", work(0.05, fail=1), "--max-attempts", "3", "--initial-interval", "200ms",
                       "--backoff-coefficient", "1.5", "--max-interval", "1s", "--priority", "8", "--lease", "5s")  # fmt: skip
    result = ok(cli(cluster, "poll", "--wait", task_id, *WAIT))
    assert "  attempt  2 of 3\n" in result.stdout and "priority=8" in result.stdout
    assert "    error  RuntimeError: planned failure on attempt 1\n" in result.stdout  # the first attempt's error


def test_non_retryable_error_type_fails_at_once_exit_3(cluster: LiveCluster) -> None:
    task_id = schedule(cluster, "--payload", work(0.05, fail=5), "--max-attempts", "5", "--non-retryable", "ValueError",
                       "--non-retryable", "RuntimeError", "--initial-interval", "100ms")  # fmt: skip
    ok(cli(cluster, "poll", "--wait", task_id, *WAIT), code=3)
    task = poll_json(cluster, task_id)
    assert task["status"] == "FAILED" and task["attempt"] == 1 and task["error_type"] == "RuntimeError"


def test_start_to_close_timeout_fails_the_attempt(cluster: LiveCluster) -> None:
    task_id = schedule(cluster, "--payload", work(30), "--start-to-close", "1s", "--max-attempts", "1",
                       "--schedule-to-start", "1m", "--schedule-to-close", "10m")  # fmt: skip
    result = ok(cli(cluster, "poll", "--wait", task_id, *WAIT), code=3)
    assert "StartToCloseTimeout" in result.stdout


def test_cancel_then_poll_wait_exit_4_and_timeout_exit_5(cluster: LiveCluster) -> None:
    task_id = schedule(cluster, "--delay", "1h", "--payload", work())
    waited = ok(cli(cluster, "poll", "--wait", task_id, "--timeout", "1s", "--interval", "200ms"), code=5)
    assert "gave up after 1 s: the task is still SCHEDULED" in waited.stderr
    cancelled = json.loads(ok(cli(cluster, "cancel", task_id, "--json")).stdout)["task"]
    assert cancelled["status"] == "CANCELLED"
    ok(cli(cluster, "poll", "--wait", task_id, *WAIT), code=4)


def test_payload_from_stdin_reaches_the_handler(cluster: LiveCluster) -> None:
    out = ok(cli(cluster, "schedule", "cli.binary", "-n", BINARY_NAMESPACE, "--payload", "-", stdin=b"from stdin")).stdout
    waited = json.loads(ok(cli(cluster, "poll", "--wait", "--json", out.strip(), *WAIT)).stdout)["task"]
    assert base64.b64decode(waited["result"]) == b"\xfffrom stdin"  # the handler echoes its payload


def test_list_type_filter_finds_tasks_behind_newer_ones(cluster: LiveCluster) -> None:
    wanted = [schedule(cluster, "--delay", "1h", task_type="cli.listed") for _ in range(2)]
    for _ in range(3):  # newer tasks of another type: the wanted ones are on later pages
        schedule(cluster, "--delay", "1h", task_type="cli.other")
    result = ok(cli(cluster, "list", "-n", NAMESPACE, "--type", "cli.listed", "--limit", "2", "--json"))
    tasks = json.loads(result.stdout)["tasks"]
    assert sorted(t["task_id"] for t in tasks) == sorted(wanted)
    assert {t["type"] for t in tasks} == {"cli.listed"}
    human = ok(cli(cluster, "list", "-n", NAMESPACE, "--type", "cli.listed", "--status", "SCHEDULED", "--limit", "2"))
    assert all(task_id in human.stdout for task_id in wanted)
    assert "cli.other" not in human.stdout
    for task_id in wanted:
        ok(cli(cluster, "cancel", task_id))


# ---------------------------------------------------------------- issue 14: leasesched schedule ...


def schedule_cli(cluster: LiveCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``leasesched schedule --target <TaskService> ARGS``, as a user types it."""
    assert cluster.task_service is not None and cluster.task_service.target
    argv = [str(LEASESCHED_BIN), "schedule", "--target", cluster.task_service.target, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=150)


def test_schedule_commands_end_to_end(cluster: LiveCluster) -> None:
    """create → describe (text and JSON) → trigger (the id alone) → the runs → pause → list → delete."""
    out = ok(schedule_cli(cluster, "create", "cli-every", "-n", NAMESPACE, "--every", "1s", "--type", "chaos.work",
                          "--payload", work(0.1), "--overlap", "allow-all")).stdout  # fmt: skip
    assert "chaos/cli-every" in out and "every 1s" in out
    described = json.loads(ok(schedule_cli(cluster, "describe", "cli-every", "-n", NAMESPACE, "--json")).stdout)
    assert len(described["schedule"]["next_fire_times"]) == 5
    def runs() -> int:
        d = json.loads(ok(schedule_cli(cluster, "describe", "cli-every", "-n", NAMESPACE, "--json")).stdout)["schedule"]
        return int(d.get("fired_total", 0))

    wait_for(lambda: runs() >= 3, 30, "the schedule's own runs")
    triggered = ok(schedule_cli(cluster, "trigger", "cli-every", "-n", NAMESPACE)).stdout
    task_id = triggered.strip()
    assert triggered == f"{task_id}\n" and str(uuid.UUID(task_id)) == task_id
    # Paused at once: describe keeps the last 10 runs, and on a slow machine
    # (each CLI call a new process) the every-second runs pushed the
    # triggered one out before the describe below (one CI run).
    ok(schedule_cli(cluster, "pause", "cli-every", "-n", NAMESPACE, "--note", "done"))
    wait_for(lambda: poll_json(cluster, task_id)["status"] == "SUCCEEDED", 60, "the triggered run")
    assert poll_json(cluster, task_id)["schedule_id"] == "cli-every"
    text = ok(schedule_cli(cluster, "describe", "cli-every", "-n", NAMESPACE)).stdout
    assert "trigger" in text and "schedule" in text  # the runs' causes
    listed = ok(schedule_cli(cluster, "list", "-n", NAMESPACE)).stdout
    assert [line.split()[:2] for line in listed.splitlines()[1:]] == [["cli-every", "yes"]]
    bad = schedule_cli(cluster, "create", "cli-bad", "-n", NAMESPACE, "--cron", "61 * * * *", "--type", "chaos.work")
    assert bad.returncode != 0 and "spec.cron[0]" in bad.stderr and "Traceback" not in bad.stderr
    ok(schedule_cli(cluster, "delete", "cli-every", "-n", NAMESPACE))
    gone = schedule_cli(cluster, "describe", "cli-every", "-n", NAMESPACE)
    assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr
