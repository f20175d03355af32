"""Serving the dashboard: uvicorn in this process, or in a thread (tests)."""

from __future__ import annotations

import threading
import time

import uvicorn

from services.dashboard.app import DashboardConfig, create_app


def uvicorn_server(config: DashboardConfig, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server of the dashboard app; ``run()`` it, ``should_exit = True`` stops it."""
    app = create_app(config)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"))


class ThreadedServer:
    """The dashboard served from a thread on a port of its own: the browser tests
    talk to a real HTTP server without a second process to manage."""

    def __init__(self, server: uvicorn.Server) -> None:
        self.server = server
        self._thread = threading.Thread(target=server.run, name="dashboard", daemon=True)

    def start(self, timeout: float = 15.0) -> "ThreadedServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dashboard did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
