"""Peers in the benchmark (issue 17): another system run beside leasesched on the same machine.

The figures of one system alone say little; the same no-op workload on a
well-known task queue, measured the same way, says what leasesched's
guarantees cost and what they buy. One peer so far, Celery + Redis:

* ``celery_app``  — the Celery app its worker runs (``celery -A ...``): a no-op
  task that writes START/END lines to the project's execution ledger;
* ``celery_peer`` — the harness: its own redis-server and Celery worker, the
  measurements, ``peer.json``;
* ``results``     — the typed results, the overlap count (the ledger's own
  checker) and the table that puts the peer beside a leasesched report;
* ``__main__``    — ``python -m leasesched.loadtest.peers`` (``make bench-peers``).

Celery is an optional extra (``pip install -e '.[peers]'``): only
``celery_app`` and ``celery_peer`` import it, lazily, so the package, mypy and
the tests work without it.
"""
