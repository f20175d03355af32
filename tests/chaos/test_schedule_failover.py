"""Chaos for periodic schedules: the trigger that fires a schedule dies (issue 14).

A schedule lives in one logical shard; the trigger owning that shard fires
it from its due index (``trigger/schedule_firer.py``). These scenarios break
that trigger with real processes and check, from what the API and the
execution ledger say afterwards, that no slot was lost, none ran twice, and
the slots of an outage were run late or recorded as skipped exactly as the
catch-up window says:

* ``test_kill9_schedule_owner_repeatedly`` — an every-second schedule runs
  for 60 s while the trigger owning its shard is killed with -9 every ~10 s
  (and a new trigger started, so 2–3 are up). Every slot from the first to
  the pause has exactly one task, none is skipped (the default catch-up
  window is 1 h: the slots of a failover are run late), every task
  SUCCEEDED, no two executions of one task overlapped.
* ``test_all_triggers_down_longer_than_catchup_window`` — every trigger is
  down for ~25 s under a 10 s catch-up window: the slots of the last 10 s
  run (the ones older than ``LATE_MS`` as cause "catchup", oldest first,
  within the pace), the older ones are one skipped range, reason
  "catchup_window", with the right count, and on-time slots resume.

Overlap policy ALLOW_ALL: the question here is failover, and under SKIP the
late slots of a failover — decided back to back within milliseconds while
the previous slot's task is still SCHEDULED or RUNNING — would be skipped
as "overlap", so "every slot ran" could not be asserted and a slot lost by
the failover could hide among legitimate overlap skips. With ALLOW_ALL any
skipped slot is a finding.

The test reads one fact from the store, the schedule's shard (the API does
not expose its uid); it never writes the store.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest
from google.protobuf.duration_pb2 import Duration

from leasesched.firing import LATE_MS
from leasesched.store.cassandra import new_cluster
from leasesched.testing import RunningProcess
from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import NAMESPACE, LiveCluster, Report, check_invariants, wait_for

pytestmark = pytest.mark.integration

SLOT_MS = 1000
WORK_S = 0.1
PACE_BURST = 10  # trigger/schedule_firer.Pace's default burst


# ---------------------------------------------------------------- helpers


def create_every_second(cluster: LiveCluster, schedule_id: str, catchup_window_s: int | None = None) -> pb.ScheduleDescription:
    action = pb.TaskSpec(namespace=NAMESPACE, type="chaos.work", payload=json.dumps({"seconds": WORK_S}).encode())
    action.lease_duration.FromMilliseconds(3000)
    action.retry_policy.maximum_attempts = 5
    policy = pb.SchedulePolicy(overlap=pb.OVERLAP_ALLOW_ALL)
    if catchup_window_s is not None:
        policy.catchup_window.CopyFrom(Duration(seconds=catchup_window_s))
    schedule = pb.Schedule(
        namespace=NAMESPACE, schedule_id=schedule_id, spec=pb.ScheduleSpec(every=Duration(seconds=1)),
        action=action, policy=policy,
    )  # fmt: skip
    return cluster.schedules.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule), timeout=10).schedule


def ref(schedule_id: str) -> pb.ScheduleRef:
    return pb.ScheduleRef(namespace=NAMESPACE, schedule_id=schedule_id)


def describe(cluster: LiveCluster, schedule_id: str) -> pb.ScheduleDescription:
    return cluster.schedules.DescribeSchedule(pb.DescribeScheduleRequest(ref=ref(schedule_id)), timeout=10).schedule


def slot_tasks(cluster: LiveCluster, schedule_id: str) -> dict[int, list[pb.TaskView]]:
    """slot (nominal time, ms) → the tasks ListTasks shows for it."""
    found: dict[int, list[pb.TaskView]] = defaultdict(list)
    token = ""
    while True:
        page = cluster.stub.ListTasks(pb.ListTasksRequest(namespace=NAMESPACE, page_size=1000, page_token=token), timeout=30)
        for task in page.tasks:
            if task.schedule_id == schedule_id:
                found[task.nominal_time.ToMilliseconds()].append(task)
        token = page.next_page_token
        if not token:
            return dict(found)


def schedule_shard(cluster: LiveCluster, schedule_id: str) -> int:
    """The schedule's shard, read from its row (read only)."""
    driver = new_cluster(cluster.cfg)
    try:
        session = driver.connect(cluster.cfg.keyspace)
        row = session.execute(
            "SELECT shard FROM schedules WHERE namespace = %s AND schedule_id = %s", (NAMESPACE, schedule_id)
        ).one()
    finally:
        driver.shutdown()
    assert row is not None, f"no row for schedule {schedule_id}"
    return int(row.shard)


def owner_of(cluster: LiveCluster, shard: int) -> RunningProcess | None:
    """The running trigger that alone owns ``shard`` now (None during a handover)."""
    owners = cluster.shard_owners().get(shard, [])
    if len(owners) != 1:
        return None
    return next((t for t in cluster.triggers if t.target == owners[0] and t.is_running()), None)


def live_targets(cluster: LiveCluster) -> set[str]:
    return {t.target for t in cluster.triggers if t.is_running() and t.target}


def first_starts(cluster: LiveCluster) -> dict[str, float]:
    """task id → wall time (s) of its first execution's START in the ledger."""
    starts: dict[str, float] = {}
    for r in cluster.read_jsonl(cluster.ledger):
        if r["event"] == "start":
            starts[r["task_id"]] = min(float(r["t"]), starts.get(r["task_id"], float("inf")))
    return starts


def ms(ts: object) -> int:
    return ts.ToMilliseconds()  # type: ignore[attr-defined, no-any-return]


def newest_slot(cluster: LiveCluster, schedule_id: str) -> int:
    return max(slot_tasks(cluster, schedule_id), default=0)


def caught_up(cluster: LiveCluster, schedule_id: str) -> bool:
    """The newest slot with a task is at most ~1 s old: the schedule fires on time."""
    return newest_slot(cluster, schedule_id) >= time.time() * 1000 - 1.5 * SLOT_MS


def pause(cluster: LiveCluster, schedule_id: str) -> pb.ScheduleDescription:
    answer = cluster.schedules.PauseSchedule(pb.PauseScheduleRequest(ref=ref(schedule_id), note="chaos test done"), timeout=10)
    assert answer.schedule.schedule.paused
    return answer.schedule


def single_tasks(tasks: dict[int, list[pb.TaskView]]) -> dict[int, pb.TaskView]:
    """(a) one task per slot: two tasks for one slot fail the test here."""
    doubled = {slot: [t.task_id for t in views] for slot, views in tasks.items() if len(views) != 1}
    assert not doubled, f"slots with more than one task: {dict(list(doubled.items())[:5])}"
    assert all(slot % SLOT_MS == 0 for slot in tasks), "a task's nominal time is not a slot of the spec"
    return {slot: views[0] for slot, views in tasks.items()}


def finish_and_check(cluster: LiveCluster, tasks: dict[int, pb.TaskView], scenario: str) -> Report:
    """Every task terminal, then the ledger invariants; (c) every task SUCCEEDED."""
    views = cluster.wait_terminal([t.task_id for t in tasks.values()], timeout=90)
    report = check_invariants(cluster, views)
    print(f"\n[{scenario}] {report.summary()}")
    assert not report.lost, report.lost[:5]
    assert not report.overlaps, report.overlaps[:5]  # no task executed twice at once
    assert not report.store_violations, report.store_violations[:5]
    assert not report.completion_errors, report.completion_errors[:5]
    assert report.by_status == {"SUCCEEDED": len(tasks)}, report.by_status
    return report


def check_recent_runs(description: pb.ScheduleDescription, tasks: dict[int, pb.TaskView]) -> None:
    """Each run DescribeSchedule remembers is the one task ListTasks shows for its slot."""
    assert description.recent_runs
    for run in description.recent_runs:
        slot = ms(run.nominal_time)
        assert slot in tasks, f"recent run of slot {slot} has no task in ListTasks"
        assert run.task_id == tasks[slot].task_id, (slot, run.task_id, tasks[slot].task_id)


@dataclass
class SeenRun:
    slot: int
    task_id: str
    cause: str
    fired_at: int


class RunWatch:
    """Polls DescribeSchedule and keeps every run it saw (the row keeps only the last 10)."""

    def __init__(self, cluster: LiveCluster, schedule_id: str, interval: float = 0.1) -> None:
        self._cluster = cluster
        self._schedule_id = schedule_id
        self._interval = interval
        self.runs: dict[int, SeenRun] = {}
        self.conflicts: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-watch", daemon=True)

    def __enter__(self) -> "RunWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                description = describe(self._cluster, self._schedule_id)
            except Exception:  # noqa: BLE001 - a missed poll is only a gap
                continue
            self.add(description)

    def add(self, description: pb.ScheduleDescription) -> None:
        for run in description.recent_runs:
            seen = SeenRun(ms(run.nominal_time), run.task_id, run.cause, ms(run.fired_at))
            known = self.runs.setdefault(seen.slot, seen)
            if known != seen:
                self.conflicts.append(f"slot {seen.slot}: {known} then {seen}")


# ---------------------------------------------------------------- scenarios


def test_kill9_schedule_owner_repeatedly(make_cluster) -> None:
    """3 triggers, 2 workers, an every-second schedule for 60 s; its shard's owner kill -9'd every ~10 s."""
    cluster = make_cluster(triggers=3, workers=2, slots=8)
    schedule_id = "every-second-failover"
    created = create_every_second(cluster, schedule_id)
    first_slot = ms(created.next_fire_times[0])
    shard = schedule_shard(cluster, schedule_id)
    wait_for(lambda: first_slot in slot_tasks(cluster, schedule_id), 10, "the first slot to fire")

    began = time.monotonic()
    kills: list[tuple[float, str]] = []  # (wall time, trigger)
    for round_ in range(5):  # kills at ~5, 15, 25, 35, 45 s; the last failover has 15 s to settle
        time.sleep(max(0.0, began + 5 + 10 * round_ - time.monotonic()))  # time passes; the schedule fires
        victim = wait_for(lambda: owner_of(cluster, shard), 30, f"one running owner of shard {shard}")
        cluster.kill9(victim)
        kills.append((time.time(), victim.name))
        cluster.start_trigger()  # 2 up while it starts, 3 again once it serves
        cluster.wait_all_shards_owned(timeout=40, by=live_targets(cluster))
    assert len(kills) == 5
    time.sleep(max(0.0, began + 60 - time.monotonic()))
    cluster.wait_ready(timeout=40)
    wait_for(lambda: caught_up(cluster, schedule_id), 45, "the schedule to fire on time again")
    paused = pause(cluster, schedule_id)
    paused_at = ms(paused.updated_at)  # the pause's write: no slot decided after it

    tasks = single_tasks(slot_tasks(cluster, schedule_id))
    report = finish_and_check(cluster, tasks, "kill -9 the schedule's trigger x5")
    tasks = single_tasks(slot_tasks(cluster, schedule_id))  # (a) again, after every task ended
    described = describe(cluster, schedule_id)

    # (b) every slot from the first to the pause has its task; none is skipped.
    assert min(tasks) == first_slot
    assert max(tasks) <= paused_at, f"slot {max(tasks)} fired after the pause at {paused_at}"
    # A slot whose time came less than a slot before the pause may be undecided (its look came after the pause).
    expected = set(range(first_slot, paused_at - SLOT_MS + 1, SLOT_MS))
    missing = sorted(expected - set(tasks))
    assert not missing, f"{len(missing)} slots without a task, e.g. {missing[:10]} (skipped: {list(described.skipped)})"
    assert set(tasks) - expected <= {s for s in range(paused_at - SLOT_MS + 1, paused_at + 1) if s % SLOT_MS == 0}
    assert not described.skipped and described.skipped_total == 0, list(described.skipped)
    assert described.fired_total == len(tasks)
    check_recent_runs(described, tasks)
    assert len(tasks) >= 60

    # How late the slots of the failovers started (created_at is when the slot was decided, i.e. fired).
    starts = first_starts(cluster)
    fire_lag = {slot: ms(t.created_at) - slot for slot, t in tasks.items()}
    start_lag = {slot: int(starts[t.task_id] * 1000) - slot for slot, t in tasks.items() if t.task_id in starts}
    late = sorted(slot for slot, lag in fire_lag.items() if lag > SLOT_MS)
    worst = max(start_lag, key=lambda s: start_lag[s])
    kill_lines = ", ".join(f"{name} at +{(t * 1000 - first_slot) / 1000:.1f} s" for t, name in kills)
    print(
        f"[kill -9 the schedule's trigger x5] shard {shard}; kills: {kill_lines}\n"
        f"  {len(tasks)} slots, {len(late)} fired more than 1 s late (the failovers); "
        f"max fire lag {max(fire_lag.values()) / 1000:.2f} s, max start lag {start_lag[worst] / 1000:.2f} s "
        f"(slot +{(worst - first_slot) / 1000:.0f} s); median start lag "
        f"{sorted(start_lag.values())[len(start_lag) // 2] / 1000:.3f} s; re-executions {report.re_executions}"
    )
    assert late, "no slot was fired late: the kills did not hit the schedule's trigger"
    assert max(fire_lag.values()) < 30_000  # a failover is seconds (ZooKeeper session 4 s), not more


def test_all_triggers_down_longer_than_catchup_window(make_cluster) -> None:
    """Every trigger down ~25 s under a 10 s catch-up window: the last 10 s run late, older slots are skipped."""
    cluster = make_cluster(triggers=2, workers=2, slots=8)
    window_ms = 10_000
    schedule_id = "every-second-outage"
    created = create_every_second(cluster, schedule_id, catchup_window_s=window_ms // 1000)
    first_slot = ms(created.next_fire_times[0])
    wait_for(lambda: len(slot_tasks(cluster, schedule_id)) >= 3, 15, "three slots to fire")

    for trigger in list(cluster.triggers):
        cluster.kill9(trigger)
    down_at = time.time() * 1000
    before = slot_tasks(cluster, schedule_id)  # no trigger left: nothing fires these slots now
    last_before = max(before)
    time.sleep(25)  # the outage
    assert slot_tasks(cluster, schedule_id).keys() == before.keys(), "a slot fired while every trigger was down"

    with RunWatch(cluster, schedule_id) as watch:
        restart_at = time.time() * 1000
        cluster.start_trigger()
        cluster.start_trigger()
        cluster.wait_ready(timeout=40)
        # Regular slots resume: four slots fired within a second of their time (the
        # youngest slot of the outage can be one of them: it is decided within a
        # second of its time too; three are checked below to come after that).
        def resumed() -> bool:
            on_time = [
                r for r in watch.runs.values() if r.slot > restart_at and r.cause == "schedule" and r.fired_at - r.slot < SLOT_MS
            ]
            return len(on_time) >= 4
        wait_for(resumed, 45, "regular slots to resume")
        paused = pause(cluster, schedule_id)
        watch.add(paused)
    paused_at = ms(paused.updated_at)
    assert not watch.conflicts, watch.conflicts[:5]

    tasks = single_tasks(slot_tasks(cluster, schedule_id))
    finish_and_check(cluster, tasks, "all triggers down 25 s, catch-up window 10 s")
    tasks = single_tasks(slot_tasks(cluster, schedule_id))
    described = describe(cluster, schedule_id)

    # The slots older than the window: one skipped range, reason catchup_window, the right count.
    reasons = [(s.reason, s.count) for s in described.skipped]
    assert [r for r, _ in reasons] == ["catchup_window"], reasons
    skipped = described.skipped[0]
    decided_at = ms(skipped.recorded_at)  # the first evaluation after the outage
    first_skipped, last_skipped = ms(skipped.first), ms(skipped.last)
    assert restart_at <= decided_at <= paused_at
    assert first_skipped == last_before + SLOT_MS, (first_skipped, last_before)
    skipped_slots = set(range(first_skipped, last_skipped + 1, SLOT_MS))
    assert skipped.count == len(skipped_slots) == described.skipped_total
    # The horizon is decided_at - window: the count is the outage minus the window, ± the boundary slot.
    expected_count = (decided_at - window_ms - first_skipped) / SLOT_MS
    assert abs(skipped.count - expected_count) <= 1, (skipped.count, expected_count)
    assert not skipped_slots & set(tasks), "a skipped slot also has a task"

    # Every other slot from the first to the pause has its one task (nothing lost, nothing twice).
    expected = set(range(first_slot, paused_at - SLOT_MS + 1, SLOT_MS)) - skipped_slots
    missing = sorted(expected - set(tasks))
    assert not missing, f"{len(missing)} slots without a task, e.g. {missing[:10]}"
    assert max(tasks) <= paused_at
    assert described.fired_total == len(tasks)
    check_recent_runs(described, tasks)

    # The slots of the last 10 s before the restart ran: oldest first, late, the old ones as catch-ups.
    window_slots = sorted(s for s in tasks if last_skipped < s < decided_at)
    assert window_slots and window_slots[0] >= decided_at - window_ms - SLOT_MS, (window_slots[:3], decided_at)
    assert abs(len(window_slots) - window_ms / SLOT_MS) <= 1, len(window_slots)
    fired = [ms(tasks[s].created_at) for s in window_slots]
    assert fired == sorted(fired), "the late slots did not run oldest first"
    seen = [watch.runs[s] for s in window_slots if s in watch.runs]
    assert len(seen) >= len(window_slots) - 2, f"the watch saw {len(seen)} of {len(window_slots)} late runs"
    for run in seen:
        expected_cause = "catchup" if run.fired_at - run.slot > LATE_MS else "schedule"
        assert run.cause == expected_cause, (run, LATE_MS)
    catchups = sorted(r.fired_at for r in seen if r.cause == "catchup")
    assert catchups, f"no slot of the outage ran as a catch-up (LATE_MS {LATE_MS} ms, window {window_ms} ms)"
    # Paced: never more catch-ups in a span than the pace's burst plus its rate allows.
    rate = cluster.cfg.schedule_catchup_rate
    for i, start in enumerate(catchups):
        for j in range(i, len(catchups)):
            assert j - i + 1 <= PACE_BURST + rate * (catchups[j] - start) / 1000 + 1
    # Regular slots resumed after the catch-up: the newest ones fired on time, as cause "schedule".
    regular = sorted((r for r in watch.runs.values() if r.slot > decided_at), key=lambda r: r.slot)
    assert len(regular) >= 3 and all(r.cause == "schedule" for r in regular), regular[-5:]
    assert all(r.fired_at - r.slot < SLOT_MS for r in regular[-3:]), regular[-3:]

    starts = first_starts(cluster)
    start_lag = [int(starts[tasks[s].task_id] * 1000) - s for s in window_slots if tasks[s].task_id in starts]
    print(
        f"[all triggers down] outage {(restart_at - down_at) / 1000:.1f} s (+ restart {(decided_at - restart_at) / 1000:.1f} s "
        f"until the first evaluation); skipped {skipped.count} slots (catchup_window, expected {expected_count:.1f}); "
        f"ran {len(window_slots)} late slots, {len(catchups)} as catchup (LATE_MS {LATE_MS} ms), "
        f"start lag {min(start_lag) / 1000:.2f}-{max(start_lag) / 1000:.2f} s; catch-ups fired over "
        f"{(catchups[-1] - catchups[0]) / 1000:.3f} s; {len(regular)} regular slots after"
    )

