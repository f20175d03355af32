"""Log formatting, metric definitions, the RPC metrics interceptor and process exit codes, without servers."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Histogram

from leasesched.infra.process import ManagedProcess
from leasesched.observability import metrics
from leasesched.observability.logs import JsonFormatter, TextFormatter, bind, fields, log_context
from leasesched.server.metrics_interceptor import MetricsInterceptor


def record(msg: str = "task %s claimed", *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("services.task_updater", logging.INFO, __file__, 1, msg, args or ("t-1",), exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_line_carries_message_role_and_extra_fields() -> None:
    line = JsonFormatter(role="task-updater").format(record(**fields(task_id="t-1", lease_token=7, worker="w", shard=None)))
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "task t-1 claimed" and out["level"] == "INFO" and out["logger"] == "services.task_updater"
    assert out["role"] == "task-updater" and out["ts"].endswith("Z")
    assert (out["task_id"], out["lease_token"], out["worker"]) == ("t-1", 7, "w")
    assert "shard" not in out  # None fields are left out


def test_json_line_with_a_traceback_stays_one_line() -> None:
    line = JsonFormatter().format(record(exc=True))
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_context_fields_apply_inside_the_context_only_and_extra_wins() -> None:
    formatter = JsonFormatter()
    with log_context(shard=3, worker="w1"):
        inside = json.loads(formatter.format(record(worker="w2")))
    after = json.loads(formatter.format(record()))
    assert inside["shard"] == 3 and inside["worker"] == "w2"
    assert "shard" not in after and "worker" not in after


def test_odd_values_become_strings() -> None:
    out = json.loads(JsonFormatter().format(record(task_id=object(), shards=[1, 2])))
    assert isinstance(out["task_id"], str) and out["shards"] == [1, 2]


def test_text_format_appends_the_fields() -> None:
    line = TextFormatter().format(record(task_id="t-1", lease_token=7))
    assert line.endswith("INFO services.task_updater task t-1 claimed [task_id=t-1 lease_token=7]")


async def test_bind_in_an_asyncio_task_stays_in_that_task() -> None:
    import asyncio

    async def execution() -> dict[str, object]:
        bind(task_id="t-9")
        return json.loads(JsonFormatter().format(record()))

    assert (await asyncio.create_task(execution()))["task_id"] == "t-9"
    assert "task_id" not in json.loads(JsonFormatter().format(record()))


def test_type_labels_are_capped() -> None:
    labels = metrics._TypeLabels(2)
    assert [labels("a"), labels("b"), labels("c"), labels("a")] == ["a", "b", "other", "a"]


@pytest.mark.parametrize("role", metrics.ROLES)
def test_each_role_registers_its_metrics(role: str) -> None:
    registry = CollectorRegistry()
    metrics.register(role, registry)
    names = {m.name for m in registry.collect()}
    expected = {
        "task-service": {"leasesched_tasks_scheduled", "leasesched_rpc_duration_seconds"},
        "task-updater": {"leasesched_tasks_claimed", "leasesched_tasks_completed", "leasesched_dispatch_lag_seconds"},
        "trigger": {"leasesched_tasks_dispatched", "leasesched_lease_expirations", "leasesched_shards_owned"},
        "worker": {"leasesched_worker_slots_busy", "leasesched_worker_executions"},
    }[role]
    assert expected <= names
    assert metrics.serve(role, 0, registry=registry) == 0  # port 0: off


class _Health(health.aio.HealthServicer):
    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no")
        if request.service == "raise":
            raise RuntimeError("bug")
        if request.service == "set":
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_interceptor_records_latency_by_method_and_code() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("rpc_seconds", "test", ["method", "code"], registry=registry)
    server = grpc.aio.server(interceptors=[MetricsInterceptor(histogram)])
    health_pb2_grpc.add_HealthServicer_to_server(_Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ["", "", "abort", "raise", "set"]:
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(service=service))
                except grpc.aio.AioRpcError:
                    pass
            # An unknown method creates no series.
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/no.Such/Method")(b"")
    finally:
        await server.stop(0)
    method = "/grpc.health.v1.Health/Check"

    def count(code: str) -> float | None:
        return registry.get_sample_value("rpc_seconds_count", {"method": method, "code": code})

    assert (count("OK"), count("NOT_FOUND"), count("UNKNOWN"), count("INVALID_ARGUMENT")) == (2, 1, 1, 1)
    methods = {s.labels["method"] for m in registry.collect() for s in m.samples}
    assert methods == {method}


def test_managed_process_reports_its_exit_code(tmp_path: Path) -> None:
    def managed(name: str, script: str) -> ManagedProcess:
        return ManagedProcess(name, tmp_path / f"{name}.pid", tmp_path / f"{name}.log", argv=["sh", "-c", script])

    done = managed("done", "exit 3")
    done.start()
    deadline = time.monotonic() + 10
    while done.is_running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert done.exit_code() == 3
    ready = tmp_path / "trap-installed"
    graceful = managed("graceful", f"trap 'exit 0' TERM; touch {ready}; while true; do sleep 0.05; done")
    graceful.start()
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists() and graceful.exit_code() is None
    graceful.stop(10)
    assert graceful.exit_code() == 0
    killed = managed("killed", "sleep 30")
    killed.start()
    killed.stop(10)
    assert killed.exit_code() == -15  # died of the SIGTERM: not a clean exit


def test_json_timestamp_follows_each_record_across_seconds() -> None:
    """The formatted second is cached; a record of another second must not reuse it."""
    formatter = JsonFormatter()
    stamps = []
    for created in (1_700_000_000.123, 1_700_000_000.999, 1_700_000_001.004, 1_699_999_999.5):
        rec = record()
        rec.created = created
        stamps.append(json.loads(formatter.format(rec))["ts"])
    assert stamps == ["2023-11-14T22:13:20.123Z", "2023-11-14T22:13:20.999Z", "2023-11-14T22:13:21.004Z",
                      "2023-11-14T22:13:19.500Z"]  # fmt: skip


def test_json_pid_without_the_per_record_lookup() -> None:
    """``setup`` turns off logging's per-record getpid; the line still names this process."""
    import os

    rec = record()
    rec.process = None
    assert json.loads(JsonFormatter().format(rec))["pid"] == os.getpid()
