"""Running a process's main coroutine on the configured asyncio event loop.

Every leasesched process is one asyncio loop carrying gRPC calls and
Cassandra answers; the loop's own overhead (scheduling callbacks, waking up
for I/O) showed up as 15–30 % of the services' CPU in profiles. uvloop (the
libuv-based loop) does that work in C. ``event_loop = "asyncio"`` runs the
standard loop instead (for debugging, or to compare).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from leasesched.config import Config

T = TypeVar("T")

LOOPS = ("uvloop", "asyncio")


def run(main: Coroutine[Any, Any, T], cfg: Config) -> T:
    if cfg.event_loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    if cfg.event_loop == "asyncio":
        return asyncio.run(main)
    main.close()
    raise ValueError(f"event_loop must be one of {', '.join(LOOPS)}, not {cfg.event_loop!r}")
