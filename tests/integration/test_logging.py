"""Logs are structured (one JSON object per line, with task/service/owner/worker fields) and never
carry a value, token, result or key."""

from __future__ import annotations

import json
import logging

import pytest

from bridge.observability.logging import configure_logging
from tests.conftest import OWNERS, service_id, settings_from

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CANARY = "canary-e41d-never-log-me"


@pytest.fixture
def json_logs(bridge_env):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging(settings_from(bridge_env, log_format="json", log_level="DEBUG"))
    yield
    root.handlers[:], level = saved
    root.setLevel(level)


async def test_logs_are_json_with_fields_and_no_secrets(json_logs, bridge, engine, workers, capsys, keyring_path):
    svc = service_id()
    await engine.add(svc, {"v": CANARY}, token={"t": CANARY})
    w = await workers(svc, "logged-worker")
    task = await w.fetch()
    assert await task.ack({"r": CANARY})
    await w.fetch()  # an empty fetch logs too
    err = capsys.readouterr().err
    assert CANARY not in err
    secret_material = json.loads(keyring_path.read_text())
    for ring in secret_material["owners"].values():
        for key in ring["keys"].values():
            assert key not in err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert events, "expected JSON log lines"
    done = [e for e in events if e.get("event") == "request done"]
    assert {e["method"] for e in done} >= {"add", "fetch", "ack"}
    fetch = next(e for e in done if e["method"] == "fetch")
    assert fetch["owner"] == OWNERS[0]
    assert fetch["service"] == svc
    assert fetch["worker"] == "logged-worker"
    assert fetch["outcome"] == "ok"
    claimed = [e for e in events if e.get("event") == "task claimed"]
    assert claimed and claimed[0]["task_id"] == task.id
    assert all("level" in e and "timestamp" in e for e in events)
