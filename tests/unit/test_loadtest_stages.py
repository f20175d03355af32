"""The per-stage breakdown of "immediate schedule → start" (issue 17): the
times on the path (trigger's Dispatch, worker's context, the ledger's START)
and the report's computation over synthetic ledger records."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from leasesched.loadtest import ledger
from leasesched.loadtest.stages import STAGES, ImmediateTask, breakdown, stage_lines
from leasesched.model import now_ms
from leasesched.v1 import scheduler_pb2 as pb
from trigger.dispatcher import Dispatcher, Ready
from worker.execution import dispatch_timings
from worker.handlers import TaskContext, TaskTimings


def _start(task: str, token: int, t: float, pid: int = 1, **timings: float) -> dict[str, object]:
    record: dict[str, object] = {"event": "start", "task_id": task, "token": token, "attempt": 1, "worker": "w", "pid": pid, "t": t}
    if timings:
        record["timings"] = timings
    return record


def _end(task: str, token: int, t: float, pid: int = 1) -> dict[str, object]:
    return {"event": "end", "task_id": task, "token": token, "pid": pid, "t": t, "how": "returned", "stopped": False}


# One task's path, seconds: sent 100.000, answered .030, seen due .010, dispatched .015,
# received .017, claim sent .020, claimed .045, START .046.
PATH = dict(due_seen_at=100.010, dispatched_at=100.015, received_at=100.017, claim_sent_at=100.020, claimed_at=100.045)


def _by_stage(b: dict[str, object]) -> dict[str, dict[str, object]]:
    stages = b["stages"]
    assert isinstance(stages, list)
    return {s["name"]: s for s in stages}


def test_breakdown_cuts_send_to_start_at_each_recorded_time() -> None:
    records = [_start("a", 1, 100.046, **PATH), _end("a", 1, 100.1)]
    summary = ledger.summarize(records)
    b = breakdown([ImmediateTask("a", 100.0, 100.030)], summary.by_task).as_dict()
    got = {name: s["p50"] for name, s in _by_stage(b).items()}
    assert got == pytest.approx(
        {"schedule_call": 30, "to_due_seen": 10, "trigger_queue": 5, "stream": 2, "worker_queue": 3, "claim": 25, "to_start": 1},
        abs=1e-6,
    )
    assert b["total"]["p50"] == pytest.approx(46, abs=1e-6)
    assert (b["tasks"], b["with_timings"]) == (1, 1)
    # The chain (all but the client's parallel ScheduleTask branch) adds up to the total, task by task.
    chain = sum(v for k, v in got.items() if k != "schedule_call")
    assert chain == pytest.approx(b["total"]["p50"], abs=1e-6)


def test_breakdown_percentiles_over_tasks_and_the_first_execution_only() -> None:
    records = []
    tasks = []
    for i in range(100):
        t0 = 1000.0 + i
        claim_ms = (i + 1) / 1000  # 1..100 ms
        records.append(_start(f"t{i}", 1, t0 + 0.003 + claim_ms, due_seen_at=t0 + 0.001, dispatched_at=t0 + 0.001,
                              received_at=t0 + 0.002, claim_sent_at=t0 + 0.002, claimed_at=t0 + 0.002 + claim_ms))  # fmt: skip
        records.append(_end(f"t{i}", 1, t0 + 0.5))
        tasks.append(ImmediateTask(f"t{i}", t0, None))  # no answer recorded: schedule_call has no value
    # A re-execution of t0 much later (another lease) does not count: the first START does.
    records += [_start("t0", 2, 1500.0, pid=2, **{k: 1499.0 for k in PATH}), _end("t0", 2, 1500.1, pid=2)]
    b = breakdown(tasks, ledger.summarize(records).by_task).as_dict()
    claim = _by_stage(b)["claim"]
    assert claim["n"] == 100 and claim["p50"] == pytest.approx(50, abs=1e-6) and claim["p99"] == pytest.approx(99, abs=1e-6)
    assert claim["min"] == pytest.approx(1, abs=1e-6) and claim["max"] == pytest.approx(100, abs=1e-6)
    assert _by_stage(b)["schedule_call"]["n"] == 0 and _by_stage(b)["schedule_call"]["p50"] is None
    assert b["with_timings"] == 0  # no task has all the ends (no answer time)
    assert b["total"]["max"] == pytest.approx(103, abs=1e-6)


def test_breakdown_without_timings_has_the_total_only_and_skips_tasks_not_started() -> None:
    # A START from a worker that predates the timings, and a task that never started.
    records = [_start("old", 1, 10.2), _end("old", 1, 10.3)]
    b = breakdown([ImmediateTask("old", 10.0, 10.05), ImmediateTask("never", 10.0, 10.05)], ledger.summarize(records).by_task)
    assert (b.tasks, b.with_timings) == (1, 0)
    assert b.total.n == 1 and b.total.p50 == pytest.approx(200, abs=1e-6)
    by_name = {s.name: s for s in b.stages}
    assert by_name["schedule_call"].n == 1 and all(by_name[n].n == 0 for n, *_ in STAGES if n != "schedule_call")
    lines = stage_lines(b.as_dict())
    assert lines[0].startswith("immediate stages (1 tasks started, 0 with all times")
    assert len(lines) == 1 + len(STAGES) + 1 and "total" in lines[-1] and "200.0" in lines[-1]
    assert stage_lines(None) == []


def test_ledger_start_carries_the_context_timings_and_reads_them_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("LEDGER_UNDER_TEST", str(path))
    writer = ledger.LedgerWriter("LEDGER_UNDER_TEST")
    timed = TaskContext(task_id="a", type="t", namespace="n", payload=b"", attempt=1, lease_token=2, worker_id="w",
                        timings=TaskTimings(due_seen_at=1.5, dispatched_at=None, received_at=2.0, claim_sent_at=2.5, claimed_at=3.0))  # fmt: skip
    untimed = SimpleNamespace(task_id="b", lease_token=1, attempt=1, worker_id="w")  # a context without timings
    with writer.execution(timed):
        pass
    with writer.execution(untimed):
        pass
    start_a, _, start_b, _ = ledger.read(path)
    # Extra optional keys only: the unknown one left out, the rest of the record as before.
    assert start_a["timings"] == {"due_seen_at": 1.5, "received_at": 2.0, "claim_sent_at": 2.5, "claimed_at": 3.0}
    assert "timings" not in start_b and set(start_b) == {"event", "task_id", "token", "attempt", "worker", "pid", "t"}
    runs, bad = ledger.executions(ledger.read(path) + [{**_start("c", 1, 5.0), "timings": {"claimed_at": "x", "other": 1}}])
    assert bad == 0
    assert {r.task_id: r.timings for r in runs} == {"a": start_a["timings"], "b": {}, "c": {}}


def test_worker_timings_come_from_the_dispatch_and_the_worker() -> None:
    dispatch = pb.Dispatch(task_id="a", type="t", attempt=1)
    dispatch.due_seen_at.FromNanoseconds(1_700_000_000_250_000_000)
    assert dispatch_timings(dispatch, 3.0, 4.0, 5.0) == TaskTimings(
        due_seen_at=1_700_000_000.25, dispatched_at=None, received_at=3.0, claim_sent_at=4.0, claimed_at=5.0
    )
    assert TaskContext("a", "t", "n", b"", 1, 1, "w").timings == TaskTimings()  # unknown by default
    with pytest.raises(AttributeError):
        TaskTimings().claimed_at = 1.0  # type: ignore[misc]  # read-only for handlers


async def test_dispatch_carries_when_the_trigger_saw_the_task_due() -> None:
    async def unclaimed(_: Ready) -> bool:
        return False

    dispatcher = Dispatcher(5.0, unclaimed)
    link = dispatcher.connect("w1", "ns", frozenset({"t"}), 1)
    before = time.time()
    ready = dispatcher.make_ready(uuid.uuid4(), "ns", "t", 1, 0, 5, now_ms(), 0, on_done=lambda: None)
    after = time.time()
    seen = dispatcher.make_ready(uuid.uuid4(), "ns", "t", 1, 0, 5, now_ms(), 0, on_done=lambda: None, seen_at=42.5)
    dispatcher.offer(ready)
    dispatch = link.outbox.get_nowait()
    assert before <= dispatch.due_seen_at.ToNanoseconds() / 1e9 <= after
    assert seen.seen_at == 42.5
    # dispatched_at is set where the stream writes it (trigger.service), not in the outbox.
    assert not dispatch.HasField("dispatched_at")
