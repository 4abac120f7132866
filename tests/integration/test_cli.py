"""The ``queue-bridge`` command line, run as real subprocesses (``python -m bridge ...``).

The add/fetch/ack commands talk to the in-process ``bridge`` fixture over RabbitMQ, ``stats``
reads the same Cassandra keyspace. Each subprocess costs about a second of start-up, so the
independent invocations of a test run in parallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from bridge.crypto.keyring_file import KeyringFileProvider, load_keyring
from tests.conftest import ENGINE_USER, OWNERS, ROOT, Servers, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]


async def cli(*args: str, env: dict[str, str], extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bridge ARGS`` with os.environ + env (+ extra); never raises on a non-zero exit."""
    full_env = {**os.environ, **env, **(extra or {})}
    full_env.pop("COLUMNS", None)
    full_env["COLUMNS"] = "200"  # wide help and error boxes: messages are not wrapped mid-phrase
    with anyio.fail_after(90):
        proc = await anyio.run_process([sys.executable, "-m", "bridge", *args], env=full_env, cwd=ROOT, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


async def cli_many(*calls: tuple[tuple[str, ...], dict[str, str]], env: dict[str, str]) -> list[Any]:
    """Run several independent CLI invocations in parallel, results in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, args: tuple[str, ...], extra: dict[str, str]) -> None:
        results[i] = await cli(*args, env=env, extra=extra)

    async with anyio.create_task_group() as tg:
        for i, (args, extra) in enumerate(calls):
            tg.start_soon(one, i, args, extra)
    return results


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


async def stats(service: str, env: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok(await cli("stats", service, "--owner", OWNER, "--json", env=env)))
    assert doc["owner"] == OWNER and doc["service"] == service
    assert doc["truncated"] is False
    return doc


async def test_add_stats_fetch_ack_round_trip(bridge: Any, bridge_env: dict[str, str], servers: Servers) -> None:
    svc = service_id()
    engine_url = servers.amqp_url(ENGINE_USER)
    worker_url = servers.amqp_url(OWNER)  # a worker's owner is its AMQP user

    out = ok(
        await cli(
            "add", svc, '{"invoice": 42}', "--token", '{"p": 1}', "--owner", OWNER, "--amqp-url", engine_url,
            env=bridge_env,
        )
    )  # fmt: skip
    task_id = out.strip()
    assert uuid.UUID(task_id).version == 1, out

    # The table form once; JSON below.
    table = ok(await cli("stats", svc, "--owner", OWNER, env=bridge_env))
    lines = dict(line.split(None, 1) for line in table.splitlines() if line and not line.startswith("note"))
    assert lines["ready"].strip() == "1", table
    assert f"{OWNER} / {svc}" in table
    s = await stats(svc, bridge_env)
    assert (s["ready"], s["in_flight"], s["done"], s["dead"]) == (1, 0, 0, 0), s
    assert s["scanned"] == 1 and s["oldest_ready_age_s"] is not None and s["oldest_ready_age_s"] >= 0

    fetched = json.loads(
        ok(await cli("fetch", svc, "--worker", "w1", "--ttr", "60000", "--amqp-url", worker_url, env=bridge_env))
    )
    assert fetched["id"] == task_id
    assert fetched["value"] == {"invoice": 42}
    assert fetched["deliveries"] == 1
    assert fetched["leaseExpiresAt"]

    s = await stats(svc, bridge_env)
    assert (s["ready"], s["in_flight"], s["done"], s["dead"]) == (0, 1, 0, 0), s
    assert s["oldest_ready_age_s"] is None

    acked = ok(
        await cli("ack", svc, "--worker", "w1", "--result", '{"paid": true}', "--amqp-url", worker_url, env=bridge_env)
    )
    assert acked.strip() == "true"

    s = await stats(svc, bridge_env)
    assert (s["ready"], s["in_flight"], s["dead"]) == (0, 0, 0), s
    assert s["done"] == 1, s  # no fetch since the task's: the scan cursor has not moved past it yet

    # Sequential on purpose: this fetch lets the dispatcher move (and persist) its cursor past the task.
    again = await cli("fetch", svc, "--worker", "w1", "--amqp-url", worker_url, env=bridge_env)
    assert ok(again).strip() == "null"


async def test_config_masks_secrets_and_schema_prints_cql(bridge_env: dict[str, str], names: dict[str, str]) -> None:
    config, schema = await cli_many(
        (("config",), {"BRIDGE_KEY_SERVER_TOKEN": "s3cr3t"}),
        (("schema", "--print"), {}),
        env=bridge_env,
    )
    out = ok(config)
    assert "s3cr3t" not in out
    doc = json.loads(out)
    assert doc["BRIDGE_KEY_SERVER_TOKEN"] == "**********"
    assert doc["BRIDGE_EXCHANGE"] == names["exchange"]
    assert "guest:guest" not in out  # the AMQP URL is a secret too

    cql = ok(schema)
    keyspace = bridge_env["BRIDGE_CASSANDRA_KEYSPACE"]
    assert f"CREATE KEYSPACE IF NOT EXISTS {keyspace}" in cql
    for table in ("ready", "leases", "cursors", "outbox"):
        assert f"CREATE TABLE IF NOT EXISTS {keyspace}.{table} (" in cql


COMMANDS = [
    (),
    ("run",),
    ("config",),
    ("schema",),
    ("stats",),
    ("add",),
    ("fetch",),
    ("ack",),
    ("keyring",),
    ("keyring", "generate"),
    ("keyring", "rotate"),
]


async def test_help_of_every_command(bridge_env: dict[str, str]) -> None:
    procs = await cli_many(*(((*cmd, "--help"), {}) for cmd in COMMANDS), env=bridge_env)
    for cmd, proc in zip(COMMANDS, procs, strict=True):
        out = ok(proc)
        assert "Usage:" in out, (cmd, out)
    top = procs[0].stdout
    for name in ("run", "config", "schema", "stats", "add", "fetch", "ack", "keyring"):
        assert name in top


async def test_bad_arguments_and_unreachable_cassandra(bridge_env: dict[str, str]) -> None:
    bad_value, bad_result, both, unreachable = await cli_many(
        (("add", "svc", "{not json"), {}),
        (("ack", "svc", "--worker", "w", "--result", "[1,"), {}),
        (("ack", "svc", "--worker", "w", "--result", "1", "--error", "2"), {}),
        (
            ("stats", "svc", "--owner", OWNER),
            {"BRIDGE_CASSANDRA_PORT": "1", "BRIDGE_CASSANDRA_TIMEOUT": "1"},
        ),
        env=bridge_env,
    )
    for proc, words in ((bad_value, "VALUE_JSON"), (bad_result, "--result"), (both, "not both")):
        assert proc.returncode == 2, proc
        assert words in proc.stderr
        no_traceback(proc)
    assert "not valid JSON" in bad_value.stderr and "not valid JSON" in bad_result.stderr

    assert unreachable.returncode == 1, unreachable
    assert "cannot connect to Cassandra at " in unreachable.stderr and ":1:" in unreachable.stderr
    assert unreachable.stdout == ""
    no_traceback(unreachable)


async def test_keyring_generate_and_rotate(bridge_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    ok(await cli("keyring", "generate", str(path), "--owner", "alpha", "--owner", "beta", env=bridge_env))
    assert path.stat().st_mode & 0o777 == 0o600
    before = json.loads(path.read_text())
    assert set(before["owners"]) == {"alpha", "beta"}

    refused, rotated = await cli_many(
        (("keyring", "generate", str(path), "--owner", "gamma"), {}),
        (("keyring", "rotate", str(path), "--owner", "alpha"), {}),
        env=bridge_env,
    )
    # generate never overwrites without --force (it ran alongside the rotation, so only its answer is checked)
    assert refused.returncode == 1 and "--force" in refused.stderr
    no_traceback(refused)
    out = ok(rotated)

    after = json.loads(path.read_text())
    assert set(after["owners"]) == {"alpha", "beta"}
    alpha_before, alpha_after = before["owners"]["alpha"], after["owners"]["alpha"]
    assert alpha_after["current"] != alpha_before["current"]
    assert alpha_after["current"] in out
    assert set(alpha_before["keys"]) < set(alpha_after["keys"])  # old keys are kept
    assert after["owners"]["beta"] == before["owners"]["beta"]
    load_keyring(path)  # valid

    provider = KeyringFileProvider(path)
    assert (await provider.current_key("alpha")).key_id == alpha_after["current"]
    assert (await provider.key_by_id("alpha", alpha_before["current"])).secret
