"""One gRPC service of the product served over real gRPC in this process, on
an event loop of its own thread: for tests of the CLI and the client, which
are blocking code and call it like a remote server (``build_server``: the
product's interceptors and error mapping)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Callable

from leasesched.config import Config
from leasesched.server.grpc_server import build_server


@contextlib.contextmanager
def served(add: Callable[[Any, Any], None], servicer: Any, name: str) -> Iterator[str]:
    """Serve ``servicer`` (added with ``add``, full service ``name``); yields its address."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        server = await build_server("127.0.0.1:0", [(add, servicer, name)], Config())
        await server.server.start()
        holder["server"], holder["port"] = server.server, server.port
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert ready.wait(10)
    try:
        yield f"127.0.0.1:{holder['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(holder["server"].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
