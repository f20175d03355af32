"""The dashboard app (services/dashboard) against a fake of its API seam: login
and sessions, CSRF on every POST, role separation, payload visibility, the
overview's arithmetic. The real API and a real browser: tests/browser/."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

import grpc
import pytest
from fastapi.testclient import TestClient

from leasesched.client import FailedPreconditionError, GateView, HistoryLine, PermissionDeniedError, LimitInfo, NotFoundError, Progress, ScheduleView, TaskStatus, TaskView
from leasesched.history import HistoryKind
from services.dashboard import overview
from services.dashboard.api import Action, ClusterView, Count, Identity, LoginRefused, Role, StoreProbe, TaskPage, TriggerInfo, cluster_view
from services.dashboard.app import DashboardConfig, create_app

NOW = dt.datetime.now(dt.timezone.utc)
TOKENS = {"tok-client": Role.CLIENT, "tok-operator": Role.OPERATOR, "tok-admin": Role.ADMIN}


def view(task_id: str, status: TaskStatus = TaskStatus.FAILED, **kw: object) -> TaskView:
    base: dict[str, object] = dict(
        task_id=task_id, namespace="default", type="demo.sleep", status=status, attempt=1, max_attempts=1, priority=0,
        progress=Progress(40.0, "step 4"), result=b"", error="boom", error_type="RuntimeError", cancel_requested=False,
        created_at=NOW - dt.timedelta(minutes=5), run_at=NOW - dt.timedelta(minutes=4), started_at=NOW - dt.timedelta(minutes=3),
        finished_at=NOW - dt.timedelta(minutes=2), lease_owner="w1", lease_expires_at=None, lease_token=1,
    )  # fmt: skip
    base.update(kw)
    return TaskView(**base)  # type: ignore[arg-type]


@dataclass
class FakeApi:
    token: str
    namespace: str
    tasks: list[TaskView] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    acted: list[tuple[Action, str, str, str]] = field(default_factory=list)
    closed: bool = False

    def identify(self) -> Identity:
        if self.token not in TOKENS:
            raise LoginRefused("UNAUTHENTICATED: unknown or revoked token")
        return Identity(self.namespace, TOKENS[self.token])

    def list_page(
        self, status: TaskStatus | None, page_size: int, page_token: str = "", type: str = "", since: dt.datetime | None = None
    ) -> TaskPage:
        chosen = [
            t for t in self.tasks
            if (status is None or t.status is status) and (not type or t.type == type)
            and (since is None or (t.created_at is not None and t.created_at >= since))
        ]  # fmt: skip
        start = int(page_token or 0)
        rest = chosen[start + page_size :]
        return TaskPage(chosen[start : start + page_size], str(start + page_size) if rest else "")

    def count(self, status: TaskStatus) -> Count:
        if self.namespace == "no-counts":  # a role the API would not let count
            raise PermissionDeniedError(grpc.StatusCode.PERMISSION_DENIED, "an operator token may not call CountTasks")
        return Count(sum(1 for t in self.tasks if t.status is status), False)

    def poll(self, task_id: str, include_payload: bool = False) -> TaskView:
        for t in self.tasks:
            if t.task_id == task_id:
                return t
        raise NotFoundError(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")

    def history(self, task_id: str) -> list[HistoryLine]:
        return [HistoryLine(HistoryKind.ATTEMPT, NOW, attempt=1, lease_token=1, worker_id="w1", error_type="RuntimeError", error="boom")]

    def cancel(self, task_id: str) -> TaskView:
        self.cancelled.append(task_id)
        return self.poll(task_id)

    def act(self, action: Action, task_id: str, expected_version: str, reason: str) -> TaskView:
        if expected_version == "stale":
            raise FailedPreconditionError(grpc.StatusCode.FAILED_PRECONDITION, f"task {task_id} changed")
        self.acted.append((action, task_id, expected_version, reason))
        return self.poll(task_id)

    def schedules(self) -> list[ScheduleView]:
        return []

    def describe_schedule(self, schedule_id: str) -> ScheduleView:
        raise NotFoundError(grpc.StatusCode.NOT_FOUND, "no such schedule")

    def limits(self) -> list[LimitInfo]:
        return []

    def gates(self) -> list[GateView]:
        return []

    def store_probe(self) -> StoreProbe:
        return StoreProbe("SERVING", True, 3.0)

    def close(self) -> None:
        self.closed = True


class FakeCluster:
    def read(self) -> ClusterView:
        return ClusterView(4, [TriggerInfo("t1:1", [0, 1, 2, 3], ["w1"])], [], {"task-service": ["ts:1"]})


@pytest.fixture
def world() -> tuple[TestClient, list[FakeApi]]:
    made: list[FakeApi] = []
    tasks = [
        view("t-failed", payload=b"secret-payload"),
        view("t-running", TaskStatus.RUNNING, finished_at=None),
        view("t-ok", TaskStatus.SUCCEEDED, result=b"fine"),
    ]

    def factory(token: str, namespace: str) -> FakeApi:
        api = FakeApi(token, namespace, list(tasks))
        made.append(api)
        return api

    app = create_app(DashboardConfig(target="unused:1", session_secret="test"), factory, FakeCluster())
    return TestClient(app), made


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def login(client: TestClient, token: str) -> str:
    page = client.get("/login")
    reply = client.post("/login", data={"token": token, "namespace": "default", "csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert reply.status_code == 303, reply.text
    return csrf_of(client.get("/").text)


def test_pages_need_a_login_and_htmx_is_sent_to_it(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, _ = world
    reply = client.get("/tasks", follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"].startswith("/login")
    partial = client.get("/overview/live", headers={"HX-Request": "true"}, follow_redirects=False)
    assert partial.headers["HX-Redirect"].startswith("/login")


def test_a_bad_token_is_refused_and_the_token_never_reaches_the_browser(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, made = world
    page = client.get("/login")
    bad = client.post("/login", data={"token": "nope", "csrf_token": csrf_of(page.text)})
    assert bad.status_code == 401 and "cannot open the dashboard" in bad.text and made[-1].closed
    login(client, "tok-admin")
    assert all("tok-admin" not in c for c in client.cookies.values())
    assert "tok-admin" not in client.get("/").text


def test_every_post_needs_the_sessions_csrf_token(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, made = world
    client.get("/login")
    assert client.post("/login", data={"token": "tok-admin"}).status_code == 403  # login too
    csrf = login(client, "tok-admin")
    assert client.post("/tasks/t-running/cancel", follow_redirects=False).status_code == 403
    assert client.post("/tasks/t-running/cancel", data={"csrf_token": "forged"}, follow_redirects=False).status_code == 403
    assert client.post("/tasks/t-running/cancel", headers={"X-CSRF-Token": "forged"}, follow_redirects=False).status_code == 403
    assert made[-1].cancelled == []
    ok = client.post("/tasks/t-running/cancel", data={"csrf_token": csrf}, follow_redirects=False)
    assert ok.status_code == 303 and made[-1].cancelled == ["t-running"]
    ok = client.post("/tasks/t-running/cancel", headers={"X-CSRF-Token": csrf}, follow_redirects=False)
    assert ok.status_code == 303


def test_a_client_token_is_read_only_and_an_admin_can_act(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, made = world
    csrf = login(client, "tok-client")
    page = client.get("/tasks/t-running")
    assert "read-only" in page.text and "action-cancel" not in page.text
    refused = client.post("/tasks/t-running/cancel", data={"csrf_token": csrf}, follow_redirects=False)
    assert refused.status_code == 403 and made[-1].cancelled == []
    assert client.get("/cluster").status_code == 403
    client.post("/logout", data={"csrf_token": csrf})
    login(client, "tok-admin")
    assert "action-cancel" in client.get("/tasks/t-running").text
    assert "t1:1" in client.get("/cluster").text


def test_payloads_are_shown_to_client_and_admin_only(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, _ = world
    login(client, "tok-client")
    assert "secret-payload" in client.get("/tasks/t-failed").text
    csrf = csrf_of(client.get("/").text)
    client.post("/logout", data={"csrf_token": csrf})
    login(client, "tok-operator")
    page = client.get("/tasks/t-failed").text
    assert "secret-payload" not in page and "may not read task payloads" in page
    assert "action-cancel" not in page  # terminal: nothing to cancel


def test_logout_ends_the_session_server_side(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, made = world
    csrf = login(client, "tok-admin")
    cookie = dict(client.cookies)
    client.post("/logout", data={"csrf_token": csrf})
    assert made[-1].closed
    client.cookies.clear()
    client.cookies.update(cookie)  # the old cookie, replayed
    assert client.get("/", follow_redirects=False).status_code == 303


def test_lists_filter_and_page(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, _ = world
    login(client, "tok-client")
    failed = client.get("/failed").text
    assert "t-failed" in failed and "t-ok" not in failed
    assert "t-running" in client.get("/running").text
    assert "t-ok" not in client.get("/tasks?type=nothing-like-it").text
    assert "t-ok" in client.get("/tasks?status=SUCCEEDED&type=&since_minutes=").text  # the form's empty fields
    assert "t-ok" not in client.get("/tasks?since_minutes=1").text  # created 5 min ago
    assert client.get("/tasks/nope").status_code == 404
    overview_page = client.get("/").text
    assert 'data-status="FAILED"' in overview_page


def test_login_redirect_stays_on_this_site(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, _ = world
    page = client.get("/login")
    data = {"token": "tok-admin", "csrf_token": csrf_of(page.text), "next": "//evil.example/x"}
    assert client.post("/login", data=data, follow_redirects=False).headers["location"] == "/"


def test_series_and_oldest_waiting() -> None:
    done = view("a", TaskStatus.SUCCEEDED, run_at=NOW - dt.timedelta(seconds=70), started_at=NOW - dt.timedelta(seconds=65),
                finished_at=NOW - dt.timedelta(seconds=30))  # fmt: skip
    old = view("b", TaskStatus.SUCCEEDED, started_at=NOW - dt.timedelta(hours=2), finished_at=NOW - dt.timedelta(hours=2))
    s = overview.series([done, old], NOW, buckets=5, bucket_s=60)
    assert sum(b.finished for b in s.buckets) == 1 and s.max_lag_s == pytest.approx(5.0)
    waiting = [view("w1", TaskStatus.SCHEDULED, run_at=NOW - dt.timedelta(seconds=9)), view("w2", TaskStatus.SCHEDULED, run_at=NOW + dt.timedelta(seconds=9))]
    found = overview.oldest_waiting(waiting, NOW)
    assert found.task is not None and found.task.task_id == "w1" and found.waited_s == pytest.approx(9.0)
    assert overview.oldest_waiting(waiting[1:], NOW).task is None


def test_cluster_view_of_registrations() -> None:
    roles = {"trigger": {"t1": {"shards": [0, 2], "workers": ["w"]}}, "worker": {"w": {"namespace": "n", "types": ["x"], "busy": 1, "slots": 2, "leases": [["id", 3]]}}}
    found = cluster_view(4, roles)  # type: ignore[arg-type]
    assert found.shards_without_owner == [1, 3] and found.workers[0].leases == [("id", 3)]


def test_operator_actions_are_offered_by_state_and_refused_to_clients(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, made = world
    csrf = login(client, "tok-operator")
    failed_page = client.get("/tasks/t-failed").text
    assert 'data-kind="ATTEMPT"' in failed_page and "attempt 1 (lease 1)" in failed_page
    assert "action-retry" in failed_page and "action-terminate" not in failed_page
    running_page = client.get("/tasks/t-running").text
    assert "action-terminate" in running_page and "action-retry" not in running_page
    assert "action-cancel" not in running_page  # the API lets only clients and admins cancel
    data = {"csrf_token": csrf, "action": "retry", "expected_version": "v7", "reason": "fixed the bug"}
    assert client.post("/tasks/t-failed/act", data=data, follow_redirects=False).status_code == 303
    assert made[-1].acted == [(Action.RETRY, "t-failed", "v7", "fixed the bug")]
    stale = client.post("/tasks/t-failed/act", data={**data, "expected_version": "stale"}, follow_redirects=False)
    assert stale.status_code == 502 and "changed" in stale.text
    assert client.post("/tasks/t-failed/act", data={**data, "action": "explode"}).status_code == 400
    client.post("/logout", data={"csrf_token": csrf})
    csrf = login(client, "tok-client")
    assert "action-retry" not in client.get("/tasks/t-failed").text
    assert 'name="pick"' not in client.get("/failed").text
    assert client.post("/tasks/t-failed/act", data={**data, "csrf_token": csrf}, follow_redirects=False).status_code == 403
    assert client.post("/bulk", data={"csrf_token": csrf, "action": "retry", "pick": ["t-failed|v1"]}).status_code == 403
    assert made[-1].acted == []


def test_bulk_retry_acts_on_each_ticked_task_with_its_version(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, made = world
    csrf = login(client, "tok-admin")
    assert 'name="pick" value="t-failed|' in client.get("/failed").text
    reply = client.post("/bulk", data={"csrf_token": csrf, "action": "retry", "pick": ["t-failed|v1", "t-ok|stale"], "reason": ""})
    assert reply.status_code == 200
    assert made[-1].acted == [(Action.RETRY, "t-failed", "v1", "from the dashboard")]
    assert re.search(r'id="bulk-done">1<', reply.text) and re.search(r'id="bulk-refused">1<', reply.text)
    assert client.post("/bulk", data={"action": "retry", "pick": ["t-failed|v1"]}).status_code == 403  # no CSRF token


def test_an_overview_without_counts_when_the_api_refuses_them(world: tuple[TestClient, list[FakeApi]]) -> None:
    client, _ = world
    page = client.get("/login")
    client.post("/login", data={"token": "tok-operator", "namespace": "no-counts", "csrf_token": csrf_of(page.text)})
    page = client.get("/")
    assert page.status_code == 200 and 'id="no-counts"' in page.text
