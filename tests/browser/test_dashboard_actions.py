"""The dashboard's operator actions in a real browser (headless Debian Chromium)
against a real cluster with auth on: an operator token retries a failed task
from its page and watches it succeed (its history shows the failed attempt,
the retry with its reason, and the attempt that succeeded), terminates a running task, and retries
two failed tasks at once from the failed list; a client token is offered none
of it (tests/browser/test_dashboard.py checks its refusals)."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, expect

from leasesched.auth import ROLES
from leasesched.v1 import scheduler_pb2 as pb
from tests.browser.conftest import Dashboard, screenshot_dir
from tests.browser.test_dashboard import TIMEOUT_MS, log_in
from tests.cluster import wait_for


@pytest.mark.skipif("operator" not in ROLES, reason="needs the operator role and OperatorService (the ops branch)")
def test_an_operator_retries_terminates_and_bulk_retries(dashboard: Dashboard, browser: Browser) -> None:
    cluster = dashboard.cluster
    # Each fails under its first lease only: the operator's retry (a new lease token) succeeds.
    failed = [cluster.schedule(seconds=0.1, max_attempts=1, fail_first_lease=True) for _ in range(3)]
    running_id = cluster.schedule(seconds=120, progress=True, lease_s=3.0)
    views = cluster.wait_terminal(failed, 60)
    assert all(v.status == pb.FAILED for v in views.values())
    wait_for(lambda: cluster.poll(running_id).status == pb.RUNNING, 30, "the long task to run")

    context = browser.new_context(viewport={"width": 1280, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, dashboard, "operator")

    # Retry one failed task from its page, and watch it succeed.
    page.goto(f"{dashboard.url}/tasks/{failed[0]}")
    expect(page.locator("#task-status")).to_have_text("FAILED")
    expect(page.locator("#payload")).to_contain_text("Hidden")  # an operator acts without reading the data
    page.fill("#task-actions form:has(#action-retry) input[name=reason]", "browser test: retry")
    page.click("#action-retry")
    expect(page.locator("#task-status")).to_have_text("SUCCEEDED", timeout=30_000)
    expect(page.locator("#task-result")).to_contain_text("done by")
    # Its history: the failed first attempt, the operator's retry with the reason, the attempt that succeeded.
    history = page.locator("#task-history")
    expect(history.locator('tr[data-kind="OPERATION"]')).to_contain_text("browser test: retry")
    expect(history.locator('tr[data-kind="ATTEMPT"]')).to_have_count(2)
    assert cluster.poll(failed[0]).status == pb.SUCCEEDED
    folder = screenshot_dir()
    if folder is not None:
        page.screenshot(path=str(folder / "task-retried.png"))

    # Terminate the running task.
    page.goto(f"{dashboard.url}/tasks/{running_id}")
    expect(page.locator("#task-status")).to_have_text("RUNNING")
    page.click("#action-terminate")
    expect(page.locator("#task-status")).to_have_text("FAILED", timeout=30_000)
    assert cluster.poll(running_id).status == pb.FAILED

    # Bulk: tick the two other failed tasks in the failed list, retry them together.
    page.goto(f"{dashboard.url}/failed")
    for task_id in failed[1:]:
        page.check(f'#failed tr[data-task-id="{task_id}"] input[name=pick]')
    page.click("#bulk-retry")
    expect(page.locator("#bulk-done")).to_have_text("2")
    expect(page.locator("#bulk-refused")).to_have_text("0")
    done = cluster.wait_terminal(failed[1:], 60)
    assert all(v.status == pb.SUCCEEDED for v in done.values())
    page.goto(f"{dashboard.url}/failed")
    for task_id in failed:
        expect(page.locator(f'#failed tr[data-task-id="{task_id}"]')).to_have_count(0)
    context.close()
