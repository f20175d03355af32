"""TLS end to end: a throw-away CA and certificates, every process serving and
calling over TLS, a task running through the whole system; plaintext and
certificate-less clients are refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from leasesched.config import Config
from leasesched.transport import sync_channel
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from tests.processes import SessionGroup
from tests.tls_certs import make_certs


def tls_overrides(folder: Path, mutual: bool = False) -> dict[str, object]:
    certs = make_certs(folder)
    overrides: dict[str, object] = {
        "tls_cert": str(certs.server_cert),
        "tls_key": str(certs.server_key),
        "tls_ca": str(certs.ca),
    }
    if mutual:
        overrides |= {
            "tls_client_cert": str(certs.client_cert),
            "tls_client_key": str(certs.client_key),
            "tls_require_client_cert": 1,
        }
    return overrides


def test_whole_system_over_tls(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(overrides=tls_overrides(tmp_path / "certs"), triggers=1, workers=1, slots=2)
    task_id = cluster.schedule(seconds=0.05)
    views = cluster.wait_terminal([task_id], 30)
    assert views[task_id].status == pb.SUCCEEDED  # claimed, heartbeat and completed over TLS
    assert cluster.task_service and cluster.task_service.target
    with grpc.insecure_channel(cluster.task_service.target) as plain:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.TaskServiceStub(plain).PollTask(pb.PollTaskRequest(task_id=task_id), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(module_config: Config, tmp_path: Path) -> None:
    cfg = module_config.with_overrides(**tls_overrides(tmp_path / "certs", mutual=True))
    group = SessionGroup(log_dir=tmp_path / "logs")
    try:
        service = group.start_serving("task-service", cfg)
        assert service.target
        request = pb.ListTasksRequest(namespace="default")
        with sync_channel(service.target, cfg) as channel:
            pb_grpc.TaskServiceStub(channel).ListTasks(request, timeout=10)
        without_cert = cfg.with_overrides(tls_client_cert="", tls_client_key="")
        with sync_channel(service.target, without_cert) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.TaskServiceStub(channel).ListTasks(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        group.stop_all()
