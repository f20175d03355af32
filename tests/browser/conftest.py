"""Fixtures for the dashboard's browser tests: Debian's Chromium driven by
Playwright (never a downloaded browser), and the dashboard served in a thread
against a real cluster (``make_cluster``, tests/conftest.py) with auth on.

Chromium comes from ``make deps`` (apt package ``chromium``); Playwright is
told its executable and ``PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1`` is set, so
nothing is fetched. Without the package the tests fail and say so: a skipped
browser test would let CI pass without ever opening the dashboard.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from leasesched.auth import ROLES
from leasesched.config import Config
from leasesched.store import schema
from leasesched.testing import free_ports
from tests.cluster import LiveCluster
from tests.integration.conftest import keyspace_for
from tests.tokens import issue_tokens

# Debian's package installs the real binary here; /usr/bin/chromium is a shell wrapper.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
NAMESPACE = "chaos"  # the namespace tests/cluster.py schedules into


def chromium_executable() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium")
    if found:
        return found
    pytest.fail("Debian's chromium is not installed (make deps installs it: apt-get install chromium)")


@pytest.fixture
def browser(dashboard: "Dashboard") -> Iterator[object]:
    """Started after the cluster (hence ``dashboard``): Playwright's sync API keeps an
    event loop running in this thread, where the harness's asyncio.run would then fail."""
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: tests run as root (CI does), where Chromium's sandbox refuses to start;
        # --disable-dev-shm-usage: a container's small /dev/shm must not crash its renderers.
        launched = playwright.chromium.launch(
            executable_path=chromium_executable(), headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Dashboard:
    url: str
    cluster: LiveCluster
    tokens: dict[str, str]  # role → plaintext token of namespace NAMESPACE


@pytest.fixture
def dashboard(make_cluster: Callable[..., LiveCluster], infra: object) -> Iterator[Dashboard]:
    """A real cluster with auth on, tokens of each role for its namespace, and
    the dashboard served by uvicorn in a thread on a free port."""
    from services.dashboard.app import DashboardConfig
    from services.dashboard.server import ThreadedServer, uvicorn_server

    base: Config = infra.config  # type: ignore[attr-defined]
    keyspace = keyspace_for("dashboard")
    schema.apply(base.with_overrides(keyspace=keyspace))  # the tokens must exist before the services start
    roles = [role for role in ("client", "operator", "admin") if role in ROLES]  # operator: from OperatorService on
    made = issue_tokens(base.with_overrides(keyspace=keyspace), [(NAMESPACE, role, role) for role in roles])
    tokens = {role: plaintext for role, (plaintext, _) in zip(roles, made)}
    cluster = make_cluster(overrides={"keyspace": keyspace, "auth": "on", "token": tokens["admin"]}, triggers=1, workers=1)
    assert cluster.task_service is not None and cluster.task_service.target
    (port,) = free_ports(1)
    config = DashboardConfig(target=cluster.task_service.target, cfg=cluster.cfg, default_namespace=NAMESPACE, session_secret="browser-tests")
    server = ThreadedServer(uvicorn_server(config, "127.0.0.1", port)).start()
    try:
        yield Dashboard(f"http://127.0.0.1:{port}", cluster, tokens)
    finally:
        server.stop()


def screenshot_dir() -> Path | None:
    """Where to save the README's screenshots (LEASESCHED_DASHBOARD_SCREENSHOTS), or None."""
    folder = os.environ.get("LEASESCHED_DASHBOARD_SCREENSHOTS")
    if not folder:
        return None
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path
