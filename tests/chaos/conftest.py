"""Chaos tests use the same process fixtures as the integration tests."""

from tests.integration.conftest import _test_processes_folder  # noqa: F401 - a fixture, registered by import
