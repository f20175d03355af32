"""leasesched.infra.process reads process facts through psutil; PID files of earlier
versions (the kernel's start ticks) still name their process."""

from __future__ import annotations

import os
from pathlib import Path

from leasesched.infra.process import _facts, _same_start


def test_facts_of_a_live_process_and_of_none() -> None:
    me = _facts(os.getpid())
    assert me is not None and not me.gone and not me.paused and me.started > 0
    assert _facts(2**22 + 12345) is None  # above Linux's pid_max: no such process


def test_a_pid_file_start_time_old_or_new_names_the_same_process() -> None:
    me = _facts(os.getpid())
    assert me is not None
    assert _same_start(f"{me.started:.3f}", me)
    assert not _same_start(f"{me.started + 5:.3f}", me)  # a later process with a reused pid
    raw = Path("/proc/self/stat").read_text()
    ticks = raw[raw.rindex(")") + 2 :].split()[19]  # what earlier versions wrote (field 22)
    assert _same_start(ticks, me)
    assert not _same_start(str(int(ticks) + 500), me)


def test_test_server_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    """A server that a test stops and restarts must find its port free again:
    a port from the ephemeral range may meanwhile be any connection's local port."""
    from leasesched.testing import free_ports

    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        ports = free_ports(5)
        assert len(set(ports)) == 5
        assert all(1024 <= port < ephemeral_low for port in ports), ports
