"""What README.md's configuration table promises an operator, checked against the real processes
(each test failed before its fix)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from bridge.crypto import generate_keyring, write_keyring
from tests.cli import cli, no_traceback
from tests.conftest import ROOT

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """A complete BRIDGE_* environment (config needs no server)."""
    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, generate_keyring(["worker-a", "engine"]))
    return {
        "BRIDGE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
        "BRIDGE_CASSANDRA_HOSTS": "127.0.0.1",
        "BRIDGE_CASSANDRA_PORT": "1",
        "BRIDGE_KEYRING": str(keyring),
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_LOG_FORMAT": "json",
    }


def _readme_row(variable: str) -> list[str]:
    for line in README.splitlines():
        if line.startswith(f"| `{variable}`"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"{variable} not in the README table")


async def test_task_ttl_in_seconds_as_the_readme_documents_is_accepted(tmp_path: Path) -> None:
    """README: `BRIDGE_TASK_TTL` | `604800` (7 days) | "task lifetime, seconds or ISO 8601 (`P7D`)".
    `queue-bridge config` prints it as 604800 too. Given in seconds (the documented default
    itself, or an hour), the bridge refuses to start: pydantic parses a str as a duration text."""
    row = _readme_row("BRIDGE_TASK_TTL")
    assert "seconds" in row[2] and row[1].startswith("`604800`"), row
    env = _offline_env(tmp_path)
    for seconds in ("604800", "3600"):
        proc = await cli("config", env=env, extra={"BRIDGE_TASK_TTL": seconds})
        no_traceback(proc)
        assert proc.returncode == 0, f"BRIDGE_TASK_TTL={seconds} refused: {proc.stderr.strip()}"
        assert json.loads(proc.stdout)["BRIDGE_TASK_TTL"] == int(seconds)


async def test_an_invalid_service_max_deliveries_stops_the_bridge_with_a_message_naming_the_variable(
    tmp_path: Path,
) -> None:
    """README, Configuration: "Invalid values stop the bridge at start with a message naming the
    variable"; exit code 2 for bad configuration. BRIDGE_SERVICE_MAX_DELIVERIES that is not JSON
    (a natural slip: `billing=3`) makes `run` (and every command) die with a traceback of
    pydantic-settings' SettingsError, exit code 1, naming the field, not the variable."""
    env = _offline_env(tmp_path)
    for command in (("config",), ("run",)):
        proc = await cli(*command, env=env, extra={"BRIDGE_SERVICE_MAX_DELIVERIES": "billing=3"})
        no_traceback(proc)
        assert proc.returncode == 2, (command, proc.returncode, proc.stderr[-400:])
        assert "BRIDGE_SERVICE_MAX_DELIVERIES" in proc.stderr, proc.stderr[-400:]
    # A limit outside BRIDGE_MAX_DELIVERIES' bounds (1..1000) was taken silently: 0 parked every
    # task of the service at its first delivery.
    for limit in ("0", "5000"):
        proc = await cli("config", env=env, extra={"BRIDGE_SERVICE_MAX_DELIVERIES": f'{{"billing": {limit}}}'})
        no_traceback(proc)
        assert proc.returncode == 2 and "BRIDGE_SERVICE_MAX_DELIVERIES" in proc.stderr, (limit, proc.stderr[-400:])
    proc = await cli("config", env=env, extra={"BRIDGE_SERVICE_MAX_DELIVERIES": '{"billing": 3}'})
    assert proc.returncode == 0 and json.loads(proc.stdout)["BRIDGE_SERVICE_MAX_DELIVERIES"] == {"billing": 3}


async def test_logs_name_the_instance_by_hostname_by_default(bridge_processes: Any, tmp_path: Path) -> None:
    """README: `BRIDGE_INSTANCE_ID` | hostname | "name of this instance in logs and metrics". Unset,
    the metrics' info carries the hostname, but no log line names the instance at all: a fleet's
    aggregated JSON logs cannot tell which bridge wrote a line (only when the variable is set)."""
    row = _readme_row("BRIDGE_INSTANCE_ID")
    assert row[1] == "hostname" and "logs" in row[2], row
    p = bridge_processes()
    deadline = time.monotonic() + 60
    started: dict[str, Any] | None = None
    while started is None and time.monotonic() < deadline:
        for line in p.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"bridge started"' in line:
                started = json.loads(line)
        if started is None:
            assert p.alive(), p.log_path.read_text()[-2000:]
            await anyio.sleep(0.2)
    assert started is not None, "the bridge did not start"
    assert started.get("instance") == socket.gethostname(), started
