"""The JSON report of one load test, with issue 4's targets evaluated on it.

Definitions (also written into the report under ``definitions``):

* achieved ``ok_per_s``: answers with status OK ÷ the load duration;
* latency: from the request's intended send time (open loop) to its answer;
* completed/s: tasks whose final status is SUCCEEDED with ``finished_at``
  inside the load window, ÷ the load duration (server time, from PollTask);
* dispatch lag: first execution start (ledger) − the task's ``run_at``;
  immediate schedule-to-start: first start − intended ScheduleTask send time;
  ``…_warm_ms``: the same over the tasks sent from ``WARMUP_S`` (10 s) after
  the load's start: a cluster the run has just started has a cold JVM (its
  JIT compiles for the first seconds) and cold connections, and its first
  seconds held nearly all of the tail at 100 tasks/s (p99 265 ms over every
  task, 70 ms after 10 s). Both are reported;
* immediate stages (``immediate_stages_ms``): that time cut at the trigger's
  and the worker's times on the first execution's START (ledger): send →
  answered (ScheduleTask, a parallel branch), send → trigger saw it due,
  → dispatched, → worker received, → ClaimTask sent, → claim answered, →
  START; p50 and p99 per stage over the immediate tasks that have both
  ends; wall clocks of one machine (``leasesched.loadtest.stages``);
* lost: accepted (ScheduleTask answered OK) but not terminal after the drain,
  or not found;
* unverified: accepted, but every final PollTask was refused (e.g. shed with
  RESOURCE_EXHAUSTED under overload) until the drain's end: the harness could
  not read it, which says nothing about the task (the ledger still shows
  whether it ran); reported beside lost, never counted as lost;
* overlaps: two executions of one task overlapping in time (ledger);
* schedules (``--schedules``): expected = the slots of each schedule in the
  load window (its spec's start_at..end_at); found = distinct tasks that
  name one of the run's schedules (ListTasks); duplicates = tasks beyond the
  first at one (schedule_id, nominal_time); missed = expected slots with no
  task; firing lag = a slot task's started_at − run_at (run_at = slot +
  jitter), creation lag = created_at − nominal_time; fired/s = slot tasks
  created in the load window ÷ its length; CPU per fire = CPU seconds of the
  store (Cassandra) and of the leasesched processes over the load ÷ those
  fires (everything else they did, e.g. ScheduleTask load, included);
  counters = DescribeSchedule's fired_total and skipped_total, summed;
* groups (``--groups``): every task of the load has concurrency key
  g0..g{N-1} (``--flood`` tasks in a burst before the load: g0); per group
  and per class (flood = g0, others = the rest together): count, started,
  start lag = first execution start (ledger) − run_at; maximum concurrency
  of a key = the most executions of its tasks running at one moment (ledger
  executions, ``ledger.max_concurrent``: one starting the instant another
  ends counts as two at once; one lease recorded by two processes is one);
  flood executed/s = flood tasks that finished ÷ (their last end − their
  first start);
* flow (``--limit-per-key``, ``--gate-rate``): limit = a default key limit
  ``*`` of N in the load's namespace, set before the load and deleted after;
  held = no key's maximum concurrency (as for groups) above N, used = some
  key reached N. gate = a gate ``load-<run id>`` every task of the load
  (flood included, pre-flight not) names, deleted after; starts = every
  execution START of those tasks (each took a token); achieved start rate =
  (starts − 1) ÷ (last start − first start); busiest window of w s = the most
  starts in one closed window [t, t + w], against the gate's bound rate × w
  + burst (handler starts, a little after the token was taken: dispatch
  jitter can put a start or two over it);
* efficiency: (LWTs per task × completed/s) ÷ the store's LWT/s measured by
  the probe in the same run. leasesched writes 2 LWTs per task (claim,
  complete; a key-less task's row is created by a plain insert), +1 per
  heartbeat (every lease/3 while the handler runs), +2 when an idempotency key
  is given (the key, and the then conditional creation).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from leasesched.loadtest.metrics import percentiles
from leasesched.v1 import scheduler_pb2 as pb

from leasesched.loadtest.flow import OPTION_FIELDS as FLOW_OPTIONS, flow_lines, flow_section
from leasesched.loadtest.groups import OPTION_FIELDS as GROUP_OPTIONS, group_section
from leasesched.loadtest.schedule_load import schedule_section
from leasesched.loadtest.stages import ImmediateTask, breakdown, stage_lines

if TYPE_CHECKING:
    from leasesched.loadtest.ledger import LedgerSummary
    from leasesched.loadtest.runner import LoadTest

TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}

# Tasks sent this long after the load's start count as "warm" (see Definitions).
WARMUP_S = 10.0

TARGETS = {
    "schedule_per_s": (">=", 1000.0),
    "schedule_sustained_s": (">=", 60.0),
    "schedule_p99_ms": ("<", 50.0),
    "poll_per_s": (">=", 3000.0),
    "completed_per_s": (">=", 500.0),
    "dispatch_lag_p99_ms": ("<=", 1000.0),
    "immediate_schedule_to_start_p50_ms": ("<=", 50.0),
    "lost": ("==", 0),
    "overlaps": ("==", 0),
    "efficiency": (">=", 0.70),
}


def _met(op: str, value: Any, target: float) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return {">=": value >= target, "<=": value <= target, "<": value < target, "==": value == target}[op]


def lwt_per_task(idempotency_keys: bool, handler_ms: float, lease_s: float) -> float:
    heartbeats = math.floor((handler_ms / 1000.0) / (lease_s / 3.0)) if lease_s > 0 else 0
    return 2 + (2 if idempotency_keys else 0) + heartbeats


@dataclass
class FinalStates:
    """Every accepted task by what its final PollTask said."""

    by_status: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # not found, or not terminal though due
    unverified: list[str] = field(default_factory=list)  # every final read refused: unknown, not lost
    not_due_yet: int = 0  # due after the drain's end: legitimately still waiting
    finished_rel: list[float] = field(default_factory=list)  # SUCCEEDED tasks' finish, s after t0


def final_states(accepted: list[str], final: dict[str, Any], run_at_ms: dict[str, int], due_by_ms: int, t0: float) -> FinalStates:
    """``final``: task id → its last TaskView, or the status code name that
    its last PollTask answered instead (NOT_FOUND: lost; anything else, e.g.
    RESOURCE_EXHAUSTED when the poll was shed: unverified)."""
    out = FinalStates()
    for task_id in accepted:
        view = final.get(task_id)
        if isinstance(view, pb.TaskView):
            out.by_status[pb.TaskStatus.Name(view.status)] += 1
            if view.status not in TERMINAL:
                if run_at_ms[task_id] > due_by_ms:
                    out.not_due_yet += 1
                else:
                    out.lost.append(task_id)
            elif view.status == pb.SUCCEEDED and view.HasField("finished_at"):
                out.finished_rel.append(view.finished_at.ToMilliseconds() / 1000.0 - t0)
        else:
            out.by_status[f"unreadable:{view}"] += 1
            (out.lost if view in ("NOT_FOUND", None) else out.unverified).append(task_id)
    return out


def after_warmup(samples: list[tuple[float, float]], t0: float) -> list[float]:
    """The values of the ``(sent at, value)`` samples sent ``WARMUP_S`` or more after ``t0`` (wall seconds)."""
    return [value for sent, value in samples if sent - t0 >= WARMUP_S]


def build(lt: "LoadTest", load: dict[str, Any], ledger: "LedgerSummary | None", probe: dict[str, Any] | None,
          load_before: tuple[float, float, float], started: float) -> dict[str, Any]:  # fmt: skip
    o = lt.o
    seconds = float(load["seconds"])
    t0 = float(load["t0_wall"])
    sched, poll = load["schedule"], load["poll"]
    accepted = lt.accepted

    # ---- final states
    finals = final_states(accepted, lt.final, {t: run_at for t, (_, run_at, _) in lt.tasks.items()}, lt.due_by_ms, t0)
    by_status, lost, unverified, not_due_yet = finals.by_status, finals.lost, finals.unverified, finals.not_due_yet
    finished_rel = finals.finished_rel
    finished = np.asarray(finished_rel)
    in_window = int(((finished >= 0) & (finished < seconds)).sum()) if finished.size else 0
    completed_per_s = in_window / seconds if seconds else 0.0
    horizon = int(math.ceil(max(seconds, float(finished.max()) if finished.size else 0.0))) + 1
    # Pre-flight tasks that finished just before the clock started go into second 0.
    clipped = np.clip(finished, 0, None)
    completed_series = np.histogram(clipped, bins=np.arange(0, horizon + 1))[0].tolist() if finished.size else [0] * horizon
    best_10s = max((sum(completed_series[i : i + 10]) / 10.0 for i in range(max(1, len(completed_series) - 9))), default=0.0)

    # Executions the handlers finished in the window, acknowledged to the client or not (the server's real work).
    executed_per_s = None
    if ledger is not None and seconds:
        ends = np.asarray(ledger.ends) - t0
        executed_per_s = round(float(((ends >= 0) & (ends < seconds)).sum()) / seconds, 1)

    # ---- dispatch lag (ledger)
    lag_all, lag_delayed, imm_sent = [], [], []
    if ledger is not None:
        for task_id, (sent_wall, run_at_ms, immediate) in lt.tasks.items():
            first = ledger.first_start.get(task_id)
            if first is None:
                continue
            lag = first * 1000.0 - run_at_ms
            lag_all.append(lag)
            if immediate:
                imm_sent.append((sent_wall, (first - sent_wall) * 1000.0))
            else:
                lag_delayed.append(lag)
    imm_start, imm_start_warm = [ms for _, ms in imm_sent], after_warmup(imm_sent, t0)
    immediate_count = sum(1 for _, _, imm in lt.tasks.values() if imm)
    stages = None
    if ledger is not None:
        stages = breakdown(
            (ImmediateTask(task_id, sent, lt.answered.get(task_id)) for task_id, (sent, _, imm) in lt.tasks.items() if imm),
            ledger.by_task,
        ).as_dict()

    # ---- store and efficiency
    lease_s = lt.cfg.default_lease_s
    per_task = lwt_per_task(o.idempotency_keys, o.handler_ms, lease_s)
    lwt_capacity = probe["lwt_writes"]["per_s"] if probe else None
    efficiency = (per_task * completed_per_s / lwt_capacity) if lwt_capacity else None

    s_sum = sched.summary(seconds, o.schedule_rate)
    # Which call carried the tasks: latencies of a batch are its call's, measured from its send (issue 17).
    s_sum["mode"] = schedule_mode(getattr(o, "schedule_batch", 1))
    p_sum = poll.summary(seconds, o.poll_rate)
    errors = Counter(sched.errors) + Counter(poll.errors)
    overlaps = len(ledger.overlaps) if ledger is not None else None
    sustained = seconds if s_sum["achieved_ok_per_s"] >= TARGETS["schedule_per_s"][1] else 0.0

    values = {
        "schedule_per_s": s_sum["achieved_ok_per_s"],
        "schedule_sustained_s": sustained,
        "schedule_p99_ms": s_sum["latency_ms"]["p99"],
        "poll_per_s": p_sum["achieved_ok_per_s"],
        "completed_per_s": round(completed_per_s, 1),
        "dispatch_lag_p99_ms": percentiles(lag_all)["p99"],
        "immediate_schedule_to_start_p50_ms": percentiles(imm_start)["p50"],
        "lost": len(lost),
        "overlaps": overlaps,
        "efficiency": round(efficiency, 3) if efficiency is not None else None,
    }
    targets = {k: {"target": f"{op} {t}", "value": values[k], "met": _met(op, values[k], t)} for k, (op, t) in TARGETS.items()}

    # ---- do the counts add up?
    terminal = sum(n for s, n in by_status.items() if s in ("SUCCEEDED", "FAILED", "CANCELLED"))
    checks = {
        "schedule_sent_eq_ok_plus_errors": sched.sent == sched.ok + sum(sched.errors.values()),
        "poll_sent_eq_ok_plus_errors": poll.sent == poll.ok + sum(poll.errors.values()),
        "due_eq_sent_plus_not_sent": load["due"]["ScheduleTask"] == sched.sent + sum(sched.not_sent.values())
        and load["due"]["PollTask"] == poll.sent + sum(poll.not_sent.values()),
        "accepted_eq_schedule_ok_plus_preflight": len(accepted) == sched.ok + lt.preflight + lt.burst.accepted,
        "accepted_ids_unique": len(set(accepted)) == len(accepted) == len(lt.tasks),
        "statuses_sum_to_accepted": sum(by_status.values()) == len(accepted),
        "terminal_plus_lost_plus_not_due_plus_unverified_eq_accepted": terminal + len(lost) + not_due_yet + len(unverified)
        == len(accepted),
        "succeeded_tasks_were_started": ledger is None
        or all(t in ledger.first_start for t in accepted if _status(lt.final.get(t)) == pb.SUCCEEDED),
    }

    # ---- things that make the numbers less trustworthy, said out loud
    warnings = []
    lag99, poll_lag99 = s_sum["send_lag_ms"]["p99"] or 0.0, p_sum["send_lag_ms"]["p99"] or 0.0
    if lag99 > 100 or poll_lag99 > 100:
        warnings.append(
            f"the load generator fell behind its schedule (send lag p99 ScheduleTask {lag99:.0f} ms, PollTask "
            f"{poll_lag99:.0f} ms): the offered load was lower than the target and latencies include client-side delay"
        )
    if sched.not_sent or poll.not_sent:
        warnings.append(f"requests not sent (in-flight cap {o.max_inflight}): {dict(sched.not_sent + poll.not_sent)}")
    cpu_info = load["cpu"]
    if cpu_info.get("others_cpu_s", 0) > 0.2 * cpu_info["window_s"] * (cpu_info.get("machine_cores") or 1):
        warnings.append(
            f"other processes used {cpu_info['others_cpu_s']:.0f} CPU seconds during the {cpu_info['window_s']:.0f} s load "
            f"(machine busy {100 * cpu_info['machine_busy_fraction']:.0f}%): the machine was shared"
        )
    slot_task_ids = {t.task_id for t in lt.schedule_tasks}  # created by the schedules, never "accepted"
    unacknowledged = sorted(set(ledger.first_start) - set(accepted) - slot_task_ids) if ledger is not None else []
    if unacknowledged:
        warnings.append(
            f"{len(unacknowledged)} tasks ran whose ScheduleTask answer the client never got (deadline or cancel): "
            "created server-side, not counted as accepted"
        )

    schedules = None
    if lt.plan is not None:
        store_cpu, python_cpu = cpu_split(load["cpu"]["per_process"])
        schedules = schedule_section(
            lt.plan, lt.schedule_tasks, lt.schedule_counters,
            {task_id: len(runs) for task_id, runs in ledger.by_task.items()} if ledger is not None else {},
            {a.task_id for a, _ in ledger.overlapping} if ledger is not None else (),
            (t0, t0 + seconds), {"store": store_cpu, "python": python_cpu}, lt.schedule_create_s,
        )  # fmt: skip
        schedules["create_failed"] = lt.schedule_create_failed
        checks["schedule_slots_add_up"] = (
            schedules["slots_with_task"] + schedules["missed"] == schedules["expected"]
            and schedules["found"] == schedules["slots_with_task"] + schedules["duplicates"] + schedules["unexpected"]
        )
        late = lt.schedule_created_at - lt.plan.start_ms / 1000
        if late > 0:
            warnings.append(f"schedules: creating them ended {late:.1f} s after their first slot: early slots fired late")
        if lt.schedule_create_failed:
            warnings.append(f"schedules: {lt.schedule_create_failed} could not be created: their slots count as missed")
        if schedules["missed"] or schedules["duplicates"] or schedules["overlaps"]:
            warnings.append(
                f"schedules: {schedules['missed']} missed slots, {schedules['duplicates']} duplicate tasks, "
                f"{schedules['overlaps']} overlapping executions (examples in the report)"
            )
        if ledger is None:
            warnings.append("schedules: no execution ledger, so executions per slot task were not checked")

    groups = None
    if lt.group_plan is not None:
        plan = lt.group_plan
        groups = group_section(plan, list(lt.grouped.values()), ledger.first_start if ledger is not None else {},
                               ledger.by_task if ledger is not None else {}, lt.burst)  # fmt: skip
        checks["group_keys_round_trip"] = all(
            isinstance(lt.final.get(t.task_id), pb.TaskView) and lt.final[t.task_id].concurrency_key == plan.key(t.group)
            for t in lt.grouped.values()
        )  # fmt: skip
        if lt.burst.failed:
            warnings.append(f"groups: {lt.burst.failed} of the {lt.burst.requested} flood tasks were not accepted: {lt.burst.errors}")
        if ledger is None:
            warnings.append("groups: no execution ledger, so no start lag per group and no concurrency per key")

    flow = None
    if lt.flow_plan is not None:
        fp = lt.flow_plan
        flow = flow_section(fp, ledger.by_task if ledger is not None else {},
                            {t.task_id: lt.group_plan.key(t.group) for t in lt.grouped.values()} if lt.group_plan else {},
                            lt.gated, lt.flow_setup)  # fmt: skip
        if fp.gate_rate is not None:
            checks["gate_names_round_trip"] = all(
                isinstance(lt.final.get(t), pb.TaskView) and lt.final[t].gate == fp.gate_name for t in lt.gated
            )  # fmt: skip
        if flow["setup"].get("errors"):
            warnings.append(f"flow: setting up or removing the limit or gate failed: {flow['setup']['errors']}")
        if ledger is None:
            warnings.append("flow: no execution ledger, so neither the limit nor the gate was checked")
        lim, gate = flow.get("limit"), flow.get("gate")
        if lim and not lim["held"]:
            warnings.append(f"flow: the limit of {lim['max_running']} per key was exceeded: {lim['keys_over_limit']}")
        if lim and not lim["used"] and ledger is not None:
            warnings.append(f"flow: no key reached the limit of {lim['max_running']} (at most {lim['max_over_keys']}): the run says nothing about it")
        if gate and not gate["held"]:
            warnings.append(
                "flow: a window had more gated starts than rate × w + burst: "
                + ", ".join(f"{w['max_starts']} in {w['seconds']:g} s (≤ {w['bound']:g})" for w in gate["windows"] if not w["within"])
            )

    series = {
        "second": list(range(horizon)),
        "schedule": _pad(sched.series(horizon), horizon),
        "poll": _pad(poll.series(horizon), horizon),
        "completed": completed_series[:horizon],
        # Executions the handlers finished per second (ledger), whether or not the client got the schedule answer.
        "executed": (np.histogram(np.clip(np.asarray(ledger.ends) - t0, 0, None), bins=np.arange(0, horizon + 1))[0].tolist()
                     if ledger is not None and ledger.ends else [0] * horizon),
        "machine": lt.machine_series,
    }
    cpu = load["cpu"]
    return {
        "run": {
            "id": lt.run_id,
            "label": o.label,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
            "mode": "local cluster" if o.local else f"external target {lt.target}",
            "git": _git_state(),
            # Without groups (or a limit or gate) their options are left out: such a report has exactly the fields it always had.
            "options": {k: v for k, v in vars(o).items()
                        if (o.groups or k not in GROUP_OPTIONS) and (lt.flow_plan is not None or k not in FLOW_OPTIONS)},
            "cluster": {
                "commitlog_sync": lt.cfg.cassandra_commitlog_sync,
                "auth": lt.cfg.auth,
                "keyspace": lt.cfg.keyspace,
                "consistency": lt.cfg.consistency,
                "serial_consistency": lt.cfg.serial_consistency,
                "logical_shards": lt.cfg.logical_shards,
                "lease_s": lease_s,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after_load": [round(x, 2) for x in os.getloadavg()],
            },
        },
        "schedule": s_sum,
        "poll": p_sum,
        "tasks": {
            "accepted": len(accepted),
            "immediate": immediate_count,
            "delayed": len(lt.tasks) - immediate_count,
            "by_status": dict(by_status),
            "lost": len(lost),
            "not_due_yet": not_due_yet,
            "lost_examples": lost[:10],
            "unverified": len(unverified),
            "unverified_ran": sum(1 for t in unverified if ledger is not None and t in ledger.first_start),
            "completed_in_window": in_window,
            "completed_per_s": round(completed_per_s, 1),
            "completed_per_s_best_10s": round(best_10s, 1),
            "executed_per_s_incl_unacknowledged": executed_per_s,
            "executions": ledger.executions if ledger else None,
            "tasks_started": ledger.tasks_started if ledger else None,
            "re_executions": ledger.re_executions if ledger else None,
            "unfinished_executions": ledger.unfinished if ledger else None,
            "overlaps": overlaps,
            "executed_not_accepted": len(unacknowledged),
            "overlap_examples": ledger.overlaps[:10] if ledger else [],
        },
        "schedules": schedules,
        **({"groups": groups} if groups is not None else {}),
        **({"flow": flow} if flow is not None else {}),
        "dispatch_lag_ms": percentiles(lag_all),
        "dispatch_lag_delayed_ms": percentiles(lag_delayed),
        "immediate_schedule_to_start_ms": percentiles(imm_start),
        "immediate_schedule_to_start_warm_ms": percentiles(imm_start_warm),
        "immediate_stages_ms": stages,
        "errors_by_code": dict(errors),
        "cpu": cpu,
        # Load start to drain end (the window above ends with the load); executions = ledger ENDs in it.
        "cpu_through_drain": cpu_per_execution(load["cpu_through_drain"], ledger.ends if ledger is not None else []),
        "store_probe": probe,
        "efficiency": {
            "lwt_per_task": per_task,
            "completed_per_s": round(completed_per_s, 1),
            "store_lwt_per_s": lwt_capacity,
            "value": values["efficiency"],
            "note": "meaningful at saturation; below it the offered load bounds it",
        },
        "drain": load["drain"],
        "load_tail_s": load["tail_s"],
        "profiles": load["profiles"],
        "targets": targets,
        "checks": checks,
        "warnings": warnings,
        "consistent": all(checks.values()),
        "series": series,
        "definitions": __doc__.split("Definitions (also written into the report under ``definitions``):")[1].strip(),
        "files": {"folder": str(lt.folder)},
    }


def cpu_split(per_process: dict[str, Any]) -> tuple[float, float]:
    """CPU seconds of the store (Cassandra) and of the leasesched processes
    (ZooKeeper and the load generator left out) from a CpuMeter's per-process figures."""
    store = sum(v["cpu_s"] for k, v in per_process.items() if v and k.startswith("cassandra"))
    python = sum(v["cpu_s"] for k, v in per_process.items()
                 if v and not k.startswith(("cassandra", "zookeeper")) and k != "loadtest-client")  # fmt: skip
    return store, python


def cpu_per_execution(cpu: dict[str, Any], ends: list[float]) -> dict[str, Any]:
    """CPU from the load's start to the drain's end ÷ the executions that ended in it.

    Over the drain too, because a run whose tasks a limit or a gate holds
    back does much of its work after the load window: CPU of the window ÷
    the tasks done in it would count work for tasks it never ran.
    ``cpu``: a CpuMeter's figures plus ``began_wall``/``ended_wall``;
    ``ends``: the ledger's END times of executions that were not stopped."""
    began, ended = float(cpu["began_wall"]), float(cpu["ended_wall"])
    n = sum(1 for t in ends if began <= t <= ended)
    store, python = cpu_split(cpu["per_process"])

    def per(cpu_s: float) -> float | None:
        return round(1000.0 * cpu_s / n, 2) if n else None

    return {
        "window_s": cpu["window_s"],
        "executions": n,
        "store_cpu_s": round(store, 2),
        "python_cpu_s": round(python, 2),
        "cpu_ms_per_execution": {"store": per(store), "python": per(python)},
        "machine_busy_fraction": cpu["machine_busy_fraction"],
        "others_cpu_s": cpu["others_cpu_s"],
    }


def _git_state() -> dict[str, Any]:
    """The code that was measured: HEAD and the files changed in the work tree at report time."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if len(line) > 3]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty_files": dirty}


def _status(view: Any) -> int | None:
    return view.status if isinstance(view, pb.TaskView) else None


def _pad(series: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    return {k: (v + [None if k.endswith("_ms") else 0] * n)[:n] for k, v in series.items()}


def schedule_mode(batch: int) -> str:
    """How the load scheduled its tasks, as the report names it."""
    return "ScheduleTask" if batch <= 1 else f"ScheduleTasks, up to {batch} tasks a call"


def text_summary(r: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    s, p, t = r["schedule"], r["poll"], r["tasks"]
    lines = [
        f"results: {r['files'].get('folder')}",
        *([f"schedule mode {s['mode']} (latency per task: its call's, from the call's send)"] if s.get("mode", "ScheduleTask") != "ScheduleTask" else []),
        f"ScheduleTask  {s['achieved_ok_per_s']:>8.1f}/s of {s['target_per_s']:.0f}  latency p50 {_ms(s['latency_ms']['p50'])} "
        f"p95 {_ms(s['latency_ms']['p95'])} p99 {_ms(s['latency_ms']['p99'])} max {_ms(s['latency_ms']['max'])}  errors {s['errors'] or '-'}",
        f"PollTask      {p['achieved_ok_per_s']:>8.1f}/s of {p['target_per_s']:.0f}  latency p50 {_ms(p['latency_ms']['p50'])} "
        f"p95 {_ms(p['latency_ms']['p95'])} p99 {_ms(p['latency_ms']['p99'])} max {_ms(p['latency_ms']['max'])}  errors {p['errors'] or '-'}",
        f"tasks         accepted {t['accepted']}  completed {t['completed_per_s']}/s (best 10 s {t['completed_per_s_best_10s']}/s; "
        f"executions incl. unacknowledged {t.get('executed_per_s_incl_unacknowledged')}/s)  "
        f"status {t['by_status']}",
        f"dispatch lag  p50 {_ms(r['dispatch_lag_ms']['p50'])} p99 {_ms(r['dispatch_lag_ms']['p99'])} max {_ms(r['dispatch_lag_ms']['max'])};"
        f"  immediate schedule→start p50 {_ms(r['immediate_schedule_to_start_ms']['p50'])} p99 {_ms(r['immediate_schedule_to_start_ms']['p99'])}"
        f" (sent after {WARMUP_S:g} s: p50 {_ms(_warm(r)['p50'])} p99 {_ms(_warm(r)['p99'])})",
        *stage_lines(r.get("immediate_stages_ms")),
        f"correctness   lost {t['lost']}{_unverified(t)}  overlaps {t['overlaps']}  executions {t['executions']} (re-executions {t['re_executions']})  "
        f"counts add up: {r['consistent']}",
    ]
    sc = r.get("schedules")
    if sc:
        c = sc["counters"]
        lines.append(
            f"schedules     {sc['schedules']} every {sc['every_s']:g} s: expected {sc['expected']} found {sc['found']}  "
            f"missed {sc['missed']} duplicates {sc['duplicates']} overlaps {sc['overlaps']}  fired {sc['fired_per_s_in_window']}/s  "
            f"firing lag p50 {_ms(sc['firing_lag_ms']['p50'])} p99 {_ms(sc['firing_lag_ms']['p99'])} max {_ms(sc['firing_lag_ms']['max'])}  "
            f"creation lag p50 {_ms(sc['creation_lag_ms']['p50'])} p99 {_ms(sc['creation_lag_ms']['p99'])}  "
            f"counters fired {c['fired_total']} skipped {c['skipped_total']}"
        )
    g = r.get("groups")
    if g:
        lines.extend(group_lines(g))
    f = r.get("flow")
    if f:
        lines.extend(flow_lines(f))
    if r.get("store_probe"):
        e = r["efficiency"]
        lines.append(
            f"store         plain {r['store_probe']['plain_writes']['per_s']:.0f}/s  LWT {r['store_probe']['lwt_writes']['per_s']:.0f}/s"
            f"  efficiency {e['value']} ({e['lwt_per_task']} LWT/task × {e['completed_per_s']}/s ÷ {e['store_lwt_per_s']}/s)"
        )
    cpu = r["cpu"]["per_process"]
    lines.append("cpu (cores)   " + "  ".join(f"{k} {v['cores']}" for k, v in cpu.items() if v) +
                 f"  | machine busy {100 * r['cpu']['machine_busy_fraction']:.0f}%")  # fmt: skip
    ctd = r.get("cpu_through_drain")
    if ctd:
        per = ctd["cpu_ms_per_execution"]
        lines.append(f"cpu per task  load start to drain end ({ctd['window_s']:.0f} s, {ctd['executions']} executions): "
                     f"Cassandra {_ms(per['store'])}, Python {_ms(per['python'])}; machine busy "
                     f"{100 * ctd['machine_busy_fraction']:.0f}%, others {ctd['others_cpu_s']:.0f} CPU s")  # fmt: skip
    lines.extend(f"warning       {w}" for w in r.get("warnings", []))
    lines.append("targets       " + "  ".join(f"{k}={v['value']}{'✓' if v['met'] else '✗' if v['met'] is False else '?'}" for k, v in r["targets"].items()))
    return "\n".join(lines)


def group_lines(g: dict[str, Any]) -> list[str]:
    """The ``groups`` section for the terminal: the burst, both classes, the groups, the concurrency per key."""
    b, c, mc = g["flood_burst"], g["classes"], g["max_concurrency"]

    def lag(row: dict[str, Any]) -> str:
        x = row["start_lag_ms"]
        return f"{row['started']}/{row['count']} started, start lag p50 {_ms(x['p50'])} p99 {_ms(x['p99'])} max {_ms(x['max'])}"

    lines = [
        f"groups        {g['groups']} keys, g0 share {g['flood_share']:g}; flood {b['accepted']}/{b['requested']} accepted in "
        f"{b['seconds']} s ({b['accepted_per_s']}/s), executed {b['executed']} at {b['executed_per_s']}/s"
        + (f", failed {b['errors']}" if b["failed"] else ""),
        f"  flood g0    {lag(c['flood'])}; g0 tasks waiting when the first other group's task was due: "
        f"{g.get('g0_backlog_when_others_first_due')}",
        f"  others      {lag(c['others'])}",
    ]
    lines.extend(f"  {row['key']:<11} {lag(row)}; at most {row.get('max_concurrent') or 0} at once" for row in g["per_group"])
    if g.get("per_group_rows_left_out"):
        lines.append(f"  ({g['per_group_rows_left_out']} more groups: in the JSON's max_concurrency.per_key and the others class)")
    lines.append(
        f"  concurrency max per key {mc['max_over_keys']} ({mc['key']}), g0 {mc.get('g0')}, others at most {mc['others_max']}"
    )
    return lines


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def _warm(r: dict[str, Any]) -> dict[str, Any]:
    """The warm schedule → start percentiles (absent from reports older than them)."""
    return r.get("immediate_schedule_to_start_warm_ms") or {"p50": None, "p99": None}


def _unverified(t: dict[str, Any]) -> str:
    """The tasks whose final read was refused, when there are any."""
    n = t.get("unverified", 0)
    return f" (+ {n} unverified: final poll refused; {t.get('unverified_ran', 0)} of them ran per the ledger)" if n else ""
