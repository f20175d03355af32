"""Waiting on a condition inside an async unit test: the code under test runs
on the same loop, so the wait must yield to it (``tests.cluster.wait_for`` is
the blocking twin for tests that watch other processes)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
