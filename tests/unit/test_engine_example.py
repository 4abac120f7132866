"""examples/engine.py's result collector takes results from the bridge only (no servers: the
broker's own check of ``user_id`` is what the integration tests of the clients exercise)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import orjson

from tests.conftest import ROOT


def _engine_example() -> Any:
    spec = importlib.util.spec_from_file_location("qb_example_engine_unit", ROOT / "examples" / "engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(user_id: str | None, n: int, value: str) -> Any:
    body = {"serviceId": "s", "taskId": f"t{n}", "token": {"processId": "p1", "n": n}, "result": value}
    return SimpleNamespace(user_id=user_id, body=orjson.dumps(body), message_id=f"m-{user_id}-{n}")


def test_a_result_not_published_by_the_bridge_is_not_recorded() -> None:
    """docs/security.md: engines must check that a result's user_id is the bridge's; the example,
    which users copy, took any message on the results queue whose token matched. Found by review,
    2026-12-06."""
    lines: list[str] = []
    results: dict[int, dict[str, Any]] = {}
    collector = _engine_example()._Collector("p1", 2, results, lines.append, "queue-bridge")
    collector._record(_result("intruder", 1, "forged"))
    collector._record(_result(None, 1, "forged, no user_id"))
    assert results == {} and collector.forged == 2
    collector._record(_result("queue-bridge", 1, "real"))
    assert results[1]["result"] == "real"
