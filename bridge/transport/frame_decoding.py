"""The AMQP 0-9-1 frames of the hot path, decoded in one pass: the reading side of
:mod:`bridge.transport.frames`.

aiormq hands every frame it reads to ``pamqp.frame.unmarshal``, which decodes generically: it
tries the protocol header first, instantiates the method class with its defaults (and validates
them: a regular expression on the exchange name), then walks the class's attributes, looking up
each one's AMQP type by name and dispatching to a decoder that slices a fresh copy of the rest of
the frame. A request is three frames (Basic.Deliver, its content header, its body): 16.5 us of
CPU a request that way, 9.4 us this way (``python -m benchmarks.frame_decode``; about 1% of the
bridge's CPU per request, on every request of every bridge of a fleet: ``docs/performance.md``,
"Frames read as bytes").

:func:`unmarshal` decodes those three frames directly with ``struct`` and builds the same pamqp
objects aiormq expects (so nothing downstream changes), and hands every other frame, and any of
the three it finds unusual (a property-flag continuation word, a length past the frame, bytes
left over), to pamqp unchanged: pamqp then decodes it, or raises, exactly as before. Text is
decoded as :mod:`bridge.transport.tolerant_decoding` has pamqp decode it (bytes that are not
UTF-8 kept as lone surrogates), and a headers table or a timestamp goes through pamqp's (tolerant)
decoders themselves. ``tests/unit/test_frame_decoding.py`` checks the objects field by field
against pamqp's own decoding, on generated frames.
"""

from __future__ import annotations

import struct
from typing import Any

import pamqp.frame
from pamqp import body, commands, decode, header
from pamqp.frame import FrameTypes

from bridge.transport import tolerant_decoding

__all__ = ["install", "unmarshal"]

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = 0xCE
_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_HEAD_SIZE = _HEAD.size
_DELIVER_INDEX = b"\x00\x3c\x00\x3c"  # Basic (60), Deliver (60)
_TAG = struct.Struct(">QB")  # delivery tag, the bits octet (redelivered)
_CONTENT_HEAD = struct.Struct(">HHQH")  # class, weight, body size, property flags
_BASIC = 60

_Deliver = commands.Basic.Deliver
_Properties = commands.Basic.Properties

# Basic.Properties in the order their values follow each other, with their flag and AMQP type.
_SHORTSTR, _OCTET, _TABLE, _TIMESTAMP = range(4)
_PROPERTY_LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("content_type", 0x8000, _SHORTSTR),
    ("content_encoding", 0x4000, _SHORTSTR),
    ("headers", 0x2000, _TABLE),
    ("delivery_mode", 0x1000, _OCTET),
    ("priority", 0x0800, _OCTET),
    ("correlation_id", 0x0400, _SHORTSTR),
    ("reply_to", 0x0200, _SHORTSTR),
    ("expiration", 0x0100, _SHORTSTR),
    ("message_id", 0x0080, _SHORTSTR),
    ("timestamp", 0x0040, _TIMESTAMP),
    ("message_type", 0x0020, _SHORTSTR),
    ("user_id", 0x0010, _SHORTSTR),
    ("app_id", 0x0008, _SHORTSTR),
    ("cluster_id", 0x0004, _SHORTSTR),
)
# What pamqp's ContentHeader() holds for a property its frame does not carry (its __init__'s defaults).
_PROPERTY_DEFAULTS: dict[str, Any] = {name: None for name, _, _ in _PROPERTY_LAYOUT} | {"cluster_id": ""}
_KNOWN_FLAGS = sum(flag for _, flag, _ in _PROPERTY_LAYOUT)

_pamqp_unmarshal = pamqp.frame.unmarshal
_installed = False


class _Unusual(Exception):
    """The frame is not one the fast path decodes: pamqp decodes it (or raises) instead."""


def unmarshal(data_in: bytes) -> tuple[int, int, FrameTypes]:
    """``pamqp.frame.unmarshal`` (its signature) for the one frame aiormq has read (``data_in``
    holds exactly it): (bytes consumed, channel, the frame)."""
    try:
        decoded = _fast(data_in)
    except (_Unusual, struct.error, IndexError, ValueError, TypeError):
        decoded = None  # pamqp's table or timestamp decoder raised: pamqp reports it, as before
    return decoded if decoded is not None else _pamqp_unmarshal(data_in)


def _fast(data: bytes) -> tuple[int, int, FrameTypes] | None:
    if len(data) <= _HEAD_SIZE:
        return None
    kind, channel, size = _HEAD.unpack_from(data)
    end = _HEAD_SIZE + size
    if size == 0 or len(data) != end + 1 or data[end] != FRAME_END:
        return None  # pamqp's errors for a broken frame, or a heartbeat
    if kind == FRAME_BODY:
        return end + 1, channel, body.ContentBody(data[_HEAD_SIZE:end])
    if kind == FRAME_HEADER:
        return end + 1, channel, _content_header(data, _HEAD_SIZE, end)
    if kind == FRAME_METHOD and data[_HEAD_SIZE : _HEAD_SIZE + 4] == _DELIVER_INDEX:
        return end + 1, channel, _deliver(data, _HEAD_SIZE + 4, end)
    return None


def _short_str(data: bytes, at: int, end: int) -> tuple[int, str]:
    length = data[at]
    stop = at + 1 + length
    if stop > end:
        raise _Unusual
    # As tolerant_decoding.short_str: UTF-8, and bytes that are not kept as lone surrogates
    # (identical to a strict decode wherever that succeeds).
    return stop, data[at + 1 : stop].decode("utf-8", "surrogateescape")


def _deliver(data: bytes, at: int, end: int) -> commands.Basic.Deliver:
    at, consumer_tag = _short_str(data, at, end)
    if at + _TAG.size > end:
        raise _Unusual
    delivery_tag, bits = _TAG.unpack_from(data, at)
    at, exchange = _short_str(data, at + _TAG.size, end)
    at, routing_key = _short_str(data, at, end)
    if at != end:
        raise _Unusual
    # As pamqp decodes a method: its attributes set, its constructor's validation not run.
    frame = _Deliver.__new__(_Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = bool(bits & 1)
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _content_header(data: bytes, at: int, end: int) -> header.ContentHeader:
    if at + _CONTENT_HEAD.size > end:
        raise _Unusual
    class_id, weight, body_size, flags = _CONTENT_HEAD.unpack_from(data, at)
    if class_id != _BASIC or flags & ~_KNOWN_FLAGS:
        raise _Unusual  # another class, a continuation word or reserved bits: pamqp's own reading
    at += _CONTENT_HEAD.size
    values = dict(_PROPERTY_DEFAULTS)
    for name, flag, kind in _PROPERTY_LAYOUT:
        if not flags & flag:
            continue
        if kind == _SHORTSTR:
            at, values[name] = _short_str(data, at, end)
        elif kind == _OCTET:
            if at >= end:
                raise _Unusual
            values[name] = data[at]
            at += 1
        else:
            # A table or a timestamp: pamqp's decoders (made tolerant), looked up as pamqp does.
            decoder = decode.field_table if kind == _TABLE else decode.timestamp
            consumed, values[name] = decoder(data[at:end])
            at += consumed
            if at > end:
                raise _Unusual
    if at != end:
        raise _Unusual
    properties = _Properties.__new__(_Properties)
    for name, value in values.items():
        setattr(properties, name, value)
    frame = header.ContentHeader.__new__(header.ContentHeader)
    frame.class_id = class_id
    frame.weight = weight
    frame.body_size = body_size
    frame.properties = properties
    return frame


def install() -> None:
    """Decode aiormq's frames with :func:`unmarshal`, for every connection of the process. Once,
    before the first connection; the tolerant decoders first (text and tables decode as they
    have pamqp decode them). Idempotent."""
    global _installed
    if _installed:
        return
    tolerant_decoding.install()
    pamqp.frame.unmarshal = unmarshal
    _installed = True
