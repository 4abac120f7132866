"""OpsServer over real HTTP on 127.0.0.1: liveness, readiness (with flipping checks), metrics.

Needs no RabbitMQ or Cassandra: the readiness checks are fakes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from bridge.domain.scheduler import SchedulerState
from bridge.observability.http import OpsServer
from bridge.observability.metrics import BridgeMetrics

pytestmark = pytest.mark.anyio


@dataclass
class FakeCheck:
    """ok | fail | raise | hang, switchable while the server runs."""

    mode: str = "ok"
    calls: int = 0
    cancelled: int = 0
    _never: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self) -> bool:
        self.calls += 1
        if self.mode == "ok":
            return True
        if self.mode == "fail":
            return False
        if self.mode == "raise":
            raise ConnectionError("cassandra down")
        try:
            await self._never.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return True


@dataclass
class Ops:
    server: OpsServer
    metrics: BridgeMetrics
    checks: dict[str, FakeCheck]
    base: str
    http: aiohttp.ClientSession


@pytest.fixture
async def ops() -> AsyncIterator[Ops]:
    metrics = BridgeMetrics(instance="ops-test", version="1.2.3", scheduler=SchedulerState())
    checks = {"amqp": FakeCheck(), "cassandra": FakeCheck(), "scheduler": FakeCheck()}
    server = OpsServer(metrics, checks, check_timeout=0.2)
    port = await server.start("127.0.0.1", 0)
    assert port > 0
    assert server.port == port
    async with aiohttp.ClientSession() as http:
        yield Ops(server, metrics, checks, f"http://127.0.0.1:{port}", http)
    await server.stop()


async def get_json(ops: Ops, path: str) -> tuple[int, dict[str, object]]:
    async with ops.http.get(ops.base + path) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_live_is_always_ok(ops: Ops) -> None:
    for check in ops.checks.values():
        check.mode = "raise"
    assert await get_json(ops, "/health/live") == (200, {"status": "ok"})
    assert all(c.calls == 0 for c in ops.checks.values())  # liveness runs no checks


async def test_started_says_whether_the_start_has_ended_whatever_the_checks(ops: Ops) -> None:
    """The startup probe's endpoint: a sidecar whose dependencies are slow once it has started (a
    clock probe over the margin under a loaded Cassandra) was unready, and a startup probe on
    ``/health/ready`` had the kubelet kill it and restart it with back-off, its worker never
    started. Started is said once, for the process's life (found by review, 2026-12-07)."""
    assert await get_json(ops, "/health/started") == (503, {"status": "starting"})
    ops.server.started = True
    for check in ops.checks.values():
        check.mode = "fail"
    assert await get_json(ops, "/health/started") == (200, {"status": "started"})
    assert all(c.calls == 0 for c in ops.checks.values())  # it runs no checks
    assert (await get_json(ops, "/health/ready"))[0] == 503


async def test_ready_when_every_check_passes(ops: Ops) -> None:
    status, body = await get_json(ops, "/health/ready")
    assert status == 200
    assert body == {"status": "ready", "checks": {"amqp": True, "cassandra": True, "scheduler": True}}


@pytest.mark.parametrize("mode", ["fail", "raise", "hang"])
async def test_one_bad_check_makes_it_not_ready(ops: Ops, mode: str) -> None:
    ops.checks["cassandra"].mode = mode
    started = time.monotonic()
    status, body = await get_json(ops, "/health/ready")
    assert time.monotonic() - started < 2.0
    assert status == 503
    assert body == {"status": "not_ready", "checks": {"amqp": True, "cassandra": False, "scheduler": True}}
    if mode == "hang":
        assert ops.checks["cassandra"].cancelled == 1


async def test_readiness_flips_back_and_forth(ops: Ops) -> None:
    seen = []
    for mode in ("ok", "fail", "ok", "raise", "hang", "ok"):
        ops.checks["amqp"].mode = mode
        ops.checks["scheduler"].mode = "fail" if mode == "raise" else "ok"
        status, body = await get_json(ops, "/health/ready")
        seen.append((status, body["status"], body["checks"]))
    assert [s[0] for s in seen] == [200, 503, 200, 503, 503, 200]
    assert [s[1] for s in seen] == ["ready", "not_ready", "ready", "not_ready", "not_ready", "ready"]
    assert seen[3][2] == {"amqp": False, "cassandra": True, "scheduler": False}


async def test_all_hanging_checks_are_bounded_by_one_timeout(ops: Ops) -> None:
    for check in ops.checks.values():
        check.mode = "hang"
    started = time.monotonic()
    status, body = await get_json(ops, "/health/ready")
    assert time.monotonic() - started < 1.0  # run concurrently: ~0.2 s, not 3 x 0.2 s plus slack
    assert status == 503
    assert body["checks"] == {"amqp": False, "cassandra": False, "scheduler": False}


async def test_default_timeout_is_one_second() -> None:
    hang = FakeCheck(mode="hang")

    async def amqp_ok() -> bool:
        return True

    server = OpsServer(BridgeMetrics(instance="t"), {"amqp": amqp_ok, "cassandra": hang})
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                body = await resp.json()
            elapsed = time.monotonic() - started
        assert resp.status == 503
        assert body == {"status": "not_ready", "checks": {"amqp": True, "cassandra": False}}
        assert 0.9 <= elapsed < 2.0
    finally:
        await server.stop()


async def test_plain_callables_and_no_checks() -> None:
    flag = {"up": True}
    server = OpsServer(BridgeMetrics(instance="t"), {"amqp": lambda: flag["up"]})
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                assert resp.status == 200
            flag["up"] = False
            async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                assert resp.status == 503
                assert await resp.json() == {"status": "not_ready", "checks": {"amqp": False}}
    finally:
        await server.stop()


async def test_metrics_exposition(ops: Ops) -> None:
    m = ops.metrics
    m.inc("tasks_added")
    m.inc("tasks_added")
    m.inc("tasks_completed", outcome="result")
    m.inc("tasks_redelivered", kind="resend")
    m.observe("fetch", "ok", 0.002)
    m.observe("add", "unauthorized", 0.001)
    m.set_results_pending(4)
    async with ops.http.get(ops.base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    lines = set(text.splitlines())
    assert "queue_bridge_tasks_added_total 2.0" in lines
    assert 'queue_bridge_tasks_completed_total{outcome="result"} 1.0' in lines
    assert 'queue_bridge_tasks_redelivered_total{kind="resend"} 1.0' in lines
    assert 'queue_bridge_requests_total{method="fetch",outcome="ok"} 1.0' in lines
    assert 'queue_bridge_requests_total{method="add",outcome="unauthorized"} 1.0' in lines
    assert 'queue_bridge_request_duration_seconds_bucket{le="0.0025",method="fetch"} 1.0' in lines
    assert "queue_bridge_results_pending 4.0" in lines
    assert 'queue_bridge_info{instance="ops-test",version="1.2.3"} 1.0' in lines
    assert any(line.startswith("queue_bridge_scheduler_last_tick_age_seconds ") for line in lines)
    assert "# TYPE queue_bridge_request_duration_seconds histogram" in lines


async def test_unknown_path_is_404_and_stop_closes_the_port() -> None:
    server = OpsServer(BridgeMetrics(instance="t"), {})
    port = await server.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/nope") as resp:
            assert resp.status == 404
        async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ready", "checks": {}}
        await server.stop()
        await server.stop()  # idempotent
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"http://127.0.0.1:{port}/health/live"):
                pass


async def test_start_twice_is_an_error() -> None:
    server = OpsServer(BridgeMetrics(instance="t"), {})
    await server.start("127.0.0.1", 0)
    try:
        with pytest.raises(RuntimeError):
            await server.start("127.0.0.1", 0)
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("host", "reachable", "unreachable"),
    [("", ["127.0.0.1", "[::1]"], []), ("::", ["[::1]"], ["127.0.0.1"]), ("0.0.0.0", ["127.0.0.1"], ["[::1]"])],  # nosec B104
)
async def test_the_listen_address_families_are_as_the_docs_say(
    host: str, reachable: list[str], unreachable: list[str]
) -> None:
    """The ConfigMap said "::" listens on IPv6 and IPv4 both: Python's servers set IPV6_V6ONLY, so a
    dual-stack cluster's IPv4 probes were refused (found by review, 2026-12-07). "" is both."""
    import socket

    with socket.socket() as probe:  # a port free on IPv4; "" binds it on both families
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = BridgeMetrics(instance="ops-test", version="1.2.3", scheduler=SchedulerState())
    server = OpsServer(metrics, {}, check_timeout=0.2)
    await server.start(host, port)
    try:
        async with aiohttp.ClientSession() as http:
            for address in reachable:
                async with http.get(f"http://{address}:{port}/health/live") as resp:
                    assert resp.status == 200, address
            for address in unreachable:
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with http.get(f"http://{address}:{port}/health/live"):
                        pass
    finally:
        await server.stop()
