"""The dashboard in a real browser (headless Debian Chromium, Playwright)
against a real cluster with auth on: what a person sees and can do.

* a client token logs in, sees counts on the overview, finds a failed task in
  the failed list, reads its detail (error, attempts) and watches a running
  task's progress move (htmx polling PollTask), with no action anywhere;
  a POST without the session's CSRF token, or a forged one, is refused (403),
  and even with the right token a client's action is refused (403);
* an admin token sees the action buttons, cancels a running task from its
  page and watches it end, and sees the cluster page (shards, triggers, workers).

With LEASESCHED_DASHBOARD_SCREENSHOTS=docs/screenshots the main views are
saved there as PNGs (README).
"""

from __future__ import annotations

import re

from playwright.sync_api import Browser, Page, expect

from leasesched.v1 import scheduler_pb2 as pb
from tests.browser.conftest import NAMESPACE, Dashboard, screenshot_dir
from tests.cluster import wait_for

TIMEOUT_MS = 20_000


def log_in(page: Page, dashboard: Dashboard, role: str) -> None:
    page.goto(dashboard.url + "/")
    expect(page).to_have_url(re.compile(r"/login"))
    page.fill("input[name=token]", dashboard.tokens[role])
    page.fill("input[name=namespace]", NAMESPACE)
    page.click("button[type=submit]")
    expect(page.locator("#whoami")).to_contain_text(f"{NAMESPACE} · {role}", timeout=TIMEOUT_MS)


def shoot(page: Page, name: str) -> None:
    folder = screenshot_dir()
    if folder is not None:
        page.screenshot(path=str(folder / f"{name}.png"), full_page=False)


def test_read_only_views_and_refusals_then_an_admin_cancels(dashboard: Dashboard, browser: Browser) -> None:
    cluster = dashboard.cluster
    failed_id = cluster.schedule(seconds=0.1, max_attempts=1, fail=1)
    done_id = cluster.schedule(seconds=0.1)
    running_id = cluster.schedule(seconds=120, progress=True, lease_s=3.0)
    views = cluster.wait_terminal([failed_id, done_id], 60)
    assert views[failed_id].status == pb.FAILED and views[done_id].status == pb.SUCCEEDED
    wait_for(lambda: cluster.poll(running_id).progress.percent >= 2, 30, "the long task to report progress")

    context = browser.new_context(viewport={"width": 1280, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)

    # A wrong token is refused on the login page.
    page.goto(dashboard.url + "/login")
    page.fill("input[name=token]", "lsk_0123456789abcdef_not-the-secret")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("cannot open the dashboard")

    # Client: read-only.
    log_in(page, dashboard, "client")
    expect(page.locator("#whoami")).to_contain_text("read-only")
    for status in ("FAILED", "SUCCEEDED", "RUNNING"):
        expect(page.locator(f'.card[data-status="{status}"] .count')).to_have_text(re.compile(r"^[1-9]"))
    shoot(page, "overview")

    page.click("nav >> text=Failed")
    row = page.locator(f'tr[data-task-id="{failed_id}"]')
    expect(row).to_contain_text("planned failure on attempt 1")
    expect(page.locator(f'tr[data-task-id="{done_id}"]')).to_have_count(0)
    row.locator("a").click()
    expect(page.locator("#task-status")).to_have_text("FAILED")
    expect(page.locator("#task-attempt")).to_have_text("1 of 1")
    expect(page.locator("#task-error")).to_contain_text("RuntimeError: planned failure on attempt 1")
    expect(page.locator("#payload")).to_have_text('{"seconds": 0.1, "fail": 1}')  # a client may read it (PollTaskRequest.include_payload)
    expect(page.locator("#task-actions")).to_have_count(0)

    page.click("nav >> text=Tasks")
    expect(page.locator(f'tr[data-task-id="{done_id}"]')).to_contain_text("SUCCEEDED")
    page.select_option("select[name=status]", "RUNNING")
    page.click("form.filters button")
    expect(page.locator(f'tr[data-task-id="{running_id}"]')).to_be_visible()
    expect(page.locator(f'tr[data-task-id="{done_id}"]')).to_have_count(0)
    page.select_option("select[name=status]", "")
    page.click("form.filters button")
    shoot(page, "tasks")

    # Live progress: the running task's page updates itself (htmx polling PollTask).
    page.goto(f"{dashboard.url}/tasks/{running_id}")
    expect(page.locator("#task-status")).to_have_text("RUNNING")
    expect(page.locator("#task-worker")).not_to_be_empty()
    first = page.locator("#task-progress-text").inner_text()
    expect(page.locator("#task-progress-text")).not_to_have_text(first, timeout=TIMEOUT_MS)
    expect(page.locator("#action-cancel")).to_have_count(0)
    shoot(page, "task")

    page.click("nav >> text=Running")
    expect(page.locator(f'#running tr[data-task-id="{running_id}"]')).to_be_visible()
    expect(page.locator("nav >> text=Cluster")).to_have_count(0)  # admins only

    # Refusals: no CSRF token, a forged one (both 403, the cookie notwithstanding); a client with the right one: 403.
    cancel_url = f"{dashboard.url}/tasks/{running_id}/cancel"
    assert page.request.post(cancel_url, max_redirects=0).status == 403
    assert page.request.post(cancel_url, form={"csrf_token": "forged"}, max_redirects=0).status == 403
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
    assert csrf
    refused = page.request.post(cancel_url, form={"csrf_token": csrf}, max_redirects=0)
    assert refused.status == 403 and "read-only" in refused.text()
    assert cluster.poll(running_id).status == pb.RUNNING and not cluster.poll(running_id).cancel_requested

    page.click("text=Log out")
    expect(page).to_have_url(re.compile(r"/login"))

    # Admin: the actions and the cluster page.
    log_in(page, dashboard, "admin")
    expect(page.locator("#whoami")).not_to_contain_text("read-only")
    page.click("nav >> text=Cluster")
    expect(page.locator("#health")).to_have_text("SERVING")
    expect(page.locator("#store")).to_contain_text("answered in")
    expect(page.locator("#unowned")).to_have_text("Every shard has an owner.")
    expect(page.locator("#triggers tbody tr")).to_have_count(1)
    expect(page.locator("#workers tbody tr")).to_have_count(1)
    shoot(page, "cluster")

    page.goto(f"{dashboard.url}/tasks/{running_id}")
    page.click("#action-cancel")
    expect(page.locator("#task-status")).to_have_text("CANCELLED", timeout=30_000)
    assert cluster.poll(running_id).status == pb.CANCELLED
    context.close()
