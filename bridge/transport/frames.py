"""The AMQP 0-9-1 frames of the hot path (a publish, an ack), encoded in one pass and queued on
aiormq's connection writer as they are.

Why not ``aiormq.Channel.basic_publish``: pamqp encodes a publish generically. It builds a method
object and a properties object, visits all fourteen properties and dispatches each value by its
AMQP type, marshals three frames through three calls, and aiormq copies them into one buffer.
Profiled under extends at concurrency 1, that was the largest single item of the bridge's CPU per
request (``docs/performance.md``, "The request path on aiormq, and frames written as bytes"). A
reply, a hint and an ack always have the same few fields, so they are written here with ``struct``;
``tests/unit/test_frames.py`` checks every byte against pamqp's own encoding.

What the bridge still leaves to aiormq: the channel (its number, open or closed), the connection's
write queue (order and backpressure: a full queue makes the caller wait, as aiormq's publish
does) and everything rarer than one message per request (declarations, gets, cancels, nacks,
publishes with confirms).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError
from pamqp import encode

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b"\xce"
FRAME_OVERHEAD = 8  # type, channel, size (7 bytes) and the end octet
BASIC = 60
BASIC_PUBLISH = 40
BASIC_ACK = 80
BASIC_REJECT = 90
BASIC_NACK = 120

_FRAME_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_PUBLISH_HEAD = struct.pack(">HHH", BASIC, BASIC_PUBLISH, 0)  # class, method, reserved (ticket)
_CONTENT_HEAD = struct.Struct(">HHQH")  # class, weight (0), body size, property flags
_ACK = struct.Struct(">BHIHHQB")  # frame head, class, method, delivery tag, multiple
_ACK_SIZE = _ACK.size - _FRAME_HEAD.size
_EMPTY_TABLE = b"\x00\x00\x00\x00"

# Basic.Properties flags, in the order their values follow each other in a content header.
_CONTENT_TYPE = 0x8000
_HEADERS = 0x2000
_DELIVERY_MODE = 0x1000
_PRIORITY = 0x0800
_CORRELATION_ID = 0x0400
_EXPIRATION = 0x0100
_MESSAGE_ID = 0x0080
_MESSAGE_TYPE = 0x0020
_USER_ID = 0x0010

Properties = tuple[int, bytes]  # (property flags, the values encoded)


def short_string(value: str) -> bytes:
    # surrogateescape: a request's correlation-id that is not UTF-8 was decoded to lone surrogates
    # (bridge.transport.tolerant_decoding); its reply echoes the very bytes the requester sent.
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > 255:
        raise ValueError(f"an AMQP short string is at most 255 bytes, got {len(raw)}")
    return bytes((len(raw),)) + raw


def properties(
    *,
    content_type: str | None = None,
    headers: Mapping[str, Any] | None = None,
    delivery_mode: int | None = None,
    priority: int | None = None,
    correlation_id: str | None = None,
    expiration: str | None = None,
    message_id: str | None = None,
    message_type: str | None = None,
    user_id: str | None = None,
) -> Properties:
    """The content header's properties. As in pamqp: a string is sent unless None or empty, a
    number or a table unless None (an empty table is sent as one)."""
    flags = 0
    parts: list[bytes] = []
    if content_type:
        flags |= _CONTENT_TYPE
        parts.append(short_string(content_type))
    if headers is not None:
        flags |= _HEADERS
        parts.append(encode.field_table(dict(headers)) if headers else _EMPTY_TABLE)
    if delivery_mode is not None:
        flags |= _DELIVERY_MODE
        parts.append(bytes((delivery_mode,)))
    if priority is not None:
        flags |= _PRIORITY
        parts.append(bytes((priority,)))
    texts = ((_CORRELATION_ID, correlation_id), (_EXPIRATION, expiration), (_MESSAGE_ID, message_id))
    for flag, text in (*texts, (_MESSAGE_TYPE, message_type), (_USER_ID, user_id)):
        if text:
            flags |= flag
            parts.append(short_string(text))
    return flags, b"".join(parts)


def publish(
    channel: int, routing_key: str, body: bytes, props: Properties, *, frame_max: int, exchange: str = ""
) -> bytes:
    """Basic.Publish (neither mandatory nor immediate), its content header and its body frames
    (the body split at the connection's ``frame_max``, as aiormq splits it)."""
    method = b"".join((_PUBLISH_HEAD, short_string(exchange), short_string(routing_key), b"\x00"))
    flags, values = props
    header = _CONTENT_HEAD.pack(BASIC, 0, len(body), flags) + values
    out = [
        _FRAME_HEAD.pack(FRAME_METHOD, channel, len(method)),
        method,
        FRAME_END,
        _FRAME_HEAD.pack(FRAME_HEADER, channel, len(header)),
        header,
        FRAME_END,
    ]
    step = frame_max - FRAME_OVERHEAD if frame_max > FRAME_OVERHEAD else len(body) or 1  # 0: no limit
    for start in range(0, len(body), step):
        chunk = body[start : start + step]
        out += (_FRAME_HEAD.pack(FRAME_BODY, channel, len(chunk)), chunk, FRAME_END)
    return b"".join(out)


def ack(channel: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    return _ACK.pack(FRAME_METHOD, channel, _ACK_SIZE, BASIC, BASIC_ACK, delivery_tag, multiple) + FRAME_END


def nack(channel: int, delivery_tag: int, *, requeue: bool, multiple: bool = False) -> bytes:
    """Basic.Nack: the same layout as an ack, its two bits in one octet (multiple, requeue)."""
    bits = int(multiple) | int(requeue) << 1
    return _ACK.pack(FRAME_METHOD, channel, _ACK_SIZE, BASIC, BASIC_NACK, delivery_tag, bits) + FRAME_END


def reject(channel: int, delivery_tag: int, *, requeue: bool) -> bytes:
    return _ACK.pack(FRAME_METHOD, channel, _ACK_SIZE, BASIC, BASIC_REJECT, delivery_tag, requeue) + FRAME_END


def closing(channel: aiormq.Channel) -> bool:
    """The channel is closed or being closed, as aiormq's own methods judge it before they write.

    ``is_closed`` alone is not enough: when the broker closes a channel (a 404 on a deleted hint
    queue), aiormq queues its Channel.CloseOk at once but marks the channel closed only a few
    awaits later. A frame queued in between reaches the broker after the CloseOk, on a channel it
    has closed, and the broker closes the whole connection (504 CHANNEL_ERROR - expected
    'channel.open'): every channel and every reply in flight (seen once in CI). aiormq checks its
    close event; this does the same (private names of the pinned aiormq 7: tests/unit/test_frames.py checks them)."""
    if channel.is_closed or getattr(channel, "_close_exception", None) is not None:
        return True
    event = getattr(channel, "_Channel__close_event", None)
    return bool(event is not None and event.is_set())


async def write(channel: aiormq.Channel, frames: bytes) -> None:
    """Queue ``frames`` on the channel's connection, in order with everything aiormq queues, without
    waiting for the socket. A channel closed or being closed raises, as aiormq's own methods do.

    The queue holds 10 frames and only the connection's writer takes them out; a writer waiting
    for the socket (the broker stopped reading it: a resource alarm, a dead link) leaves it full,
    and a write then waits for room. That wait ends with the channel too: once the connection
    closes nothing takes from this queue again, and a write waiting on it alone never returned
    (adds waiting to publish their hints held every add slot of the bridge, their deliveries
    unacked on a healthy connection, until the broker's consumer timeout). A write cancelled as its
    room came may have been queued all the same, as a frame handed to a socket may have gone out:
    the callers settle their delivery before they write its ack, and hints are fenced."""
    if closing(channel):
        raise ChannelInvalidStateError(f"{channel!r} closed")
    frame = ChannelFrame(payload=frames, should_close=False)
    queue = channel.write_queue
    if not queue.full():
        await queue.put(frame)  # the common case: room, so queued without waiting
        return
    closed = channel.closing  # an observer: cancelling it leaves the channel alone
    putting = asyncio.ensure_future(queue.put(frame))
    try:
        await asyncio.wait({putting, closed}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        putting.cancel()
        raise
    finally:
        closed.cancel()
    if putting.done():
        putting.result()  # queued
        return
    putting.cancel()
    raise ChannelInvalidStateError(f"{channel!r} closed while its frames waited for the connection's writer")


async def publish_on(
    channel: aiormq.Channel, routing_key: str, body: bytes, props: Properties, *, exchange: str = ""
) -> None:
    """:func:`publish` on ``channel``, which must not be in confirm mode: a confirm channel counts
    its publishes, and this one would not be counted."""
    assert not channel.publisher_confirms, "a confirm channel's publishes go through aiormq"
    frame_max = channel.connection.connection_tune.frame_max
    await write(channel, publish(channel.number, routing_key, body, props, frame_max=frame_max, exchange=exchange))
