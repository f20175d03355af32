"""Operational visibility for every leasesched process: Prometheus metrics
(``metrics``) and one-JSON-object-per-line logs (``logging``)."""
