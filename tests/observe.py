"""Watching real processes from outside: their /metrics endpoints and JSON logs.

``MetricsGroup`` is a ``SessionGroup`` (tests/processes.py) that gives every
process it starts its own ``--metrics-port`` and remembers it
(``make_cluster(metrics=True)`` uses it); ``scrape`` reads an endpoint the way Prometheus does, and ``Samples``
answers "what is the value of this series" and "by how much did it move".
"""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from leasesched.config import Config
from leasesched.testing import RunningProcess, free_port
from tests.processes import SessionGroup


class MetricsGroup(SessionGroup):
    """Every process started through it serves /metrics on a port of its own.

    ``role_args[role]``: more flags for the next processes of that role (a
    repeated click option takes the last value, so this can override a flag).
    """

    def __init__(self, log_dir: Path | None = None) -> None:
        super().__init__(log_dir)
        self.metrics_ports: dict[str, int] = {}  # process name → metrics port
        self.role_args: dict[str, tuple[str, ...]] = {}

    def _args(self, role: str, extra: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
        port = free_port()
        return port, (*extra, *self.role_args.get(role, ()), "--metrics-port", str(port))

    def start(self, role: str, cfg: Config, *extra_args: str, **kwargs: Any) -> RunningProcess:
        """Also the start of every attempt of ``start_serving``: each gets a new metrics port."""
        port, args = self._args(role, extra_args)
        proc = super().start(role, cfg, *args, **kwargs)
        self.metrics_ports[proc.name] = port
        return proc

    def metrics_url(self, proc: RunningProcess) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[proc.name]}/metrics"


@dataclass(frozen=True)
class Samples:
    """One scrape: (sample name, labels) → value."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float:
        """The sum over every series named ``name`` whose labels include ``labels`` (0 if none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and wanted <= ls)

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.values)

    def delta(self, before: "Samples", name: str, **labels: str) -> float:
        return self.get(name, **labels) - before.get(name, **labels)


def scrape(url: str, timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        assert reply.status == 200, f"{url}: HTTP {reply.status}"
        text = reply.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Samples(values)


# The classic text format's line start ("2025-01-31 12:00:00,123 INFO name ..."):
# a line like this means a process logged without the JSON formatter.
TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def json_log_records(proc: RunningProcess) -> list[dict[str, Any]]:
    """Every log record of ``proc``, checking on the way that its log is JSON lines.

    Lines the test harness writes ("===== … starting …") and lines gRPC's C
    core prints to stderr by itself are not the process's logging; every
    line that is a Python log record must be one JSON object.
    """
    records = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)  # a broken line fails the test here
            assert isinstance(record, dict), line
            records.append(record)
            continue
        assert not TEXT_LOG_LINE.match(line), f"{proc.name} logged a text line: {line}"
        assert not line.startswith("Traceback"), f"{proc.name} printed a raw traceback: {line}"
    return records
