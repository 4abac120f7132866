"""B-rpc's echo server: the bridge's AMQP request/reply path with no work in between.

It mirrors ``bridge.transport.amqp.AmqpTransport``: a consuming channel with the bridge's prefetch
and no confirms, a durable queue bound to a direct exchange, and a reply channel without publisher
confirms on which the reply goes (not mandatory) to the request's ``reply_to`` (direct reply-to)
before the request is acked. As the bridge does since it moved its request path off aio-pika, the
deliveries are consumed on aiormq's channel and the reply and the ack are written as frames
(``bridge.transport.frames``), and the frames read are decoded as the bridge decodes them
(``bridge.transport.frame_decoding``): on aio-pika's path (``QB_ECHO_PATH=aio-pika``, the echo until
2026-12-06) each request cost the echo about 0.1 ms of CPU more than the bridge's own transport,
which raised B-rpc and flattered every ratio measured against it (found by review).
The client side is ``bridge.client.RpcClient`` itself, so B-rpc is the floor of any fetch or ack.

Run by the benchmark runner as ``python -m benchmarks.echo`` with QB_ECHO_* in the environment.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from bridge.transport import frame_decoding, frames


async def serve(url: str, exchange: str, queue: str, prefetch: int, path: str) -> None:
    if path != "aio-pika":
        frame_decoding.install()  # as the bridge reads its frames (since 2026-12-07)
    connection = await aio_pika.connect_robust(url, client_properties={"connection_name": "qb-bench-echo"})
    consume = await connection.channel(publisher_confirms=False)
    await consume.set_qos(prefetch_count=prefetch)
    replies = await connection.channel(publisher_confirms=False)
    ex = await consume.declare_exchange(exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    q = await consume.declare_queue(queue, durable=True)
    await q.bind(ex, routing_key="echo")

    async def on_request(message: AbstractIncomingMessage) -> None:
        if message.reply_to:
            reply = aio_pika.Message(
                message.body,
                content_type="application/json",
                correlation_id=message.correlation_id,
                type="result",
                headers={},
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            )
            await replies.default_exchange.publish(reply, routing_key=message.reply_to, mandatory=False)
        await message.ack()

    if path == "aio-pika":
        await q.consume(on_request)
    else:
        consuming = await consume.get_underlay_channel()
        replying = await replies.get_underlay_channel()

        async def on_delivery(delivered: DeliveredMessage) -> None:
            reply_to = delivered.header.properties.reply_to
            if reply_to:
                flags, values = frames.properties(
                    content_type="application/json",
                    headers={},
                    delivery_mode=1,
                    correlation_id=delivered.header.properties.correlation_id,
                    message_type="result",
                )
                await frames.publish_on(replying, reply_to, delivered.body, (flags, values))
            await frames.write(consuming, frames.ack(consuming.number, delivered.delivery.delivery_tag))

        await consuming.basic_consume(queue, on_delivery)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("echo ready", flush=True)
    await stop.wait()
    await connection.close()


def main() -> None:
    coro = serve(
        os.environ["QB_ECHO_URL"],
        os.environ["QB_ECHO_EXCHANGE"],
        os.environ["QB_ECHO_QUEUE"],
        int(os.environ.get("QB_ECHO_PREFETCH", "64")),
        os.environ.get("QB_ECHO_PATH", "aiormq"),
    )
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
