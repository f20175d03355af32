"""The load-test harness behind ``leasesched loadtest`` (issue 4).

Modules, each small and separately testable:

* ``arrival``        — open-loop pacing: requests leave on schedule, whether or not earlier ones returned;
* ``metrics``        — per-method latency and error recording, per-second time series, percentiles;
* ``bench_tasks`` — what the benchmark schedules (its handlers: ``worker/bench_handlers.py``, writing an execution ledger);
* ``ledger``         — reading that ledger: start times, executions, overlapping executions;
* ``store_probe``    — the store's raw plain-write and LWT capacity with the product's driver settings;
* ``cluster``        — a complete local cluster of real processes (infra, schema, services, triggers, workers);
* ``cpu``            — CPU seconds per process over the load window;
* ``profiling``      — py-spy profiles of chosen processes during the load;
* ``runner``         — one load test from start to report;
* ``report``, ``chart`` — the JSON report (with the targets of issue 4) and the PNG chart.
* ``peers``          — the same no-op load on another system (Celery + Redis), beside leasesched (issue 17, ``make bench-peers``).
"""
