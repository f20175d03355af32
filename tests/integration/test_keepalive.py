"""Keepalive pings and the servers' ping policy agree (issue 11).

Workers logged ERROR ``GOAWAY ... ENHANCE_YOUR_CALM ... too_many_pings`` every
few minutes and re-subscribed: clients pinged every 20 s, servers accepted a
ping without data only every 5 minutes. Here a server made by
``leasesched.server.grpc_server.build_server`` and a worker's Subscribe stream on a channel
made by ``leasesched.transport`` — the project's own option lists, with the
interval shortened through the same setting (``grpc_keepalive_s``) — run for
several pings. gRPC's own keepalive trace (stderr of a child process) shows
the pings the server received; there must be no GOAWAY, no ping strike, and
the one stream must stay open throughout. No Cassandra or ZooKeeper needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
KEEPALIVE_S = 1.0  # gRPC pings at most once a second whatever is asked
PINGS = 5


async def _scenario(keepalive_s: float, pings: int) -> dict[str, object]:
    from leasesched.server.grpc_server import build_server
    from trigger.dispatcher import Dispatcher
    from trigger.service import TriggerService
    from worker.subscriptions import TriggerLink

    cfg = Config(auth="off", grpc_keepalive_s=keepalive_s)

    async def never(ready: object) -> bool:
        return False

    service = TriggerService(Dispatcher(5.0, never), lambda hint: None)
    server = await build_server(
        "127.0.0.1:0", [(pb_grpc.add_TriggerServiceServicer_to_server, service, "leasesched.v1.TriggerService")], cfg
    )
    await server.server.start()
    accepted: list[float] = []
    dropped: list[float] = []

    async def no_dispatch(dispatch: pb.Dispatch, link: TriggerLink) -> None:
        pass

    hello = lambda: pb.Hello(worker_id="keepalive", namespace="default", task_types=["k.a"], capacity=1)  # noqa: E731
    link = TriggerLink(
        f"127.0.0.1:{server.port}", cfg, hello, no_dispatch, on_accepted=lambda _: accepted.append(time.monotonic()), namespace="default"
    )
    link.start()
    try:
        deadline = time.monotonic() + 10
        while not link.connected:
            assert time.monotonic() < deadline, "the stream was never accepted"
            await asyncio.sleep(0.02)
        # Long enough for `pings` keepalive pings (and strikes enough for a GOAWAY under the old policy).
        until = time.monotonic() + keepalive_s * (pings + 1.5)
        while time.monotonic() < until:
            if not link.connected:
                dropped.append(time.monotonic())
            await asyncio.sleep(0.02)
    finally:
        await link.stop()
        await server.server.stop(0)
    return {"accepted": len(accepted), "dropped": len(dropped)}


def main() -> None:
    print(json.dumps(asyncio.run(_scenario(float(sys.argv[1]), int(sys.argv[2])))))


def test_keepalive_pings_are_accepted_and_the_stream_stays_open() -> None:
    env = {**os.environ, "GRPC_TRACE": "http_keepalive", "GRPC_VERBOSITY": "debug", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", "from tests.integration.test_keepalive import main; main()", str(KEEPALIVE_S), str(PINGS)]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    received = re.findall(r"SERVER\[[^\]]*\]: received ping \d+: .*ping_strikes=(\d+)", done.stderr)
    assert len(received) >= PINGS - 1, f"only {len(received)} keepalive pings reached the server:\n{done.stderr[-3000:]}"
    assert "too_many_pings" not in done.stderr and "GOAWAY" not in done.stderr, done.stderr[-3000:]
    assert all(strikes == "0" for strikes in received), f"ping strikes: {received}"
    assert result == {"accepted": 1, "dropped": 0}, result  # one stream, open throughout
