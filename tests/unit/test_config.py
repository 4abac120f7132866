"""Configuration: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from bridge.config import ConfigError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("BRIDGE_")]:
        monkeypatch.delenv(var)
    s = load_settings(_env_file=None)
    assert s.task_ttl == timedelta(days=7)
    assert s.default_time_to_recover_ms == 60_000
    assert s.max_value_bytes == 1_048_576
    assert s.exchange == "queue-bridge"


def test_lists_and_durations_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_CASSANDRA_HOSTS", "10.0.0.1, 10.0.0.2")
    monkeypatch.setenv("BRIDGE_TRUSTED_USERS", "engine,flow")
    monkeypatch.setenv("BRIDGE_TASK_TTL", "P1D")
    s = load_settings(_env_file=None)
    assert s.cassandra_hosts == ["10.0.0.1", "10.0.0.2"]
    assert s.trusted_users == ["engine", "flow"]
    assert s.task_ttl_seconds == 86_400


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("BRIDGE_TASK_TTL", "0"),
        ("BRIDGE_CASSANDRA_PORT", "99999"),
        ("BRIDGE_PREFETCH", "many"),
        ("BRIDGE_CASSANDRA_KEYSPACE", "bad-name"),
        ("BRIDGE_LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert var in str(err.value)


def test_both_key_sources_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("BRIDGE_KEYRING", str(tmp_path / "k.json"))
    monkeypatch.setenv("BRIDGE_KEY_SERVER_URL", "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="BRIDGE_KEY_SERVER_URL"):
        load_settings(_env_file=None)


def test_run_fails_at_start_naming_the_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run"],
        env={"BRIDGE_TASK_TTL": "-5", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "BRIDGE_TASK_TTL" in proc.stderr
    assert "Traceback" not in proc.stderr
