"""Stats of every queue of an owner when one queue's counts cannot be read (real servers): the
bridge answers the others and names it in ``unavailable``; the Python client keeps the name
(``Engine.stats(...).unavailable``, logged), and ``queue-bridge queue-stats`` prints it and exits 3
(before, the new field was dropped by the client and the CLI printed a shorter list, exit 0: a
queue gone from the list looked like no queue; a re-review, 2026-12-06)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cli import cli
from tests.conftest import ENGINE_USER, OWNERS, fail_parked_reads_of, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_queue_whose_counts_cannot_be_read_is_named_by_the_client_and_the_cli(
    bridge: Any, bridge_env: dict[str, str], servers: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy, broken = service_id(), service_id()
    await engine.add(healthy, 1)
    await engine.add(broken, 2)
    fail_parked_reads_of(monkeypatch, bridge.store, broken)
    found = await engine.stats()
    assert healthy in {s.service_id for s in found} and broken not in {s.service_id for s in found}
    assert found.unavailable == [broken]
    proc = await cli("queue-stats", "--owner", OWNERS[0], "--amqp-url", servers.amqp_url(ENGINE_USER), env=bridge_env)
    assert proc.returncode == 3, proc  # an answer, not all there is
    assert json.loads(proc.stdout)["unavailable"] == [broken]
    assert "could not be read now" in proc.stderr and "Traceback" not in proc.stderr
