"""The ``queue-bridge`` command line against the servers, run as real subprocesses.

The add/fetch/ack commands talk to the in-process ``bridge`` fixture over RabbitMQ, ``stats``
reads the same Cassandra keyspace. The commands that need no server are in tests/unit/test_cli.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from tests.cli import cli, ok
from tests.conftest import ENGINE_USER, OWNERS, Servers, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]


async def stats(service: str, env: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok(await cli("stats", service, "--owner", OWNER, "--json", env=env)))
    assert doc["owner"] == OWNER and doc["service"] == service
    assert doc["truncated"] is False
    return doc


async def test_add_stats_fetch_ack_round_trip(bridge: Any, bridge_env: dict[str, str], servers: Servers) -> None:
    svc = service_id()
    engine_url = servers.amqp_url(ENGINE_USER)
    worker_url = servers.amqp_url(OWNER)  # a worker's owner is its AMQP user

    before_add = time.time()
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
    assert s["scanned"] == 1
    # Measured from the task's creation: after the add began, before now (the age is clamped at 0,
    # and the CLI processes in between take seconds, so 0 would mean a wrong timestamp).
    assert 0 < s["oldest_ready_age_s"] <= time.time() - before_add + 0.5, s

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
