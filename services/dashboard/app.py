"""The web dashboard: a FastAPI app of server-rendered Jinja2 pages, with htmx
polling for the parts that change (overview, a task's progress, running tasks).

``create_app(config)`` builds one app; everything it keeps (sessions, the
template environment, the API factory) hangs off that app, nothing is global.
How it logs in, keeps tokens, protects forms and hides payloads is written
down in docs/dashboard.md; the code below points there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from leasesched.client import ClientError, PermissionDeniedError, TaskStatus, TaskView, UnauthenticatedError
from leasesched.config import Config
from services.dashboard import overview
from services.dashboard.api import (
    Action,
    ApiFactory,
    Count,
    ClusterReader,
    DashboardApi,
    LoginRefused,
    Role,
    ZooKeeperClusterReader,
    grpc_api_factory,
)
from services.dashboard.sessions import Session, SessionStore

HERE = Path(__file__).parent
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
# No inline script, no foreign origin, no framing (the action buttons must not be clickjacked).
CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"


@dataclass(frozen=True)
class DashboardConfig:
    """What one dashboard process needs. ``cfg`` gives TLS settings for the gRPC
    channels and ZooKeeper's address for the cluster page."""

    target: str  # TaskService host:port
    cfg: Config = field(default_factory=Config)
    session_secret: str = ""  # signs the cookie; "" = a random key per process (sessions end with it anyway)
    default_namespace: str = "default"
    https_only: bool = False  # cookies with Secure: set behind TLS
    page_size: int = 50
    sample_size: int = 500  # newest tasks the overview's series is computed from
    session_idle_s: float = 8 * 3600


class LoginRequired(Exception):
    pass


def _csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (before login too: the login form has one)."""
    token = request.session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


async def csrf_guard(request: Request) -> None:
    """Every unsafe request (all POSTs, login and logout included) must echo the
    session's CSRF token, in the form field or (htmx) the X-CSRF-Token header.
    The token lives in the signed session cookie, which another site can
    neither read nor forge: the synchronizer-token pattern (as Flask-WTF)."""
    if request.method in SAFE_METHODS:
        return
    expected = request.session.get("csrf")
    sent: object = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        sent = (await request.form()).get(CSRF_FIELD)
    if not isinstance(expected, str) or not expected or not isinstance(sent, str) or not secrets.compare_digest(expected, sent):
        raise HTTPException(status_code=403, detail="CSRF token missing or wrong: reload the page and try again")


def _ago(when: dt.datetime | None, now: dt.datetime | None = None) -> str:
    if when is None:
        return "-"
    seconds = ((now or dt.datetime.now(dt.timezone.utc)) - when).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    text = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
    return f"in {text}" if future else f"{text} ago"


def _stamp(when: dt.datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _bytes(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def create_app(
    config: DashboardConfig,
    api_factory: ApiFactory | None = None,
    cluster_reader: ClusterReader | None = None,
) -> FastAPI:
    """The dashboard app; ``api_factory`` and ``cluster_reader`` default to the real
    gRPC API and ZooKeeper registry (tests pass fakes)."""
    factory = api_factory or grpc_api_factory(config.target, config.cfg)
    reader = cluster_reader or ZooKeeperClusterReader(config.cfg)
    sessions = SessionStore(idle_s=config.session_idle_s)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(ago=_ago, stamp=_stamp, text=_bytes)
    templates.env.globals.update(TaskStatus=TaskStatus, Action=Action)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        sessions.close()  # each session's gRPC channel

    app = FastAPI(
        title="leasesched dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
        dependencies=[Depends(csrf_guard)],  # every route: a no-op for GET, the CSRF check for POST
    )  # fmt: skip
    app.add_middleware(
        SessionMiddleware,
        secret_key=config.session_secret or secrets.token_urlsafe(32),
        session_cookie="leasesched_dashboard",
        max_age=int(config.session_idle_s),
        same_site="lax",
        https_only=config.https_only,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.sessions = sessions

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.url.path != "/login" and not request.url.path.startswith("/static"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def current(request: Request) -> Session:
        session = sessions.get(request.session.get("sid"))
        if session is None:
            raise LoginRequired()
        return session

    def render(request: Request, name: str, session: Session | None, status_code: int = 200, **context: Any) -> HTMLResponse:
        role = session.identity.role if session else None
        context.update(
            session=session,
            role=role,
            may_act=bool(role and role.may_act),
            may_read_payloads=bool(role and role.may_read_payloads),
            csrf=_csrf_token(request),
            now=dt.datetime.now(dt.timezone.utc),
        )
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        target = "/login?next=" + quote(request.url.path)
        if request.headers.get("hx-request"):
            return Response(status_code=200, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    @app.exception_handler(ClientError)
    async def api_error(request: Request, exc: ClientError) -> Response:
        if isinstance(exc, UnauthenticatedError):  # revoked or expired meanwhile: log out
            sessions.end(request.session.pop("sid", None))
            return RedirectResponse("/login?expired=1", status_code=303)
        session = sessions.get(request.session.get("sid"))
        status = 403 if isinstance(exc, PermissionDeniedError) else 404 if exc.code.name == "NOT_FOUND" else 502
        return render(request, "error.html", session, status_code=status, code=exc.code.name, details=exc.details)

    # ------------------------------------------------------------ login

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/", expired: int = 0) -> HTMLResponse:
        message = "Your token is no longer accepted; log in again." if expired else ""
        return render(request, "login.html", None, next=_local(next), message=message, namespace=config.default_namespace)

    @app.post("/login", response_class=HTMLResponse)
    def login(
        request: Request, token: str = Form(...), namespace: str = Form(""), next: str = Form("/")
    ) -> Response:
        namespace = namespace.strip() or config.default_namespace
        api: DashboardApi = factory(token.strip(), namespace)
        try:
            identity = api.identify()
        except (LoginRefused, ValueError) as exc:
            api.close()
            message = f"This token cannot open the dashboard for namespace {namespace!r}: {exc}"
            return render(request, "login.html", None, 401, next=_local(next), message=message, namespace=namespace)
        sessions.end(request.session.get("sid"))
        session = sessions.create(identity, api)
        request.session.clear()  # a new CSRF token with the new session (no fixation)
        request.session["sid"] = session.sid
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout")
    def logout(request: Request) -> Response:
        sessions.end(request.session.get("sid"))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ------------------------------------------------------------ overview

    def overview_context(session: Session) -> dict[str, Any]:
        api = session.api
        now = dt.datetime.now(dt.timezone.utc)
        try:
            counts: dict[TaskStatus, Count] | None = {status: api.count(status) for status in TaskStatus}
        except PermissionDeniedError:  # a role the API does not let count (an operator, today)
            counts = None
        sample = api.list_page(None, config.sample_size).tasks
        scheduled = api.list_page(TaskStatus.SCHEDULED, WAITING_SCAN).tasks
        return {
            "counts": counts,
            "series": overview.series(sample, now),
            "waiting": overview.oldest_waiting(scheduled, now),
        }

    @app.get("/", response_class=HTMLResponse)
    def overview_page(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        return render(request, "overview.html", session, **overview_context(session))

    @app.get("/overview/live", response_class=HTMLResponse)
    def overview_live(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        return render(request, "_overview.html", session, **overview_context(session))

    # ------------------------------------------------------------ tasks

    @app.get("/tasks", response_class=HTMLResponse)
    def tasks_page(
        request: Request,
        status: str = "",
        type: str = "",
        since_minutes: str = "",  # a string: the form sends "" for "any"
        page_token: str = "",
        session: Session = Depends(current),
    ) -> HTMLResponse:
        chosen = TaskStatus(status) if status in TaskStatus.__members__ else None
        minutes = int(since_minutes) if since_minutes.strip().isdigit() else 0
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes) if minutes > 0 else None
        page = session.api.list_page(chosen, config.page_size, page_token, type.strip(), since)  # the server filters
        return render(
            request, "tasks.html", session, tasks=page.tasks, next_page_token=page.next_page_token,
            status=chosen.value if chosen else "", type_filter=type, since_minutes=minutes, first_page=not page_token,
        )  # fmt: skip

    @app.get("/tasks/{task_id}", response_class=HTMLResponse)
    def task_page(request: Request, task_id: str, session: Session = Depends(current)) -> HTMLResponse:
        api = session.api
        # The payload only on the page itself (not its live part), and only for a role that may read it:
        # the server refuses it to an operator (PollTaskRequest.include_payload).
        task = api.poll(task_id, include_payload=session.identity.role.may_read_payloads)
        return render(request, "task.html", session, task=task, history=api.history(task_id))

    @app.get("/tasks/{task_id}/live", response_class=HTMLResponse)
    def task_live(request: Request, task_id: str, session: Session = Depends(current)) -> HTMLResponse:
        api = session.api
        return render(request, "_task_live.html", session, task=api.poll(task_id), history=api.history(task_id))

    @app.post("/tasks/{task_id}/cancel")
    def cancel_task(request: Request, task_id: str, session: Session = Depends(current)) -> Response:
        require_action(session)
        session.api.cancel(task_id)
        return RedirectResponse(f"/tasks/{quote(task_id)}", status_code=303)

    @app.post("/tasks/{task_id}/act")
    def act_on_task(
        request: Request, task_id: str, action: str = Form(...), expected_version: str = Form(""),
        reason: str = Form(""), session: Session = Depends(current),
    ) -> Response:  # fmt: skip
        """One operator action on the version of the task the person saw; back to the task's page."""
        require_action(session)
        chosen = _action(action)
        session.api.act(chosen, task_id, expected_version, reason.strip() or DEFAULT_REASON)
        return RedirectResponse(f"/tasks/{quote(task_id)}", status_code=303)

    @app.post("/bulk")
    def bulk(
        request: Request, action: str = Form(...), pick: list[str] = Form(default_factory=list), reason: str = Form(""),
        session: Session = Depends(current),
    ) -> HTMLResponse:  # fmt: skip
        """The same action on every task ticked in a list (each ``task_id|version``), one
        call per task: each is checked against the version that list showed."""
        require_action(session)
        chosen = _action(action)
        done: list[str] = []
        refused: list[tuple[str, str]] = []
        for item in pick[:BULK_MAX]:
            task_id, _, version = item.partition("|")
            try:
                session.api.act(chosen, task_id, version, reason.strip() or DEFAULT_REASON)
                done.append(task_id)
            except ClientError as exc:
                if isinstance(exc, UnauthenticatedError):
                    raise
                refused.append((task_id, f"{exc.code.name}: {exc.details}"))
        return render(request, "bulk.html", session, action=chosen, done=done, refused=refused, skipped=max(0, len(pick) - BULK_MAX))

    def status_list(request: Request, session: Session, status: TaskStatus, template: str) -> HTMLResponse:
        page = session.api.list_page(status, 200)
        return render(request, template, session, tasks=page.tasks, more=bool(page.next_page_token))

    @app.get("/running", response_class=HTMLResponse)
    def running_page(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        return status_list(request, session, TaskStatus.RUNNING, "running.html")

    @app.get("/running/live", response_class=HTMLResponse)
    def running_live(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        return status_list(request, session, TaskStatus.RUNNING, "_running.html")

    @app.get("/failed", response_class=HTMLResponse)
    def failed_page(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        """FAILED tasks, and tasks failing now: SCHEDULED again after a failed attempt."""
        failed = session.api.list_page(TaskStatus.FAILED, 200)
        waiting = session.api.list_page(TaskStatus.SCHEDULED, 1000).tasks
        failing = [t for t in waiting if t.attempt > 1 or t.error]
        return render(request, "failed.html", session, tasks=failed.tasks, more=bool(failed.next_page_token), failing=failing)

    # ------------------------------------------------------------ schedules, limits, gates, cluster

    @app.get("/schedules", response_class=HTMLResponse)
    def schedules_page(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        return render(request, "schedules.html", session, schedules=session.api.schedules())

    @app.get("/schedules/{schedule_id}", response_class=HTMLResponse)
    def schedule_page(request: Request, schedule_id: str, session: Session = Depends(current)) -> HTMLResponse:
        return render(request, "schedule.html", session, schedule=session.api.describe_schedule(schedule_id))

    @app.get("/limits", response_class=HTMLResponse)
    def limits_page(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        return render(request, "limits.html", session, limits=session.api.limits())

    @app.get("/gates", response_class=HTMLResponse)
    def gates_page(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        return render(request, "gates.html", session, gates=session.api.gates())

    @app.get("/cluster", response_class=HTMLResponse)
    def cluster_page(request: Request, session: Session = Depends(current)) -> HTMLResponse:
        if not session.identity.role.sees_cluster:
            return render(
                request, "error.html", session, 403, code="PERMISSION_DENIED",
                details="The cluster page shows every namespace's workers and leases: it needs an admin token.",
            )  # fmt: skip
        return render(request, "cluster.html", session, cluster=reader.read(), store=session.api.store_probe())

    return app


DEFAULT_REASON = "from the dashboard"
WAITING_SCAN = 1000  # SCHEDULED tasks read to find the one waiting longest
BULK_MAX = 200  # tasks one bulk form acts on


def _action(value: str) -> Action:
    try:
        return Action(value)
    except ValueError:
        raise HTTPException(status_code=400, detail=f"unknown action {value!r}") from None


def require_action(session: Session) -> None:
    """Actions are refused for read-only roles here too, not only hidden in the page."""
    if not session.identity.role.may_act:
        raise HTTPException(status_code=403, detail=f"a {session.identity.role.value} token is read-only in the dashboard")


def _local(path: str) -> str:
    """Only same-site paths as a redirect target after login (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def task_row_class(task: TaskView) -> str:
    return task.status.value.lower()


__all__ = ["DashboardConfig", "create_app", "Role"]
