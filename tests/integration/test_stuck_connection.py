"""A connection aiormq finds stuck (no frame from the broker for a few heartbeats: a network black
hole, a frozen node) is closed with ``CancelledError``, and every call pending on it raises that in
tasks nobody cancelled. The bridge's background loops went on after any ``Exception`` but ended on
it (a ``BaseException``), silently: the result relay first (it waits for publisher confirms).

Here the "black hole" is a proxy that forwards the bridge's frames and drops the broker's
(``TcpProxy.mute``): the broker keeps the connection (it hears the bridge's heartbeats), the bridge
hears nothing and declares it stuck."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import BRIDGE_USER, next_result, service_id, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_the_result_relay_outlives_a_stuck_connection(make_bridge, engine, workers, servers, names):
    from bridge.client.rpc import results_consumer

    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    try:
        url = f"amqp://{BRIDGE_USER}:{BRIDGE_USER}@127.0.0.1:{proxy.port}/?heartbeat=2"
        b = await make_bridge(amqp_url=url, results_queue="", result_republish_after=1.0)
        await wait_for(lambda: b.duty.held, 10, what="the duty")
        svc = service_id()
        await engine.add(svc, {"n": 1}, token={"workflow": "stuck"})
        w = await workers(svc)
        task = await w.fetch()
        assert task is not None
        assert await task.ack({"ok": True}) is True  # unroutable (nothing bound): owed, re-published
        await wait_for(lambda: b.scheduler.state.results_stuck >= 1, 20, interval=0.2, what="the result owed")
        before = proxy.accepted
        proxy.mute()  # a re-publication's confirm never comes; aiormq closes the connection as stuck
        await wait_for(lambda: proxy.accepted > before, 30, interval=0.2, what="the connection given up as stuck")
        proxy.restore()
        async with results_consumer(
            servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc
        ) as got:
            message = await next_result(got, 45, "the owed result, after the stuck connection")
        assert message["token"] == {"workflow": "stuck"} and message["result"] == {"ok": True}
    finally:
        await proxy.stop()


async def test_adds_waiting_to_publish_on_a_connection_the_broker_gave_up_end(make_bridge, engine, servers):
    """aiormq's write queue holds 10 frames and only the connection's writer takes them out. With the
    broker not reading the bridge's main connection (a resource alarm, a dead link: here a proxy
    that stops reading it) and a publish that waits for the socket in the writer (aio-pika's, as
    the duty token's and the results' do), the queue fills, and every add then waited for room to
    publish its hint or reply. The broker gave the connection up (no heartbeat heard) and nothing
    took from that queue again: the adds' handlers never ended, their deliveries stayed unacked on
    the healthy adds connection, and once they held the adds window no add was served until the
    broker's consumer timeout (30 minutes). Found by review. The channel's close now ends them."""
    import aio_pika

    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    blocking: list[asyncio.Task[Any]] = []
    try:
        url = f"amqp://{BRIDGE_USER}:{BRIDGE_USER}@127.0.0.1:{proxy.port}/?heartbeat=2"
        b = await make_bridge(amqp_url=url)
        assert b.transport.connection is not None
        publisher = await b.transport.connection.channel(publisher_confirms=False)
        svc = service_id()
        await engine.add(svc, "the queue exists")
        before = proxy.accepted
        proxy.stall(0)  # the bridge's main connection (opened first): replies, hints
        message = aio_pika.Message(b"x" * 1_000_000)
        blocking = [
            asyncio.create_task(publisher.default_exchange.publish(message, routing_key="nowhere")) for _ in range(12)
        ]
        for i in range(100):
            await engine.add(svc, {"n": i, "pad": "y" * 4000}, wait=False)
        await wait_for(lambda: proxy.accepted > before, 30, what="the main connection given up and opened again")
        proxy.resume()
        await asyncio.gather(*blocking, return_exceptions=True)
        await wait_for(lambda: not b.transport._inflight, 30, what="every add's handling ended")
        assert (await asyncio.wait_for(engine.add(svc, "after"), 30)) is not None
    finally:
        for task in blocking:
            task.cancel()
        await proxy.stop()
