"""Fixtures shared by the unit tests of the logic above the store."""

from __future__ import annotations

import pytest

from leasesched.lifecycle import Lifecycle
from leasesched.store.memory import MemoryStore


@pytest.fixture
def store() -> MemoryStore:
    """An empty in-memory store (unit tests only: see leasesched/store/memory.py)."""
    return MemoryStore()


@pytest.fixture
def life(store: MemoryStore) -> Lifecycle:
    """The lifecycle over ``store``, with no lease grace (expiries are exact)."""
    return Lifecycle(store, lease_grace_ms=0)
