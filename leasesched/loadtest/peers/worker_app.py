"""The module ``celery -A`` loads in the peer's worker: the app, configured from its environment.

Kept apart from ``celery_app`` so that the harness, which builds its own
client app with ``make_app``, never builds this one.
"""

from __future__ import annotations

import os

from leasesched.loadtest.peers.celery_app import BROKER_ENV, DEFAULT_VISIBILITY_S, RESTORE_ENV, VISIBILITY_ENV, make_app

_restore = os.environ.get(RESTORE_ENV)
app = make_app(os.environ[BROKER_ENV], float(os.environ.get(VISIBILITY_ENV, DEFAULT_VISIBILITY_S)),
               int(_restore) if _restore else None)  # fmt: skip
