"""Unit tests of the load-test harness's parts that decide pass or fail:
overlap detection in the execution ledger, open-loop pacing, percentiles."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from leasesched.loadtest import ledger
from leasesched.loadtest.arrival import open_loop
from leasesched.loadtest.bench_handlers import make_payload
from leasesched.loadtest.metrics import MethodStats, percentiles
from leasesched.loadtest.report import lwt_per_task


def _s(task: str, token: int, t: float, pid: int = 1) -> dict:
    return {"e": "s", "id": task, "k": token, "a": token, "t": t, "p": pid}


def _e(task: str, token: int, t: float, stopped: int = 0) -> dict:
    return {"e": "e", "id": task, "k": token, "t": t, "x": stopped}


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
    records = [_s("a", 1, 1.0, pid=7), _s("a", 2, 5.0, pid=8), _e("a", 2, 6.0)]
    assert len(ledger.summarize(records).overlaps) == 1  # no END, no kill known: it may still work
    assert ledger.summarize(records, killed_at={7: 4.0}).overlaps == []
    assert ledger.summarize(records).unfinished == 1


def test_ledger_tail_counts_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    tail = ledger.LedgerTail(path)
    tail.poll()  # no file yet
    path.write_text(json.dumps(_s("a", 1, 1.0), separators=(",", ":")) + "\n" + '{"e":"e","id":"a"')
    tail.poll()
    assert (tail.starts, tail.ends) == (1, 0)
    with open(path, "a") as f:
        f.write(',"k":1,"t":2.0}\n')
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
    assert elapsed < 0.7
    assert max(lags) < 0.1


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
