"""Review 11: the gateway during a bridge's stop whose broker steps are slow (real servers).

``Bridge.stop`` closed the hints, released the duty and paused the AMQP consumers (up to 6 s, then
3 s a consumer, with a broker that stops answering: 15-21 s) before it began the gateway's stop.
Meanwhile the still-open gateway answered every new long-poll fetch null at once (the hints were
closed) and took new adds and acks, which the gateway's stop then cut at its deadline, already
passed: a connection reset, not an answer. The gateway's stop begins first now: new requests are
answered 503 (Retry-After: another bridge answers), those under way get the grace.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import service_id
from tests.integration.test_gateway import gateway_keys, start_gateway  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _post(session: aiohttp.ClientSession, url: str, key: str, body: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with session.post(url, data=json.dumps(body).encode(), headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


async def _warm(session: aiohttp.ClientSession, base: str, key: str) -> None:
    """A keep-alive connection to the gateway left in ``session``'s pool (opened before the stop)."""
    async with session.get(base + "/api/queue/stats", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        await resp.read()


async def test_requests_during_a_slow_pause_are_answered_not_reset(start_gateway, gateway_keys, make_bridge):  # noqa: F811
    _, keys = gateway_keys
    b, gw = await start_gateway(shutdown_grace=5)
    svc = service_id()
    url = f"{gw.base}/api/queue/{svc}"

    # Every add waits in the store until the test lets it go.
    release_adds, add_held, held = asyncio.Event(), asyncio.Event(), []
    real_store_add = b.queue.store_add

    async def store_add(*args: Any, **kwargs: Any) -> str:
        held.append(1)
        add_held.set()
        await release_adds.wait()
        return await real_store_add(*args, **kwargs)

    b.queue.store_add = store_add
    # The consumers' pause takes as long as the test says (a broker that stops answering).
    pausing, release_pause = asyncio.Event(), asyncio.Event()
    real_pause = b.transport.pause

    async def pause() -> None:
        pausing.set()
        await release_pause.wait()
        await real_pause()

    b.transport.pause = pause

    fetch_session, add_session = aiohttp.ClientSession(), aiohttp.ClientSession()
    stopping: asyncio.Task[None] | None = None
    try:
        await _warm(fetch_session, gw.base, keys["a"])
        await _warm(add_session, gw.base, keys["a"])
        under_way = asyncio.create_task(gw.post(svc, "tasks", {"value": "before the stop"}))
        await asyncio.wait_for(add_held.wait(), 10)

        stopping = asyncio.create_task(make_bridge.stop(b))
        await asyncio.wait_for(pausing.wait(), 10)

        # A long-poll sent while the consumers pause: "closing", not an immediate null.
        loop = asyncio.get_running_loop()
        sent = loop.time()
        status, reply = await asyncio.wait_for(
            _post(fetch_session, url + "/fetch", keys["a"], {"workerId": "w", "waitMs": 3000}), 10
        )
        assert status == 503 and reply["error"]["code"] == "unavailable", (status, reply)
        assert loop.time() - sent < 2.5, "not answered at once"
        # An add sent meanwhile: refused at once (nothing stored), not taken and then cut.
        status, reply = await asyncio.wait_for(_post(add_session, url + "/tasks", keys["a"], {"value": 2}), 10)
        assert status == 503 and reply["error"]["code"] == "unavailable", (status, reply)
        assert len(held) == 1, "the add sent during the stop reached the store"

        # The add under way before the stop ends within the grace: answered, not reset.
        release_adds.set()
        answered = await asyncio.wait_for(under_way, 10)
        assert answered.status in (200, 503), (answered.status, answered.body)
        release_pause.set()
        await asyncio.wait_for(stopping, 30)
    finally:
        release_adds.set()
        release_pause.set()
        if stopping is not None:
            await asyncio.gather(stopping, return_exceptions=True)
        await fetch_session.close()
        await add_session.close()
