"""Unit tests of the load-test harness's parts that decide pass or fail:
overlap detection in the execution ledger, open-loop pacing, percentiles."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from leasesched.loadtest import ledger
from leasesched.loadtest.arrival import open_loop
from leasesched.loadtest.bench_tasks import make_payload
from leasesched.loadtest.metrics import MethodStats, percentiles
from leasesched.loadtest.report import lwt_per_task


def _s(task: str, token: int, t: float, pid: int = 1) -> dict:
    return {"event": "start", "task_id": task, "token": token, "attempt": token, "worker": "w", "pid": pid, "t": t}


def _e(task: str, token: int, t: float, stopped: int = 0, pid: int = 1, **extra: object) -> dict:
    return {"event": "end", "task_id": task, "token": token, "pid": pid, "t": t, "stopped": bool(stopped), **extra}


def test_ledger_sequential_executions_do_not_overlap() -> None:
    records = [_s("a", 1, 1.0), _e("a", 1, 2.0, 1), _s("a", 2, 2.5), _e("a", 2, 3.0), _s("b", 1, 1.0), _e("b", 1, 1.1)]
    summary = ledger.summarize(records)
    assert summary.overlaps == []
    assert (summary.executions, summary.tasks_started, summary.re_executions) == (3, 2, 1)
    assert summary.first_start == {"a": 1.0, "b": 1.0}
    assert sorted(summary.ends) == [1.1, 3.0]  # the stopped execution is no completion


def test_ledger_finds_overlaps_also_with_an_earlier_than_previous_execution() -> None:
    # token 1 runs long; token 2 is short and inside it; token 3 starts while token 1 still works.
    records = [_s("a", 1, 1.0), _e("a", 1, 10.0), _s("a", 2, 2.0), _e("a", 2, 3.0), _s("a", 3, 5.0), _e("a", 3, 6.0)]
    assert len(ledger.summarize(records).overlaps) == 2


def test_ledger_execution_without_end_lasts_until_its_kill() -> None:
    records = [_s("a", 1, 1.0, pid=7), _s("a", 2, 5.0, pid=8), _e("a", 2, 6.0, pid=8)]
    assert len(ledger.summarize(records).overlaps) == 1  # no END, no kill known: it may still work
    assert ledger.summarize(records).still_running != []
    assert ledger.summarize(records, killed_at={7: 4.0}).overlaps == []
    assert ledger.summarize(records).unfinished == 1
    # The same from an exit line in the ledger (a watcher saw pid 7 gone); a later sighting does not extend it.
    exits = [ledger.exit_record(7, 4.0, 75), ledger.exit_record(7, 9.0)]
    verdict = ledger.check([*records, *exits])
    assert verdict.overlaps == [] and verdict.still_running == [] and verdict.unfinished == 1


def test_ledger_overlap_only_between_different_tokens() -> None:
    # One token in two processes (a handler child and its worker) is one lease, not a double execution.
    records = [_s("a", 1, 1.0, pid=1), _s("a", 1, 1.5, pid=2), _e("a", 1, 3.0, pid=2), _e("a", 1, 3.0, pid=1)]
    assert ledger.check(records).overlaps == []
    assert ledger.check([*records, _s("a", 2, 2.9, pid=3), _e("a", 2, 4.0, pid=3)]).overlaps != []


def test_ledger_real_end_counts_unless_the_handler_marked_its_last_step() -> None:
    # Token 1's code returned at 7.0 (it noticed the lost lease late), but its last step was at 2.0.
    stepped = [_s("a", 1, 1.0), _e("a", 1, 7.0, 1, worked_until=2.0), _s("a", 2, 5.0, pid=2), _e("a", 2, 6.0, pid=2)]
    assert ledger.check(stepped).overlaps == []
    plain = [_s("a", 1, 1.0), _e("a", 1, 7.0, 1), _s("a", 2, 5.0, pid=2), _e("a", 2, 6.0, pid=2)]
    assert len(ledger.check(plain).overlaps) == 1


def _log(msg: str, task: str, token: int, ts: str) -> dict:
    kind = "claimed" if " claimed by " in msg else "reported"
    return {"ts": ts, "level": "INFO", "logger": "services.task_updater", "msg": msg, "task_id": task, "lease_token": token,
            "lease_event": kind}  # fmt: skip


def test_store_check_bounds_each_execution_by_claims_and_reports() -> None:
    logs = [
        _log("task a claimed by w1 (token 1, attempt 1)", "a", 1, "2030-01-01T00:00:10.000Z"),
        _log("task a failed under token 1: now scheduled", "a", 1, "2030-01-01T00:00:12.000Z"),
        _log("task a claimed by w2 (token 2, attempt 1)", "a", 2, "2030-01-01T00:00:13.500Z"),
        _log("task a completed under token 2", "a", 2, "2030-01-01T00:00:15.000Z"),
        {"ts": "2030-01-01T00:00:11.000Z", "logger": "trigger.scanner", "msg": "task a claimed by x", "task_id": "a", "lease_token": 9},
        {"ts": "2030-01-01T00:00:11.000Z", "msg": "task a claimed by w1 (token 7)", "task_id": "a", "lease_token": 7},  # no field
    ]
    store = ledger.store_events_from_logs(logs)
    t0 = 1893456000.0  # 2030-01-01T00:00:00Z
    assert store.claims == {("a", 1): t0 + 10, ("a", 2): t0 + 13.5} and store.reports[("a", 1)] == t0 + 12
    good = [_s("a", 1, t0 + 10.01), _e("a", 1, t0 + 11.9), _s("a", 2, t0 + 13.6, pid=2), _e("a", 2, t0 + 14.9, pid=2)]
    assert ledger.check(good, store=store).store_violations == []
    # Token 1 went on after its release was accepted (no other execution overlaps it: only the store check sees it).
    late = [_s("a", 1, t0 + 10.01), _e("a", 1, t0 + 12.5), _s("a", 2, t0 + 13.6, pid=2), _e("a", 2, t0 + 14.9, pid=2)]
    [found] = ledger.check(late, store=store).store_violations
    assert "a report under token 1" in found
    early = [_s("a", 2, t0 + 13.4, pid=2), _e("a", 2, t0 + 14.0, pid=2), _s("a", 3, t0 + 14.0, pid=3), _e("a", 3, t0 + 14.1, pid=3)]
    problems = ledger.check(early, store=store).store_violations
    assert any("before its claim" in p for p in problems) and any("never accepted a claim of token 3" in p for p in problems)


def _w(task: str, token: int, sent: float, answered: float, applied: bool, pid: int = 1) -> dict:
    return {"event": "fenced", "task_id": task, "token": token, "pid": pid, "sent": sent, "t": answered, "applied": applied}


def test_fenced_check_finds_a_stale_write_that_applied() -> None:
    records = [
        _s("a", 1, 1.0), _w("a", 1, 1.1, 1.12, True),
        _s("a", 2, 3.0, pid=2), _w("a", 2, 3.1, 3.12, True), _e("a", 2, 4.0, pid=2),
        _w("a", 1, 3.5, 3.52, False),  # token 1 resumed after token 2 wrote: refused, as it must be
        _w("a", 1, 3.11, 3.13, True),  # sent before token 2's write was answered: the order is unknown, no verdict
        _w("b", 1, 1.0, 1.1, True), _w("c", 5, 0.5, 0.6, True),  # another task's tokens are not compared
    ]  # fmt: skip
    verdict = ledger.check_fenced(records)
    assert verdict.stale_applied == [] and verdict.refused == 1 and len(verdict.writes) == 6
    assert ledger.check(records).bad_lines == 0  # fenced lines are no torn ledger
    [stale] = ledger.check_fenced([*records, _w("a", 1, 3.6, 3.62, True)]).stale_applied
    assert stale.startswith("a: token 1")


def test_ledger_names_the_executions_behind_each_violation() -> None:
    records = [_s("a", 1, 1.0), _e("a", 1, 5.0), _s("a", 2, 4.0, pid=2), _e("a", 2, 6.0, pid=2), _s("b", 1, 1.0), _e("b", 1, 2.0)]
    [(a, b)] = ledger.check(records).overlapping
    assert (a.task_id, a.token, b.task_id, b.token) == ("a", 1, "a", 2)


def test_ledger_writer_records_real_start_and_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("LEDGER_UNDER_TEST", str(path))
    writer = ledger.LedgerWriter("LEDGER_UNDER_TEST")
    ctx = SimpleNamespace(task_id="a", lease_token=3, attempt=2, worker_id="w")

    async def cancelled_handler() -> None:
        with writer.execution(ctx):
            await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(cancelled_handler())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    with writer.execution(ctx) as running:
        running.step()
        running.stopped = True
    start, end, start2, end2 = ledger.read(path)
    assert (start["event"], end["event"], end["how"], end2["how"]) == ("start", "end", "cancelled", "returned")
    assert end["t"] >= start["t"] and "worked_until" not in end and end2["stopped"] and start2["t"] <= end2["worked_until"] <= end2["t"]
    assert (start["task_id"], start["token"], start["attempt"], start["worker"]) == ("a", 3, 2, "w")


def test_ledger_tail_counts_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    tail = ledger.LedgerTail(path)
    tail.poll()  # no file yet
    path.write_text(json.dumps(_s("a", 1, 1.0), separators=(",", ":")) + "\n" + '{"event":"end","task_id":"a"')
    tail.poll()
    assert (tail.starts, tail.ends) == (1, 0)
    with open(path, "a") as f:
        f.write(',"token":1,"pid":1,"t":2.0}\n')
    tail.poll()
    assert (tail.starts, tail.ends) == (1, 1)


def test_open_loop_sends_on_schedule_even_when_answers_are_slow() -> None:
    async def run() -> tuple[int, list[float], float]:
        loop = asyncio.get_running_loop()
        sent: list[float] = []
        tasks: set[asyncio.Task[None]] = set()

        async def fire(i: int, intended: float) -> None:
            sent.append(loop.time() - intended)
            await asyncio.sleep(1.0)  # a slow server: answers take longer than the whole run

        t0 = loop.time() + 0.05
        due = await open_loop(200, t0, t0 + 0.5, fire, lambda: len(tasks), 10_000, lambda r: None, tasks)
        elapsed = loop.time() - t0
        await asyncio.sleep(0.01)  # the last requests' tasks start
        for t in list(tasks):
            t.cancel()
        return due, sent, elapsed

    due, lags, elapsed = asyncio.run(run())
    assert due == 100 and len(lags) == 100  # 200/s for 0.5 s, none waited for an answer
    # Answers take 1 s: a generator that waited for them would lag by a second or
    # more. The bounds leave room for a machine busy with other work.
    assert elapsed < 1.0
    assert max(lags) < 0.5


def test_open_loop_counts_requests_beyond_the_inflight_cap_as_not_sent() -> None:
    async def run() -> tuple[int, dict[str, int]]:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        not_sent: dict[str, int] = {}

        async def fire(i: int, intended: float) -> None:
            await asyncio.sleep(10)

        t0 = loop.time()
        due = await open_loop(1000, t0, t0 + 0.1, fire, lambda: len(tasks), 20,
                              lambda r: not_sent.__setitem__(r, not_sent.get(r, 0) + 1), tasks)  # fmt: skip
        for t in list(tasks):
            t.cancel()
        return due, not_sent

    due, not_sent = asyncio.run(run())
    assert due == 100 and not_sent == {"CLIENT_BACKLOG": 80}


def test_latency_is_counted_from_the_intended_send_time() -> None:
    stats = MethodStats("ScheduleTask", t0=100.0)
    stats.on_sent(intended=100.0, actual=100.5)  # the client was late by 500 ms
    stats.on_done(intended=100.0, now=100.6, code=None)
    stats.on_sent(intended=101.0, actual=101.0)
    stats.on_done(intended=101.0, now=101.2, code="UNAVAILABLE")
    summary = stats.summary(seconds=2, target_rate=1)
    assert summary["latency_ms"]["max"] == 600.0
    assert summary["send_lag_ms"]["max"] == 500.0
    assert summary["errors"] == {"UNAVAILABLE": 1} and summary["ok"] == 1 and stats.inflight == 0
    assert stats.series(2)["ok"] == [1, 0] and stats.series(2)["errors"] == [0, 1]


def test_percentiles_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0, "n": 100}
    assert percentiles([])["p99"] is None


def test_conditional_writes_per_task() -> None:
    assert lwt_per_task(False, 0, 30) == 2  # claim, complete (the creation is a plain insert)
    assert lwt_per_task(True, 0, 30) == 4  # + the idempotency key, and a conditional creation
    assert lwt_per_task(False, 25_000, 30) == 4  # + a heartbeat every 10 s


def test_payload_is_json_padded_to_size() -> None:
    payload = make_payload(12.5, 100)
    assert len(payload) == 100 and json.loads(payload) == {"ms": 12.5}


def test_open_loop_batches_sends_what_is_due_in_calls_of_up_to_n() -> None:
    """ScheduleTasks mode (``--schedule-batch``): every request due exactly once,
    in order, in calls of at most N that fill at the offered rate, and not
    waiting for the (slow) answers."""
    from leasesched.loadtest.arrival import open_loop_batches

    async def run() -> tuple[int, list[list[tuple[int, float]]], float]:
        loop = asyncio.get_running_loop()
        calls: list[list[tuple[int, float]]] = []
        tasks: set[asyncio.Task[None]] = set()

        async def fire(items: list[tuple[int, float]]) -> None:
            calls.append(items)
            await asyncio.sleep(1.0)

        t0 = loop.time() + 0.05
        due = await open_loop_batches(400, t0, t0 + 0.5, 20, fire, lambda: 0, 10_000, lambda r: None, tasks)
        elapsed = loop.time() - t0
        await asyncio.sleep(0.01)
        for t in list(tasks):
            t.cancel()
        return due, calls, elapsed

    due, calls, elapsed = asyncio.run(run())
    assert due == 200 and [i for call in calls for i, _ in call] == list(range(200))
    assert max(len(c) for c in calls) == 20 and len(calls) <= 15  # 20 a call at 400/s: a call every 50 ms
    assert elapsed < 1.0


def test_open_loop_batches_counts_past_max_inflight_as_not_sent() -> None:
    from leasesched.loadtest.arrival import open_loop_batches

    async def run() -> tuple[int, int, list[str]]:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        fired: list[int] = []
        refused: list[str] = []

        async def fire(items: list[tuple[int, float]]) -> None:
            fired.extend(i for i, _ in items)

        t0 = loop.time()
        due = await open_loop_batches(1000, t0 - 1.0, t0 + 0.02, 50, fire, lambda: len(fired), 30, refused.append, tasks)
        await asyncio.sleep(0.01)
        return due, len(fired), refused

    due, fired, refused = asyncio.run(run())
    assert fired + len(refused) == due and fired >= 30 and set(refused) == {"CLIENT_BACKLOG"}


def test_a_task_whose_final_poll_was_refused_is_unverified_not_lost() -> None:
    """Under overload the harness's own final PollTask may be shed
    (RESOURCE_EXHAUSTED): that says nothing about the task. Only NOT_FOUND,
    or a due task still not terminal, is lost."""
    from leasesched.loadtest.report import final_states
    from leasesched.v1 import scheduler_pb2 as pb

    done = pb.TaskView(status=pb.SUCCEEDED)
    done.finished_at.FromMilliseconds(12_500)
    final = {"ok": done, "gone": "NOT_FOUND", "shed": "RESOURCE_EXHAUSTED", "stuck": pb.TaskView(status=pb.SCHEDULED),
             "later": pb.TaskView(status=pb.SCHEDULED)}  # fmt: skip
    run_at = {"ok": 1_000, "gone": 1_000, "shed": 1_000, "stuck": 1_000, "later": 99_000}
    out = final_states(["ok", "gone", "shed", "stuck", "later", "never-read"], final, {**run_at, "never-read": 1_000}, 50_000, 10.0)
    assert out.lost == ["gone", "stuck", "never-read"]
    assert out.unverified == ["shed"]
    assert out.not_due_yet == 1
    assert out.finished_rel == [2.5]
    assert out.by_status["unreadable:RESOURCE_EXHAUSTED"] == 1


def test_warm_latencies_leave_out_the_first_seconds_of_the_load() -> None:
    from leasesched.loadtest.report import WARMUP_S, after_warmup

    t0 = 1_000.0
    samples = [(t0 + 0.5, 400.0), (t0 + WARMUP_S - 0.001, 300.0), (t0 + WARMUP_S, 30.0), (t0 + 55.0, 20.0)]
    assert after_warmup(samples, t0) == [30.0, 20.0]
    assert after_warmup([], t0) == []
