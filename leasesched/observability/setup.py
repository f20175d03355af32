"""Start-up of logging and the metrics endpoint for one leasesched process."""

from __future__ import annotations

from leasesched.config import Config
from leasesched.observability import logs, metrics


def setup_process(cfg: Config, role: str, log_format: str | None = None, metrics_port: int | None = None) -> int:
    """Configure logging (``log_format`` or ``cfg.log_format``) and serve
    ``/metrics`` on ``metrics_port`` (or ``cfg.metrics_port``; 0 = off) on
    ``cfg.bind_host``. Returns the metrics port, 0 when off."""
    logs.setup(log_format or cfg.log_format, role=role)
    return metrics.serve(role, cfg.metrics_port if metrics_port is None else metrics_port, cfg.bind_host)
