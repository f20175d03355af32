"""``leasesched loadtest``: open-loop load against a cluster, a JSON report and a PNG chart.

    leasesched --home /tmp/lsbench loadtest --schedule-rate 1000 --poll-rate 3000 --duration 60
    leasesched loadtest --target 10.0.0.5:50051 --no-local --ledger /shared/ledger.jsonl
    leasesched loadtest --groups 11 --flood 10000 --flood-share 0 --schedule-rate 2 --duration 5   # one flooding group
    leasesched loadtest --groups 20 --flood-share 0.9 --limit-per-key 5 --handler-ms 500   # at most 5 running per key
    leasesched loadtest --gate-rate 20 --gate-burst 5 --schedule-rate 40 --duration 10    # 400 tasks through one gate

With ``--local`` (the default) it starts a complete cluster itself, from the
same Config every command reads (``--home``, LEASESCHED_* variables):
Cassandra and ZooKeeper (idempotent, left running unless ``--stop-infra``),
a fresh keyspace and ZooKeeper root, TaskService, TaskUpdater, the triggers
and workers running ``worker.bench_handlers``. ``--groups`` gives the tasks
concurrency keys and reports start lag per group and concurrency per key
(``leasesched/loadtest/groups.py``); ``--limit-per-key`` and ``--gate-rate``
run the load under a default key limit and a gate, and report whether they
held (``leasesched/loadtest/flow.py``). See
``leasesched/loadtest/runner.py`` for the phases and BENCHMARKS.md for results.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from leasesched.config import Config
from leasesched.schedules import Overlap


def _range(text: str, kind: type = float) -> tuple:  # "1-10" or "5"
    lo, _, hi = text.partition("-")
    return kind(lo), kind(hi or lo)


@click.command("loadtest")
@click.option("--schedule-rate", type=float, default=1000.0, show_default=True, help="ScheduleTask per second (open loop).")
@click.option("--poll-rate", type=float, default=3000.0, show_default=True, help="PollTask per second on random accepted tasks.")
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds of load.")
@click.option("--delayed", "delayed_fraction", type=float, default=0.2, show_default=True, help="Share of tasks scheduled with a delay.")
@click.option("--delay", default="1-10", show_default=True, help="Delay of delayed tasks in seconds, MIN-MAX (uniform).")
@click.option("--payload-bytes", type=int, default=256, show_default=True)
@click.option("--handler-ms", type=float, default=0.0, show_default=True, help="How long the bench handler sleeps.")
@click.option("--priorities", default="5", show_default=True, help="Priority, or MIN-MAX (uniform), 0-9.")
@click.option("--schedule-batch", type=click.IntRange(1, 500), default=1, show_default=True,
              help="Tasks per call: 1 = ScheduleTask per task; N > 1 = the tasks due at each tick in ScheduleTasks calls of up to N.")
@click.option("--idempotency-keys/--no-idempotency-keys", default=False, show_default=True, help="Send a key with every ScheduleTask (+1 LWT per task).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Per-RPC deadline, seconds.")
@click.option("--max-inflight", type=int, default=2000, show_default=True, help="Per method; beyond it a due request is counted as not sent (CLIENT_BACKLOG).")
@click.option("--channels", type=int, default=4, show_default=True, help="gRPC channels (HTTP/2 connections) the client spreads over.")
@click.option("--drain", type=float, default=60.0, show_default=True, help="Seconds to wait for tasks to finish after the load (and after the last delayed task is due).")
@click.option("--probe-seconds", type=float, default=5.0, show_default=True, help="Store probe per kind (plain, LWT); 0 = no probe.")
@click.option("--probe-concurrency", type=int, default=128, show_default=True)
@click.option("--profile", multiple=True, help="py-spy this process or role during the load (task-service, task-updater, trigger, worker, client, all).")
@click.option("--schedules", type=int, default=0, show_default=True, help="Periodic schedules created before the load, firing over exactly the load window (0 = none).")
@click.option("--every", "schedule_every", type=float, default=10.0, show_default=True, help="Their period, seconds (offsets spread evenly over it).")
@click.option("--schedule-jitter", type=float, default=0.0, show_default=True, help="Their spec.jitter, seconds (< --every).")
@click.option("--schedule-handler-ms", type=float, default=0.0, show_default=True, help="How long the bench handler of a slot's task sleeps.")
@click.option("--schedule-overlap", type=click.Choice([o.value for o in Overlap]), default=Overlap.ALLOW_ALL.value, show_default=True,
              help="Their overlap policy; with allow_all every slot must get a task (a skipped slot counts as missed).")
@click.option("--groups", type=int, default=0, show_default=True,
              help="Give every task a concurrency key g0..g{N-1} (0 = no key); the report adds start lag per group and concurrency per key.")
@click.option("--flood-share", type=float, default=None, help="Share of the load for g0, 0-1; the rest goes to the other groups in turn [default: uniform].")
@click.option("--flood", type=int, default=0, show_default=True, help="Tasks for g0 scheduled in one burst before the load (a backlog of one group).")
@click.option("--limit-per-key", type=click.IntRange(1, None), default=None,
              help="Set a default key limit '*' of N running tasks in the load's namespace before the load, removed after (needs --groups); the report says the most that ran at once per key.")
@click.option("--gate-rate", type=click.FloatRange(0, None, min_open=True), default=None,
              help="Create a gate of this many starts a second that every task of the load names, removed after; the report compares the starts with it.")
@click.option("--gate-burst", type=click.IntRange(1, None), default=None, help="The gate's burst [default: 1].")
@click.option("--local/--no-local", default=True, show_default=True, help="Start a complete local cluster (else drive --target).")
@click.option("--target", default="", help="TaskService host:port of a running cluster (with --no-local).")
@click.option("--ledger", default="", help="With --no-local: the execution ledger the cluster's bench workers write (LEASESCHED_BENCH_LEDGER).")
@click.option("--triggers", type=int, default=2, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--slots", type=int, default=64, show_default=True, help="Slots per worker.")
@click.option("--start-infra/--no-start-infra", default=True, show_default=True, help="Start Cassandra and ZooKeeper if they are not running.")
@click.option("--stop-infra", is_flag=True, help="Stop Cassandra and ZooKeeper at the end.")
@click.option("--keep-data", is_flag=True, help="Keep the run's keyspace.")
@click.option("--results", "results_dir", default="results", show_default=True, help="Folder for the run's report, chart and logs.")
@click.option("--label", default="", help="A name for the run (in the folder name and the chart).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON on stdout.")
@click.pass_obj
def loadtest(cfg: Config, delay: str, priorities: str, quiet: bool, as_json: bool, **kw: Any) -> None:
    """Open-loop load test: rates, latency, dispatch lag, lost tasks, overlaps, store efficiency."""
    from leasesched.loadtest.flow import FlowPlan
    from leasesched.loadtest.groups import GroupPlan
    from leasesched.loadtest.report import text_summary
    from leasesched.loadtest.runner import LoadOptions, LoadTest

    delay_min, delay_max = _range(delay)
    pmin, pmax = _range(priorities, int)
    if not (0 <= pmin <= pmax <= 9):
        raise click.BadParameter("priorities must be within 0-9", param_hint="--priorities")
    opts = LoadOptions(
        schedule_rate=kw["schedule_rate"], poll_rate=kw["poll_rate"], duration_s=kw["duration"],
        delayed_fraction=kw["delayed_fraction"], delay_min_s=delay_min, delay_max_s=delay_max,
        payload_bytes=kw["payload_bytes"], handler_ms=kw["handler_ms"], priority_min=pmin, priority_max=pmax,
        idempotency_keys=kw["idempotency_keys"], schedule_batch=kw["schedule_batch"], timeout_s=kw["timeout"], max_inflight=kw["max_inflight"],
        channels=kw["channels"], drain_s=kw["drain"], probe_s=kw["probe_seconds"],
        probe_concurrency=kw["probe_concurrency"], profile=list(kw["profile"]), progress=not quiet,
        local=kw["local"], target=kw["target"], ledger=kw["ledger"], triggers=kw["triggers"],
        workers=kw["workers"], slots=kw["slots"], start_infra=kw["start_infra"], stop_infra=kw["stop_infra"],
        keep_data=kw["keep_data"], results_dir=kw["results_dir"], label=kw["label"],
        schedules=kw["schedules"], schedule_every_s=kw["schedule_every"], schedule_jitter_s=kw["schedule_jitter"],
        schedule_handler_ms=kw["schedule_handler_ms"], schedule_overlap=kw["schedule_overlap"],
        groups=kw["groups"], flood_share=kw["flood_share"], flood=kw["flood"],
        limit_per_key=kw["limit_per_key"], gate_rate=kw["gate_rate"], gate_burst=kw["gate_burst"],
    )  # fmt: skip
    try:
        GroupPlan.from_options(opts.groups, opts.flood_share, opts.flood)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--groups / --flood-share / --flood") from err
    try:
        FlowPlan.from_options(opts.limit_per_key, opts.gate_rate, opts.gate_burst, opts.groups, "check")
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--limit-per-key / --gate-rate / --gate-burst") from err
    report = LoadTest(opts, cfg).run()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(text_summary(report))
    sc = report.get("schedules") or {}
    limit = (report.get("flow") or {}).get("limit") or {}
    if (report["tasks"]["lost"] or report["tasks"]["overlaps"] or sc.get("missed") or sc.get("duplicates") or sc.get("overlaps")
            or limit.get("held") is False):  # fmt: skip
        sys.exit(2)  # correctness broken (a limit exceeded too): make the failure visible to scripts


def register(cli: click.Group) -> None:
    cli.add_command(loadtest)
