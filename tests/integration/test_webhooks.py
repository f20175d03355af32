"""Webhook tasks end to end (issue 15, the webhook part): real Cassandra,
ZooKeeper, TaskService, TaskUpdater, a trigger and a worker started with
``--webhook``, delivering to a local receiver (pytest-httpserver; loopback
allowed with ``--webhook-allow``).

* a receiver that answers 503 once, then 200: SUCCEEDED on attempt 2, both
  deliveries signed (verified with the Standard Webhooks library), the same
  ``webhook-id`` (the task id) both times;
* a 400: FAILED after one attempt, no retry;
* a 429 with ``Retry-After: 2``: the second delivery arrives at least 2 s
  after the first, although the task's backoff is 0.2 s.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration
from pytest_httpserver import HTTPServer
from standardwebhooks import Webhook
from werkzeug import Request, Response

from leasesched.v1 import scheduler_pb2 as pb
from tests.cluster import NAMESPACE, LiveCluster

SECRET = "whsec_" + base64.b64encode(b"integration-webhook-key-0123456789").decode()


@dataclass
class Delivery:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """Answers each path from its script (the last answer repeats) and records
    every delivery when it arrives, before answering."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()

    def script(self, path: str, *answers: Response) -> str:
        remaining = list(answers)

        def answer(request: Request) -> Response:
            with self._lock:
                self.deliveries.append(Delivery(time.time(), request.path, {k.lower(): v for k, v in request.headers.items()}, request.get_data()))
                return remaining.pop(0) if len(remaining) > 1 else remaining[0]

        self.server.expect_request(path, method="POST").respond_with_handler(answer)
        return self.server.url_for(path)

    def at(self, path: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = HTTPServer(host="127.0.0.1", threaded=True)
    server.start()
    try:
        yield Receiver(server)
    finally:
        server.clear()
        server.stop()


def schedule_webhook(cluster: LiveCluster, url: str, data: object) -> str:
    payload = {"url": url, "event_type": "test.event", "data": data}
    spec = pb.TaskSpec(namespace=NAMESPACE, type="webhook", payload=json.dumps(payload).encode())
    spec.retry_policy.maximum_attempts = 3
    spec.retry_policy.initial_interval.CopyFrom(Duration(nanos=200_000_000))  # 0.2 s: shorter than any Retry-After here
    spec.lease_duration.FromSeconds(10)
    request = pb.ScheduleTaskRequest(task=spec, idempotency_key=uuid.uuid4().hex)
    return str(cluster.stub.ScheduleTask(request, timeout=10).task_id)


def verified(delivery: Delivery) -> dict[str, object]:
    event = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert isinstance(event, dict)
    return event


def test_webhook_tasks_retry_honour_retry_after_and_sign_every_delivery(
    make_cluster, receiver: Receiver, tmp_path: Path
) -> None:
    cluster: LiveCluster = make_cluster(triggers=1, workers=0)
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    cluster.worker_extra_args += ["--webhook", "--webhook-secret-file", str(secret_file), "--webhook-allow", "127.0.0.1/32"]
    cluster.start_worker(slots=4)
    cluster.wait_ready()

    flaky = schedule_webhook(cluster, receiver.script("/flaky", Response("busy", 503), Response("ok", 200)), {"n": 1})
    bad = schedule_webhook(cluster, receiver.script("/bad", Response("no such field", 400)), {"n": 2})
    limited = schedule_webhook(
        cluster, receiver.script("/limited", Response("slow down", 429, headers={"Retry-After": "2"}), Response("ok", 200)),
        {"n": 3},
    )  # fmt: skip
    views = cluster.wait_terminal([flaky, bad, limited], timeout=60)

    # 503 once, then 200: the second attempt succeeds, signed, under the same webhook-id.
    assert views[flaky].status == pb.SUCCEEDED and views[flaky].attempt == 2, views[flaky]
    assert json.loads(views[flaky].result) == {"status": 200, "body": "ok"}
    first, second = receiver.at("/flaky")
    for delivery in (first, second):
        event = verified(delivery)
        assert event["type"] == "test.event" and event["data"] == {"n": 1}
        assert delivery.headers["webhook-id"] == flaky

    # 400: failed at once, delivered once.
    assert views[bad].status == pb.FAILED and views[bad].attempt == 1, views[bad]
    assert "HTTP 400" in views[bad].error and "no such field" in views[bad].error
    assert len(receiver.at("/bad")) == 1
    verified(receiver.at("/bad")[0])

    # 429 with Retry-After: 2: the retry waits 2 s, not the 0.2 s backoff.
    assert views[limited].status == pb.SUCCEEDED and views[limited].attempt == 2, views[limited]
    first, second = receiver.at("/limited")
    gap = second.at - first.at
    assert gap >= 2.0, f"the second delivery came {gap:.2f} s after the first, before Retry-After: 2"
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == limited
    print(f"429 Retry-After 2 s: second delivery {gap:.2f} s after the first")
