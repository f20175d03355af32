"""Periodic schedules on real Cassandra, ZooKeeper and processes (issue 14).

What each overlap policy does with long runs (from the execution ledger:
runs of one schedule never overlap unless ALLOW_ALL says they may), pause and
unpause, remaining actions, pause on failure, trigger-now, a backfill of a
past range, update and delete against a version, a 6-field cron in a DST
zone in real time, and bad requests refused naming the field with nothing
written. The DST days themselves are computed-slot tests
(tests/unit/test_schedule_spec.py); failovers: tests/chaos/test_schedule_failover.py.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator

import grpc
import pytest

from leasesched.loadtest import ledger as ledger_mod
from leasesched.testing import RunningProcess
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.cluster import NAMESPACE, LiveCluster, wait_for

EVERY_S = 2


def schedule_msg(schedule_id: str, seconds: float = 0.1, every_s: float | None = EVERY_S, **payload: object) -> pb.Schedule:
    s = pb.Schedule(namespace=NAMESPACE, schedule_id=schedule_id)
    if every_s is not None:
        s.spec.every.FromMilliseconds(int(every_s * 1000))
    s.action.type = "chaos.work"
    s.action.payload = json.dumps({"seconds": seconds, **payload}).encode()
    s.action.lease_duration.FromSeconds(5)
    return s


def ref(schedule_id: str) -> pb.ScheduleRef:
    return pb.ScheduleRef(namespace=NAMESPACE, schedule_id=schedule_id)


def describe(cluster: LiveCluster, schedule_id: str) -> pb.ScheduleDescription:
    return cluster.schedules.DescribeSchedule(pb.DescribeScheduleRequest(ref=ref(schedule_id)), timeout=10).schedule


def runs_of(cluster: LiveCluster) -> dict[str, list[pb.TaskView]]:
    """schedule id → its tasks, oldest slot first (ListTasks of the namespace)."""
    found: dict[str, list[pb.TaskView]] = defaultdict(list)
    token = ""
    while True:
        page = cluster.stub.ListTasks(pb.ListTasksRequest(namespace=NAMESPACE, page_size=500, page_token=token), timeout=10)
        for view in page.tasks:
            if view.schedule_id:
                found[view.schedule_id].append(view)
        token = page.next_page_token
        if not token:
            break
    for views in found.values():
        views.sort(key=lambda v: v.nominal_time.ToMilliseconds())
    return found


def overlaps(executions: list[ledger_mod.Execution]) -> int:
    """Pairs of executions that ran at the same time."""
    ordered = sorted(executions, key=lambda e: e.start)
    return sum(1 for a, b in zip(ordered, ordered[1:]) if b.start < a.end)


def executions_by_schedule(cluster: LiveCluster, runs: dict[str, list[pb.TaskView]]) -> dict[str, list[ledger_mod.Execution]]:
    schedule_of = {v.task_id: sid for sid, views in runs.items() for v in views}
    executions, _ = ledger_mod.executions(ledger_mod.read(cluster.ledger), cluster.exits())
    grouped: dict[str, list[ledger_mod.Execution]] = defaultdict(list)
    for e in executions:
        if e.task_id in schedule_of:
            grouped[schedule_of[e.task_id]].append(e)
    return grouped


def assert_one_task_per_slot(views: list[pb.TaskView], every_s: float) -> None:
    slots = [v.nominal_time.ToMilliseconds() for v in views]
    assert len(slots) == len(set(slots)), f"a slot has two tasks: {slots}"
    assert all(s % int(every_s * 1000) == 0 for s in slots), slots


def test_each_overlap_policy_with_long_runs(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=2, workers=2, slots=8)
    policies = {
        "ov-skip": pb.OVERLAP_SKIP,
        "ov-one": pb.OVERLAP_BUFFER_ONE,
        "ov-all": pb.OVERLAP_BUFFER_ALL,
        "ov-cancel": pb.OVERLAP_CANCEL_OTHER,
        "ov-allow": pb.OVERLAP_ALLOW_ALL,
    }
    for schedule_id, policy in policies.items():
        s = schedule_msg(schedule_id, seconds=3.1)  # each run spans two slots
        s.policy.overlap = policy
        cluster.schedules.CreateSchedule(pb.CreateScheduleRequest(schedule=s), timeout=10)
    wait_for(lambda: describe(cluster, "ov-skip").fired_total + describe(cluster, "ov-skip").skipped_total >= 7, 60,
             "seven slots of the SKIP schedule")  # fmt: skip
    for schedule_id in policies:
        cluster.schedules.PauseSchedule(pb.PauseScheduleRequest(ref=ref(schedule_id), note="test over"), timeout=10)
    described = {sid: describe(cluster, sid) for sid in policies}
    runs = runs_of(cluster)
    cluster.wait_terminal([v.task_id for views in runs.values() for v in views], 60)
    assert cluster.wait_executions_settled(30) == []
    runs = runs_of(cluster)
    executions = executions_by_schedule(cluster, runs)
    for schedule_id, d in described.items():
        views = runs[schedule_id]
        assert_one_task_per_slot(views, EVERY_S)
        assert len(views) == d.fired_total, (schedule_id, len(views), d.fired_total)
        assert d.schedule.paused and not d.next_fire_times
    skip_reasons = {sid: {k.reason for k in d.skipped} for sid, d in described.items()}

    # SKIP: a slot that comes while the run goes is skipped (recorded), never run.
    assert overlaps(executions["ov-skip"]) == 0
    assert skip_reasons["ov-skip"] == {"overlap"} and described["ov-skip"].skipped_total >= 2
    assert all(v.status == pb.SUCCEEDED for v in runs["ov-skip"])
    # BUFFER_ONE: one slot kept and run right after; the one after that skipped.
    assert overlaps(executions["ov-one"]) == 0
    assert "buffer" in {r.cause for r in described["ov-one"].recent_runs}
    # BUFFER_ALL: every slot kept (none skipped), run one after another.
    assert overlaps(executions["ov-all"]) == 0
    assert described["ov-all"].skipped_total == 0
    assert len(described["ov-all"].buffered) + described["ov-all"].fired_total >= 4
    # CANCEL_OTHER: the running one is cancelled, the new one starts after it ended.
    assert overlaps(executions["ov-cancel"]) == 0
    assert pb.CANCELLED in {v.status for v in runs["ov-cancel"]}
    # ALLOW_ALL: runs do overlap (so the check above can see an overlap), every slot ran.
    assert overlaps(executions["ov-allow"]) >= 1
    assert described["ov-allow"].skipped_total == 0


def test_pause_unpause_limits_failures_trigger_and_backfill(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=1, slots=8)
    create = cluster.schedules.CreateSchedule

    limited = schedule_msg("limited", every_s=1)
    limited.limited_actions, limited.remaining_actions = True, 3
    create(pb.CreateScheduleRequest(schedule=limited), timeout=10)

    failing = schedule_msg("failing", every_s=1, fail=9)
    failing.action.retry_policy.maximum_attempts = 1
    failing.policy.pause_on_failure = True
    create(pb.CreateScheduleRequest(schedule=failing), timeout=10)

    paused = schedule_msg("pausing", every_s=1)
    create(pb.CreateScheduleRequest(schedule=paused), timeout=10)

    hourly = schedule_msg("hourly", seconds=2.0, every_s=3600)  # no slot during the test
    create(pb.CreateScheduleRequest(schedule=hourly), timeout=10)

    # remaining_actions: three runs, then nothing more is planned.
    wait_for(lambda: describe(cluster, "limited").fired_total == 3, 30, "three runs of the limited schedule")
    d = describe(cluster, "limited")
    assert d.schedule.remaining_actions == 0 and not d.next_fire_times

    # pause_on_failure: the first run fails, the schedule pauses naming it, no run after.
    wait_for(lambda: describe(cluster, "failing").schedule.paused, 30, "the failing schedule to pause itself")
    d = describe(cluster, "failing")
    first = d.recent_runs[-1].task_id
    assert first in d.schedule.note and cluster.poll(first).status == pb.FAILED
    assert d.fired_total == 1

    # pause / unpause: no run while paused; the slots of the pause are recorded as skipped.
    cluster.schedules.PauseSchedule(pb.PauseScheduleRequest(ref=ref("pausing"), note="maintenance"), timeout=10)
    before = describe(cluster, "pausing")
    assert before.schedule.paused and before.schedule.note == "maintenance"
    time.sleep(3.0)  # let three slots pass
    assert describe(cluster, "pausing").fired_total == before.fired_total
    after = cluster.schedules.UnpauseSchedule(pb.UnpauseScheduleRequest(ref=ref("pausing")), timeout=10).schedule
    assert not after.schedule.paused and after.next_fire_times
    assert [k.reason for k in after.skipped][:1] == ["paused"] and after.skipped[0].count >= 2
    wait_for(lambda: describe(cluster, "pausing").fired_total > before.fired_total, 10, "runs after unpausing")

    # trigger now: a run now; again while it runs: skipped by SKIP, started by an ALLOW_ALL override.
    started = cluster.schedules.TriggerSchedule(pb.TriggerScheduleRequest(ref=ref("hourly")), timeout=10)
    assert started.outcome == "started" and started.task_id
    skipped = cluster.schedules.TriggerSchedule(pb.TriggerScheduleRequest(ref=ref("hourly")), timeout=10)
    assert skipped.outcome == "skipped: overlap" and not skipped.task_id
    forced = cluster.schedules.TriggerSchedule(
        pb.TriggerScheduleRequest(ref=ref("hourly"), overlap=pb.OVERLAP_ALLOW_ALL), timeout=10
    )
    assert forced.outcome == "started" and forced.task_id not in ("", started.task_id)
    views = cluster.wait_terminal([started.task_id, forced.task_id], 30)
    assert all(v.status == pb.SUCCEEDED and v.schedule_id == "hourly" for v in views.values())

    # backfill of the past three hours: three slots on the hour, run one after the other.
    now_s = int(time.time())
    request = pb.BackfillScheduleRequest(ref=ref("hourly"), overlap=pb.OVERLAP_BUFFER_ALL)
    request.start_at.FromSeconds(now_s - 3 * 3600)
    request.end_at.FromSeconds(now_s - 1)
    assert cluster.schedules.BackfillSchedule(request, timeout=10).slots == 3
    wait_for(lambda: sum(r.cause == "backfill" for r in describe(cluster, "hourly").recent_runs) == 3, 60, "the backfill")
    backfilled = [r for r in describe(cluster, "hourly").recent_runs if r.cause == "backfill"]
    hours = sorted(r.nominal_time.seconds for r in backfilled)
    assert all(h % 3600 == 0 for h in hours) and hours == sorted(set(hours)) and hours[0] >= now_s - 3 * 3600
    # The same range again: its slots have their tasks already; none is run twice.
    assert cluster.schedules.BackfillSchedule(request, timeout=10).slots == 3
    wait_for(lambda: describe(cluster, "hourly").backfills_pending == 0, 30, "the second backfill to be worked")
    runs = runs_of(cluster)
    assert_one_task_per_slot([v for v in runs["hourly"] if v.nominal_time.seconds % 3600 == 0], 3600)
    assert cluster.wait_executions_settled(30) == []
    executions = executions_by_schedule(cluster, runs)
    assert overlaps([e for e in executions["hourly"] if e.task_id in {r.task_id for r in backfilled}]) == 0
    per_task: dict[str, int] = defaultdict(int)
    for e in executions["hourly"]:
        per_task[e.task_id] += 1
    assert max(per_task.values()) == 1


def test_a_schedules_runs_carry_its_key_and_gate_and_wait_for_the_gate(make_cluster) -> None:
    """Issue 15 for schedules: the action's concurrency_key and gate are on
    every run (PollTask shows them), and the gate holds the runs — a slot's
    run, handed by the firing trigger to its own dispatcher, and a
    TriggerSchedule run, hinted to the trigger by the TaskService."""
    cluster: LiveCluster = make_cluster(triggers=1, workers=1, slots=4)
    gate = pb.GateRef(namespace=NAMESPACE, name="sched-gate")
    cluster.gates.SetGate(pb.SetGateRequest(gate=gate, definition=pb.GateDefinition(rate=100, burst=100)), timeout=10)
    s = schedule_msg("keyed")
    s.action.concurrency_key, s.action.gate = "partner-s", "sched-gate"
    made = cluster.schedules.CreateSchedule(pb.CreateScheduleRequest(schedule=s), timeout=10).schedule
    assert (made.schedule.action.concurrency_key, made.schedule.action.gate) == ("partner-s", "sched-gate")
    shown = describe(cluster, "keyed").schedule.action
    assert (shown.concurrency_key, shown.gate) == ("partner-s", "sched-gate")

    # An open gate: the slots' runs go through, and carry both.
    wait_for(lambda: describe(cluster, "keyed").fired_total >= 2, 30, "two runs of the keyed schedule")
    first = describe(cluster, "keyed").recent_runs[-1].task_id
    view = cluster.wait_terminal([first], 30)[first]
    assert view.status == pb.SUCCEEDED and view.schedule_id == "keyed"
    assert (view.concurrency_key, view.gate) == ("partner-s", "sched-gate")

    # A paused gate holds the next slot's run (the trigger reads the gate at least once a second).
    cluster.gates.PauseGate(pb.PauseGateRequest(gate=gate), timeout=10)
    paused_at_ms = int(time.time() * 1000) + 1500

    def held_slot_run() -> str | None:
        runs = [r for r in describe(cluster, "keyed").recent_runs if r.cause == "schedule" and r.nominal_time.ToMilliseconds() >= paused_at_ms]
        return runs[0].task_id if runs else None

    held = wait_for(held_slot_run, 30, "a slot's run after the pause")
    time.sleep(3.0)
    view = cluster.poll(held)
    assert view.status == pb.SCHEDULED, f"a run of a paused gate went on: {view}"
    assert (view.concurrency_key, view.gate) == ("partner-s", "sched-gate") and "paused" in view.waiting_reason
    # A run now (created by the TaskService, hinted to the trigger) waits the same way.
    now_run = cluster.schedules.TriggerSchedule(
        pb.TriggerScheduleRequest(ref=ref("keyed"), overlap=pb.OVERLAP_ALLOW_ALL), timeout=10
    ).task_id
    time.sleep(2.0)
    view = cluster.poll(now_run)
    assert view.status == pb.SCHEDULED and (view.concurrency_key, view.gate) == ("partner-s", "sched-gate")
    cluster.schedules.PauseSchedule(pb.PauseScheduleRequest(ref=ref("keyed")), timeout=10)
    cluster.gates.UnpauseGate(pb.UnpauseGateRequest(gate=gate), timeout=10)
    views = cluster.wait_terminal([held, now_run], 30)
    assert all(v.status == pb.SUCCEEDED for v in views.values()), views


def test_update_and_delete_against_a_version(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=1, slots=4)
    created = cluster.schedules.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule_msg("versioned", every_s=3600)), timeout=10)
    version = created.schedule.version
    # The same create again (a retry) answers the same schedule; another definition is ALREADY_EXISTS.
    again = cluster.schedules.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule_msg("versioned", every_s=3600)), timeout=10)
    assert again.schedule.version == version
    with pytest.raises(grpc.RpcError) as exists:
        cluster.schedules.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule_msg("versioned", every_s=60)), timeout=10)
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS

    changed = schedule_msg("versioned", every_s=1800)
    with pytest.raises(grpc.RpcError) as stale:
        cluster.schedules.UpdateSchedule(pb.UpdateScheduleRequest(schedule=changed, expected_version=version + 5), timeout=10)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert describe(cluster, "versioned").schedule.spec.every.seconds == 3600  # nothing changed
    updated = cluster.schedules.UpdateSchedule(pb.UpdateScheduleRequest(schedule=changed, expected_version=version), timeout=10)
    assert updated.schedule.version > version and updated.schedule.schedule.spec.every.seconds == 1800
    assert all(t.seconds % 1800 == 0 for t in updated.schedule.next_fire_times)

    with pytest.raises(grpc.RpcError) as stale_delete:
        cluster.schedules.DeleteSchedule(pb.DeleteScheduleRequest(ref=ref("versioned"), expected_version=version), timeout=10)
    assert stale_delete.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    cluster.schedules.DeleteSchedule(pb.DeleteScheduleRequest(ref=ref("versioned"), expected_version=updated.schedule.version), timeout=10)
    with pytest.raises(grpc.RpcError) as gone:
        describe(cluster, "versioned")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    listed = cluster.schedules.ListSchedules(pb.ListSchedulesRequest(namespace=NAMESPACE), timeout=10)
    assert "versioned" not in {s.schedule.schedule_id for s in listed.schedules}


def test_a_six_field_cron_in_a_dst_zone_fires_each_second_once(make_cluster) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=1, slots=8)
    s = schedule_msg("cron-berlin", every_s=None)
    s.spec.cron.append("* * * * * *")  # every second, seconds field first
    s.spec.time_zone = "Europe/Berlin"
    d = cluster.schedules.CreateSchedule(pb.CreateScheduleRequest(schedule=s), timeout=10).schedule
    assert [t.seconds - d.next_fire_times[0].seconds for t in d.next_fire_times] == [0, 1, 2, 3, 4]
    wait_for(lambda: describe(cluster, "cron-berlin").fired_total >= 5, 20, "five runs of the cron schedule")
    cluster.schedules.PauseSchedule(pb.PauseScheduleRequest(ref=ref("cron-berlin")), timeout=10)
    views = runs_of(cluster)["cron-berlin"]
    assert_one_task_per_slot(views, 1)
    done = cluster.wait_terminal([v.task_id for v in views], 30)
    lags = [(v.started_at.ToMilliseconds() - v.run_at.ToMilliseconds()) for v in done.values()]
    assert all(v.status == pb.SUCCEEDED for v in done.values())
    print(f"6-field cron, Europe/Berlin: {len(views)} runs, start lag ms {sorted(lags)}")


# ---------------------------------------------------------------- bad requests


@pytest.fixture
def schedule_stub(task_service: RunningProcess) -> Iterator[pb_grpc.ScheduleServiceStub]:
    assert task_service.target is not None
    with grpc.insecure_channel(task_service.target) as channel:
        yield pb_grpc.ScheduleServiceStub(channel)


def _bad(**change: object) -> pb.Schedule:
    s = pb.Schedule(namespace="bad-input", schedule_id="b")
    s.spec.every.FromSeconds(60)
    s.action.type = "t"
    for path, value in change.items():
        target: object = s
        *parents, leaf = path.split("__")
        for name in parents:
            target = getattr(target, name)
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        elif hasattr(getattr(target, leaf), "CopyFrom"):
            getattr(target, leaf).CopyFrom(value)
        else:
            setattr(target, leaf, value)
    return s


def _seconds(n: int) -> object:
    from google.protobuf.duration_pb2 import Duration

    return Duration(seconds=n)


def _at(s: int) -> object:
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=s)


BAD_SCHEDULES = [
    ("unparseable cron", dict(spec__every=_seconds(0), spec__cron=["61 * * * *"]), "spec.cron[0]"),
    ("four cron fields", dict(spec__every=_seconds(0), spec__cron=["* * * *"]), "spec.cron[0]"),
    ("cron and every", dict(spec__cron=["* * * * *"]), "spec"),
    ("neither cron nor every", dict(spec__every=_seconds(0)), "spec"),
    ("unknown zone", dict(spec__time_zone="Mars/Olympus"), "spec.time_zone"),
    ("zone path", dict(spec__time_zone="../../etc/passwd"), "spec.time_zone"),
    ("negative interval", dict(spec__every=_seconds(-5)), "spec.every"),
    ("end before start", dict(spec__start_at=_at(2_000_000_000), spec__end_at=_at(1_900_000_000)), "spec.end_at"),
    ("jitter >= interval", dict(spec__jitter=_seconds(60)), "spec.jitter"),
    ("offset >= interval", dict(spec__offset=_seconds(60)), "spec.offset"),
    ("action with run_at", dict(action__run_at=_at(2_000_000_000)), "schedule.action.run_at"),
    ("action without type", dict(action__type=""), "schedule.action.type"),
    ("action of another namespace", dict(action__namespace="other"), "schedule.action.namespace"),
    ("action with a bad key", dict(action__concurrency_key="a b"), "schedule.action.concurrency_key"),
    ("action with a bad gate name", dict(action__gate="-gate"), "schedule.action.gate"),
    ("unknown overlap", dict(policy__overlap=42), "policy.overlap"),
    ("catch-up window of 1 s", dict(policy__catchup_window=_seconds(1)), "policy.catchup_window"),
    ("bad schedule id", dict(schedule_id="-no"), "schedule.schedule_id"),
    ("remaining without limit", dict(remaining_actions=3), "schedule.remaining_actions"),
]


@pytest.mark.parametrize(("what", "change", "field"), BAD_SCHEDULES, ids=[b[0] for b in BAD_SCHEDULES])
def test_a_bad_schedule_is_refused_naming_the_field_and_nothing_is_written(
    schedule_stub: pb_grpc.ScheduleServiceStub, what: str, change: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        schedule_stub.CreateSchedule(pb.CreateScheduleRequest(schedule=_bad(**change)), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert (refused.value.details() or "").startswith(field), refused.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        schedule_stub.DescribeSchedule(pb.DescribeScheduleRequest(ref=pb.ScheduleRef(namespace="bad-input", schedule_id="b")), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # The process keeps serving: a good schedule is accepted right after.
    good = _bad()
    good.schedule_id = f"good-{abs(hash(what)) % 10**8}"
    assert schedule_stub.CreateSchedule(pb.CreateScheduleRequest(schedule=good), timeout=10).schedule.version == 1


def test_an_action_naming_a_gate_that_does_not_exist_is_refused(schedule_stub: pb_grpc.ScheduleServiceStub) -> None:
    """As ScheduleTask refuses it: a typo must not run every task of the schedule ungated."""
    with pytest.raises(grpc.RpcError) as refused:
        schedule_stub.CreateSchedule(pb.CreateScheduleRequest(schedule=_bad(action__gate="no-such-gate")), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert (refused.value.details() or "").startswith("schedule.action.gate 'no-such-gate' does not exist")
    with pytest.raises(grpc.RpcError) as missing:
        schedule_stub.DescribeSchedule(pb.DescribeScheduleRequest(ref=pb.ScheduleRef(namespace="bad-input", schedule_id="b")), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_backfill_trigger_and_list_requests(schedule_stub: pb_grpc.ScheduleServiceStub) -> None:
    s = _bad()
    s.schedule_id = "target"
    schedule_stub.CreateSchedule(pb.CreateScheduleRequest(schedule=s), timeout=10)
    target = pb.ScheduleRef(namespace="bad-input", schedule_id="target")
    cases = [
        (lambda: schedule_stub.BackfillSchedule(pb.BackfillScheduleRequest(ref=target), timeout=10), "start_at"),
        (lambda: schedule_stub.BackfillSchedule(
            pb.BackfillScheduleRequest(ref=target, start_at=_at(2_000_000_000), end_at=_at(1_000_000_000)), timeout=10), "end_at"),
        (lambda: schedule_stub.BackfillSchedule(  # a minute apart for ~3 years: over 100,000 slots
            pb.BackfillScheduleRequest(ref=target, start_at=_at(1_000_000_000), end_at=_at(1_100_000_000)), timeout=10), "the range"),
        (lambda: schedule_stub.TriggerSchedule(pb.TriggerScheduleRequest(ref=target, overlap=9), timeout=10), "overlap"),
        (lambda: schedule_stub.ListSchedules(pb.ListSchedulesRequest(namespace="bad-input", page_token="%%%"), timeout=10), "page_token"),
        (lambda: schedule_stub.ListSchedules(pb.ListSchedulesRequest(namespace="bad-input", page_size=-1), timeout=10), "page_size"),
        (lambda: schedule_stub.DescribeSchedule(pb.DescribeScheduleRequest(ref=pb.ScheduleRef(namespace="bad-input")), timeout=10), "ref.schedule_id"),
    ]  # fmt: skip
    for call, field in cases:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, refused.value.details())
        assert field in (refused.value.details() or ""), (field, refused.value.details())
    d = schedule_stub.DescribeSchedule(pb.DescribeScheduleRequest(ref=target), timeout=10).schedule
    assert d.fired_total == 0 and d.backfills_pending == 0 and d.version == 1


def test_list_pages_through_every_schedule(schedule_stub: pb_grpc.ScheduleServiceStub) -> None:
    for i in range(7):
        s = _bad()
        s.namespace, s.schedule_id = "listing", f"s{i}"
        schedule_stub.CreateSchedule(pb.CreateScheduleRequest(schedule=s), timeout=10)
    seen: list[str] = []
    token = ""
    while True:
        page = schedule_stub.ListSchedules(pb.ListSchedulesRequest(namespace="listing", page_size=3, page_token=token), timeout=10)
        seen += [d.schedule.schedule_id for d in page.schedules]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"s{i}" for i in range(7)]
