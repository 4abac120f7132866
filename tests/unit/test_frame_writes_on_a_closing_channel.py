"""A frame written as bytes on a channel the broker is closing (bridge.transport.frames.write).

When the broker closes a channel (a 404 on a hint queue an operator deleted), aiormq queues its
Channel.CloseOk at once and marks the channel closed only a few awaits later. A frame the bridge
queued in between reached the broker after the CloseOk, on a channel it had closed, and the
broker closed the bridge's whole connection (504 CHANNEL_ERROR - expected 'channel.open'; seen
once in a CI run of test_hint_recovery.py). A real aiormq Channel, driven by a broker's Close."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiormq
import pytest
from aiormq.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity
from pamqp import commands as spec

from bridge.transport import frames

pytestmark = pytest.mark.anyio


class _Connector(aiormq.base.Base):
    """What aiormq.Channel reads of its connection."""

    def __init__(self) -> None:
        super().__init__(loop=asyncio.get_running_loop())
        self.connection_tune = SimpleNamespace(frame_max=131_072, heartbeat=0)
        self.publisher_confirms = True
        self.write_queue: asyncio.Queue[object] = asyncio.Queue()
        self.is_opened = True

    async def _on_close(self, exc: object = None) -> None:
        return None

    def __str__(self) -> str:
        return "connector"


async def test_no_frame_is_queued_after_the_close_ok_of_a_channel_the_broker_closed() -> None:
    connector = _Connector()
    channel = aiormq.Channel(connector, number=7, publisher_confirms=False)  # type: ignore[arg-type]
    assert not frames.closing(channel)
    await frames.write(channel, b"before")
    close = spec.Channel.Close(reply_code=404, reply_text="NOT_FOUND", class_id=60, method_id=70)
    with pytest.raises(ChannelNotFoundEntity):
        await channel._on_close_frame(close)  # what aiormq's reader does with the broker's Close
    assert connector.write_queue.qsize() == 2, "the frame, then the CloseOk"
    # The window: CloseOk queued, the channel not yet marked closed.
    assert not channel.is_closed
    assert frames.closing(channel)
    with pytest.raises(ChannelInvalidStateError):
        await frames.write(channel, b"after")
    assert connector.write_queue.qsize() == 2, "nothing queued after the CloseOk"
    await channel.close()


async def test_a_write_waiting_for_room_on_a_connection_that_closes_ends() -> None:
    """aiormq's write queue holds 10 frames and only the connection's writer takes them out. A
    writer stuck on the socket (the broker stopped reading it: a resource alarm, a dead link)
    leaves a full queue, and a write waited for room without end: once the connection closed
    nothing took from that queue again. Adds waiting to publish their hints held every add slot of
    the bridge (their deliveries unacked on a healthy connection) until the broker's consumer
    timeout, 30 minutes. Found by review. Now the channel's close ends the wait."""
    connector = _Connector()
    connector.write_queue = asyncio.Queue(maxsize=1)
    channel = aiormq.Channel(connector, number=7, publisher_confirms=False)  # type: ignore[arg-type]
    await frames.write(channel, b"fills the queue")
    waiting = asyncio.ensure_future(frames.write(channel, b"waits for room"))
    await asyncio.sleep(0)
    assert not waiting.done(), "the queue is full: the write waits"
    await connector.close(ConnectionError("the connection is gone"))  # as aiormq's reader does
    with pytest.raises(ChannelInvalidStateError):
        await asyncio.wait_for(waiting, 5)
    assert connector.write_queue.qsize() == 1, "nothing queued on the closed connection"


async def test_a_write_waiting_for_room_is_queued_when_the_writer_takes_a_frame() -> None:
    connector = _Connector()
    connector.write_queue = asyncio.Queue(maxsize=1)
    channel = aiormq.Channel(connector, number=7, publisher_confirms=False)  # type: ignore[arg-type]
    await frames.write(channel, b"first")
    waiting = asyncio.ensure_future(frames.write(channel, b"second"))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert connector.write_queue.get_nowait().payload == b"first"  # the writer takes one
    await asyncio.wait_for(waiting, 5)
    assert connector.write_queue.get_nowait().payload == b"second"
    await connector.close()


@pytest.mark.parametrize("settle", ["nack", "reject"])
async def test_a_refused_request_waiting_for_room_on_a_connection_that_closes_ends(settle: str) -> None:
    """A request refused (dead-lettered) or requeued went through aiormq's basic_reject and
    basic_nack, whose wait for room in a full write queue never ended once the connection closed:
    the request's task stayed in flight and every later graceful stop waited its whole grace
    (found by review, 2026-12-06). Written as bytes, as acks are, the close ends the wait."""
    from aiormq.abc import DeliveredMessage

    from bridge.transport.request import Delivery

    connector = _Connector()
    connector.write_queue = asyncio.Queue(maxsize=1)
    channel = aiormq.Channel(connector, number=7, publisher_confirms=False)  # type: ignore[arg-type]
    await frames.write(channel, b"fills the queue")
    deliver = spec.Basic.Deliver(consumer_tag="c", delivery_tag=3, routing_key="fetch")
    header = SimpleNamespace(properties=spec.Basic.Properties())
    delivery = Delivery(DeliveredMessage(deliver, header, b"{}", channel))  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(getattr(delivery, settle)())
    await asyncio.sleep(0)
    assert not waiting.done(), "the queue is full: the settle waits"
    await connector.close(ConnectionError("the connection is gone"))
    with pytest.raises(ChannelInvalidStateError):
        await asyncio.wait_for(waiting, 5)
