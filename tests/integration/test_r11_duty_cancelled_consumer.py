"""A duty holder whose consumer the broker cancelled (its duty queue deleted, or the node of a
classic duty queue restarted) against the real RabbitMQ: the queue is declared and consumed again,
another consumer becomes the single active one and receives the next token, and the old holder
kept ``held`` for good (its renewals published tokens it never got back): two bridges ran the
recovery scheduler and the result relay, results were published twice. Found by review,
2026-12-06. A renewal whose fresh token has not come back by the next one lets the duty go now."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import pytest

from bridge.transport.duty import Duty
from tests.conftest import BRIDGE_USER, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

RENEW_S = 0.5
DUTY_ARGS: dict[str, Any] = {"x-single-active-consumer": True, "x-max-length": 1, "x-overflow": "drop-head"}


def amqp_url(port: int) -> str:
    return f"amqp://{BRIDGE_USER}:{BRIDGE_USER}@127.0.0.1:{port}/"


async def test_a_holder_whose_consumer_was_cancelled_lets_the_duty_go(servers, names):
    queue = f"{names['queue_prefix']}.duty"
    # The holder's connection goes through a proxy: its consume again (aio-pika's recovery after
    # the broker's cancel) is held there until the plain consumer below is the active one.
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    holder_conn = await aio_pika.connect_robust(amqp_url(proxy.port))
    other_conn = await aio_pika.connect_robust(servers.amqp_url(BRIDGE_USER))
    operator = await aio_pika.connect(servers.amqp_url("guest"))
    holder = Duty(queue, refresh_s=RENEW_S, renew_s=RENEW_S)
    other = Duty(queue, refresh_s=RENEW_S, renew_s=RENEW_S)
    stop = asyncio.Event()
    runs: list[asyncio.Task[None]] = []
    x_got: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        await holder.attach(holder_conn)
        await wait_for(lambda: holder.held, 10, what="the first bridge holds the duty")
        await other.attach(other_conn)
        runs = [asyncio.create_task(d.run(stop)) for d in (holder, other)]
        await wait_for(lambda: holder.renewals >= 2, 10, what="the holder renewing")
        assert not other.held

        # An operator deletes the duty queue and declares it again; a consumer of its own (X)
        # consumes it first and receives the next token.
        proxy.stall()
        channel = await operator.channel()
        await channel.queue_delete(queue)
        declared = await channel.declare_queue(queue, durable=True, arguments=DUTY_ARGS)

        async def x_keeps(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            x_got.append(message)  # kept unacknowledged, as a holder keeps its token

        await declared.consume(x_keeps)
        await channel.default_exchange.publish(aio_pika.Message(b"duty"), routing_key=queue)
        await wait_for(lambda: x_got, 10, what="X received the token")
        proxy.resume()

        # Before the fix: still True after any wait (its fresh tokens went to X).
        await wait_for(lambda: not holder.held, 6 * RENEW_S + 2, what="the old holder lets the duty go")
        # And it does not take it back while X is the active consumer (X keeps the token).
        for _ in range(int(4 * RENEW_S / 0.1)):
            assert not (holder.held and other.held), "two holders"
            assert not holder.held, "the old holder took the duty back"
            await asyncio.sleep(0.1)  # a window sampled: that nothing happens takes time to see
    finally:
        proxy.resume()
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        for d in (holder, other):
            await d.release()
        for conn in (holder_conn, other_conn, operator):
            with contextlib.suppress(Exception):
                await conn.close()
        await proxy.stop()
