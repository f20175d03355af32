"""``local up``'s demo waits with the harness's waits, and says so when they fail.

The demo used to sleep 3 s and hope the triggers had divided the shards and
the workers had subscribed; it now waits for exactly that, with a deadline,
and a cluster that is not ready by then gets one clear line instead of a
demo task that sits SCHEDULED.
"""

from __future__ import annotations

import pytest

from leasesched.cli import local_cmd
from leasesched.config import Config
from leasesched.testing import NotReady, ProcessError


def test_the_demo_says_clearly_when_the_cluster_is_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(local_cmd, "wait_serving", lambda target, cfg, timeout: 0.1)

    def not_ready(cfg: Config, triggers: int, workers: int, timeout: float) -> None:
        seen.update(triggers=triggers, workers=workers, timeout=timeout)
        raise NotReady("timed out after 60 s waiting for the cluster to be ready; last seen: 60/64 shards")

    monkeypatch.setattr(local_cmd, "wait_ready", not_ready)
    monkeypatch.setattr(local_cmd, "sync_channel", lambda *a, **k: pytest.fail("no demo task when not ready"))
    said: list[str] = []
    local_cmd._demo(Config(), said.append, triggers=3, workers=1)
    assert seen == {"triggers": 3, "workers": 1, "timeout": local_cmd.READY_TIMEOUT_S}
    assert len(said) == 1 and "not ready within 60 s" in said[0] and "60/64 shards" in said[0], said


def test_the_demo_says_so_when_the_task_service_does_not_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(target: str, cfg: Config, timeout: float) -> float:
        raise ProcessError(f"{target} not SERVING within {timeout:.0f} s")

    monkeypatch.setattr(local_cmd, "wait_serving", never)
    monkeypatch.setattr(local_cmd, "wait_ready", lambda *a: pytest.fail("no readiness wait without a TaskService"))
    said: list[str] = []
    local_cmd._demo(Config(), said.append)
    assert said == ["demo: TaskService did not come up; see the output above"]
