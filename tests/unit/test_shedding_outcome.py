"""Load shedding counts as ``outcome="busy"``, not as the outage signal ``unavailable`` (no servers).

README tells operators to alert on ``queue_bridge_requests_total{outcome="unavailable"}`` as the
sign of a store or key-provider outage. The same outcome also counted the requests a bridge turns
away on purpose: a gateway key over BRIDGE_GATEWAY_MAX_IN_FLIGHT_PER_KEY, a redrive or a long
lifecycle request over its bridge's cap, gateway requests while the bridge stops, a request whose
queue is being declared again. One tenant's runaway client, or a routine deploy, paged on-call as
a store outage. Those are counted ``busy`` now; on the wire they are still ``unavailable`` (the
contract's retryable code: the caller sends them again). Found by a review.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from bridge.config import Settings
from bridge.domain.errors import Unavailable
from bridge.transport import capacity as capacity_module
from bridge.transport.amqp import AmqpTransport
from bridge.transport.replies import reply_node
from tests.unit.test_fuzz import REPLY_TO, _Channel, _Message, _Queue
from tests.unit.test_gateway import _post, _standin_server

pytestmark = pytest.mark.anyio


async def _until(condition: Any, what: str) -> None:
    """Wait (bounded) for ``condition()``: a state of the server under test, no fixed sleep."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- the gateway ---------------------------------------------------------------------------------------


async def test_a_gateway_key_over_its_in_flight_limit_counts_busy(tmp_path: Path) -> None:
    server, queue, base, keys, observed = await _standin_server(tmp_path, gateway_max_in_flight_per_key=1)
    try:
        queue.hold = asyncio.Event()
        body = b'{"workerId": "w", "waitMs": 20000}'
        waiting = asyncio.create_task(_post(base, "/api/queue/s/fetch", keys["w"], body))
        await _until(lambda: queue.held == 1, "the first fetch in the stand-in queue")
        status, reply, _ = await asyncio.wait_for(_post(base, "/api/queue/s/fetch", keys["w"], body), 5)
        assert status == 503 and reply["error"]["code"] == "unavailable", "the wire is unchanged"
        assert observed == [("fetch", "busy")], observed
        queue.hold.set()
        await waiting
        assert observed[-1] == ("fetch", "ok")
    finally:
        await server.stop()


async def test_gateway_requests_while_the_bridge_stops_count_busy(tmp_path: Path) -> None:
    import aiohttp

    server, queue, base, keys, observed = await _standin_server(tmp_path, shutdown_grace=5)
    queue.hold = asyncio.Event()
    headers = {"Authorization": f"Bearer {keys['w']}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/api/queue/stats", headers=headers) as resp:
            assert resp.status == 200  # a keep-alive connection, pooled
        adding = asyncio.create_task(_post(base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}'))
        await _until(lambda: queue.held == 1, "an add under way")
        stopping = asyncio.create_task(server.stop())
        try:
            await _until(lambda: server._closing, "the stop begun")
            async with session.get(f"{base}/api/queue/stats", headers=headers) as resp:  # the pooled connection
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "unavailable", "the wire is unchanged"
        finally:
            queue.hold.set()
            await stopping
            await adding
    assert observed.count(("stats", "busy")) == 1 and ("stats", "unavailable") not in observed, observed


# -- AMQP ----------------------------------------------------------------------------------------------


def _transport() -> tuple[AmqpTransport, _Channel, list[tuple[str, str]]]:
    observed: list[tuple[str, str]] = []
    transport = AmqpTransport(
        Settings(keyring=None, trusted_users=["engine"]),
        cast(Any, _Queue()),
        observe=lambda method, outcome, seconds: observed.append((method, outcome)),
    )
    channel = _Channel()
    transport._reply_channel = cast(Any, channel)
    transport.replies.main = cast(Any, channel)
    transport.replies.proven.add(str(reply_node(REPLY_TO)))
    return transport, channel, observed


async def _lifecycle(transport: AmqpTransport, method: str, body: dict[str, Any]) -> _Message:
    message = _Message(orjson.dumps(body), method, {}, "worker-a", REPLY_TO)
    await transport._guarded(transport._on_lifecycle)(cast(Any, message))
    return message


def _error_code(channel: _Channel) -> str:
    (reply,) = channel.default_exchange.published
    return str(orjson.loads(reply)["error"]["code"])


async def test_a_redrive_over_the_bridges_cap_counts_busy() -> None:
    transport, channel, observed = _transport()
    transport.handlers.capacity.paced_redrives = capacity_module.MAX_PACED_REDRIVES
    message = await _lifecycle(transport, "redrive", {"serviceId": "s", "all": True})
    assert _error_code(channel) == "unavailable", "the wire is unchanged"
    assert message.settled == ["ack"], "answered and acked, as any unavailable RPC"
    assert observed == [("redrive", "busy")], observed


@pytest.mark.parametrize("method", sorted(capacity_module.LONG_METHODS))
async def test_a_long_request_over_the_bridges_cap_counts_busy(method: str) -> None:
    transport, channel, observed = _transport()
    transport.handlers.capacity.long_requests = capacity_module.MAX_LONG_REQUESTS
    body: dict[str, Any] = {"serviceId": "s"}
    if method == "discard":
        body["taskIds"] = ["00000000-0000-1000-8000-000000000000"]
    await _lifecycle(transport, method, body)
    assert _error_code(channel) == "unavailable"
    assert observed == [(method, "busy")], observed


async def test_a_request_whose_queue_is_being_declared_again_counts_busy() -> None:
    transport, channel, observed = _transport()
    transport.handlers.queue_restoring = lambda key: key == "fetch"
    message = _Message(b'{"serviceId": "s", "workerId": "w"}', "fetch", {}, "worker-a", REPLY_TO)
    await transport._guarded(transport._on_unrouted)(cast(Any, message))
    assert _error_code(channel) == "unavailable"
    assert observed == [("unknown", "busy")], observed


async def test_a_store_outage_still_counts_unavailable() -> None:
    transport, channel, observed = _transport()

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("Cassandra is out of reach")

    transport.handlers.queue.fetch = down  # type: ignore[method-assign]
    message = _Message(b'{"serviceId": "s", "workerId": "w"}', "fetch", {}, "worker-a", REPLY_TO)
    await transport._guarded(transport._on_fetch)(cast(Any, message))
    assert _error_code(channel) == "unavailable"
    assert observed == [("fetch", "unavailable")], observed
