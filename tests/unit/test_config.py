import pytest

from leasesched.config import Config


def test_config_round_trips_through_the_environment() -> None:
    cfg = Config(scan_interval_s=0.3, token="lsk_x", tls_require_client_cert=1, keyspace="k")
    assert Config.from_env(cfg.to_env()) == cfg


def test_environment_overrides_defaults_and_flags_override_environment() -> None:
    env = {"LEASESCHED_CASSANDRA_PORT": "19042", "LEASESCHED_SCAN_INTERVAL_S": "0.25", "LEASESCHED_KEYSPACE": "a"}
    cfg = Config.from_env(env, keyspace="b", home=None)
    assert (cfg.cassandra_port, cfg.scan_interval_s, cfg.keyspace) == (19042, 0.25, "b")


def test_bad_number_in_the_environment_names_the_variable() -> None:
    with pytest.raises(ValueError, match="LEASESCHED_CASSANDRA_PORT"):
        Config.from_env({"LEASESCHED_CASSANDRA_PORT": "ninety"})
