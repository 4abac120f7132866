"""Decoding whatever content header a client sends, so that one request cannot close the
bridge's connection.

aiormq decodes every frame with pamqp in the connection's reader task. pamqp 4 raises on three
things any AMQP client can put in a message (RabbitMQ passes them on unchecked):

* a short string that is not UTF-8: a property (``correlation-id``, ``reply-to``, ``message-id``,
  ``user-id``, ...) or the routing key;
* a field-table key that is not UTF-8: the name of an application header;
* a ``timestamp`` past what ``datetime`` holds (after the year 9999);
* tables or arrays nested some hundreds deep in an application header (3.5 kB of them): pamqp
  decodes them recursively, two Python frames a level, and runs out of stack (``RecursionError``).

The error leaves the reader as ``InvalidFrameError`` and closes the whole connection: every
channel, every reply in flight. The request is still unacknowledged, so the broker delivers it
again as soon as the robust connection is back, and the bridge (or any bridge of the fleet that
takes it) goes down again, for ever.

:func:`install` makes those decoders total, before the bridge connects: text that is not UTF-8
is decoded with ``surrogateescape`` (a ``str`` that still holds the exact bytes), and a timestamp
past ``datetime.max`` is clamped to it (it then reads as the latest time the bridge can hold,
as a far-future timestamp already does), and a table or array nested deeper than
:data:`MAX_DEPTH` is skipped whole, by its length, and its header's value reads as
:data:`TOO_DEEP`. The request reaches the handlers, where
:func:`bridge.transport.envelope.check_text` refuses such text as ``bad_request`` and the
delivery is settled like any other bad input. pamqp's short-string encoder gets the same error
handler, as :func:`bridge.transport.frames.short_string` has, so that a reply echoes such a
``correlation-id`` byte for byte on every channel.

A frame pamqp could decode decodes exactly as before (but for a nested value running past its
container, which RabbitMQ does not deliver: see ``_value_at``): the wrappers only act where
pamqp raised.
"""

from __future__ import annotations

import datetime
import struct
from importlib.metadata import version
from typing import Any, cast

from pamqp import common, decode, encode

__all__ = [
    "LATEST",
    "MAX_DEPTH",
    "TOO_DEEP",
    "TooDeep",
    "field_array",
    "field_table",
    "install",
    "short_str",
    "short_string",
    "timestamp",
]

#: What a timestamp past ``datetime.max`` decodes to.
LATEST = datetime.datetime.max.replace(tzinfo=datetime.UTC)
#: :func:`field_table` is pamqp 4's with one change: another major version needs it checked again.
PAMQP_MAJOR = "4"

#: How deep tables and arrays may nest in a content header (no client needs more than a few).
MAX_DEPTH = 32


class TooDeep:
    """What a header whose value nests tables or arrays past :data:`MAX_DEPTH` decodes to."""

    def __repr__(self) -> str:
        return f"<nested deeper than {MAX_DEPTH} levels>"


TOO_DEEP = TooDeep()

_pamqp_short_str = decode.short_str
_pamqp_timestamp = decode.timestamp
_pamqp_short_string = encode.short_string
_installed = False
_depth = 0  # tables and arrays being decoded, outermost first (decoding is synchronous)


def short_str(value: bytes) -> tuple[int, str]:
    """pamqp's ``decode.short_str``, keeping bytes that are not UTF-8 as lone surrogates."""
    try:
        return _pamqp_short_str(value)
    except UnicodeDecodeError:  # the length octet was read: only the text is not UTF-8
        length = value[0]
        return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")


def timestamp(value: bytes) -> tuple[int, datetime.datetime]:
    """pamqp's ``decode.timestamp``, clamping a time ``datetime`` cannot hold to :data:`LATEST`."""
    try:
        return _pamqp_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise  # cut short: a broken frame, which pamqp reports as such
        return 8, LATEST


# Each field value's size after its type octet: fixed, or a 4-byte length and that many bytes.
_FIXED_SIZE = {
    b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"f": 4,
    b"D": 5, b"l": 8, b"L": 8, b"d": 8, b"T": 8, b"V": 0, b"\x00": 0,
}  # fmt: skip
_LENGTH_PREFIXED = frozenset((b"S", b"x", b"A", b"F"))
# Up to this many bytes left, a value gets the rest as pamqp gives it: copying that little costs
# less than working out the value's size, and the copying stays linear in the header's size.
_SMALL_REST = 512


def _value_at(value: bytes, offset: int) -> bytes:
    """The bytes of the field value at ``offset`` (its type octet first), as pamqp's decoder of
    that type reads them. pamqp hands each value the whole rest of the frame (``value[offset:]``,
    then ``[1:]`` again inside ``embedded_value``): two copies of up to 128 KiB per value, so a
    header holding an array of 130,000 one-byte values cost 0.38 s of the event loop to decode
    (found by review). Decoders read only their own bytes, so the slice decodes the same; one
    running past the data gets the rest, as before, and reports it the same way. One difference:
    a value inside a nested table or array that runs past its container's declared end is cut
    there (an error), where pamqp read on into the bytes after the container. RabbitMQ does not
    deliver such a header: it closes the publisher's connection (INTERNAL_ERROR, tried on 3.10)."""
    if len(value) - offset <= _SMALL_REST:
        return value[offset:]  # a short rest (every request's own headers): copied whole, as pamqp does
    kind = value[offset : offset + 1]
    size = _FIXED_SIZE.get(kind)
    if size is None:
        if kind in _LENGTH_PREFIXED and offset + 5 <= len(value):
            size = 4 + int.from_bytes(value[offset + 1 : offset + 5], "big")
        elif kind in _LENGTH_PREFIXED:
            size = len(value)  # its length cut short: the decoder reports it
        else:
            size = 0  # a type octet pamqp does not know: reported from the octet alone
    return value[offset : offset + 1 + size]


def field_table(value: bytes) -> tuple[int, common.FieldTable | TooDeep]:
    """pamqp 4's ``decode.field_table``, but a key (a header's name) that is not UTF-8 is kept as
    lone surrogates, and a table nested past :data:`MAX_DEPTH` is skipped (:func:`_nested`). A
    copy, because pamqp decodes the keys inline."""

    def entries(value: bytes, end: int) -> common.FieldTable | TooDeep:
        offset = 4
        data: common.FieldTable = {}
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "surrogateescape")
            offset += key_length
            # Looked up at call time: a nested table or a timestamp value comes back here.
            result: Any
            consumed, result = decode.embedded_value(_value_at(value, offset))
            offset += consumed
            if isinstance(result, TooDeep) and _depth > 1:
                return TOO_DEEP  # the whole nested table stands for it, up to the header's value
            data[key] = result  # TOO_DEEP here: a header's value, which check_text refuses
        return data

    return _nested(value, "table", entries)


def field_array(value: bytes) -> tuple[int, common.FieldArray | TooDeep]:
    """pamqp 4's ``decode.field_array``, but an array nested past :data:`MAX_DEPTH` is skipped."""

    def items(value: bytes, end: int) -> common.FieldArray | TooDeep:
        offset = 4
        data: common.FieldArray = []
        while offset < end:
            result: Any
            consumed, result = decode.embedded_value(_value_at(value, offset))
            offset += consumed
            if isinstance(result, TooDeep):
                return TOO_DEEP
            data.append(result)
        return data

    return _nested(value, "array", items)


def _nested(value: bytes, what: str, decode_entries: Any) -> tuple[int, Any]:
    """Decode a table or an array (length-prefixed) one level deeper; past :data:`MAX_DEPTH`,
    skip it by its length: :data:`TOO_DEEP`."""
    global _depth
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        end = 4 + length
        if end > len(value):
            raise ValueError(f"Field {what} length exceeds available data")
        if _depth >= MAX_DEPTH:
            return end, TOO_DEEP
        _depth += 1
        try:
            return end, decode_entries(value, end)
        finally:
            _depth -= 1
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def short_string(value: str) -> bytes:
    """pamqp's ``encode.short_string``, writing text :func:`short_str` decoded back to its bytes."""
    try:
        return _pamqp_short_string(value)
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")  # other lone surrogates still raise
        if len(raw) > 255:
            raise TypeError("string exceeds maximum length of 255 bytes") from None
        return bytes((len(raw),)) + raw


def install() -> None:
    """Put the tolerant decoders in pamqp's place, for every connection of the process. Once,
    before the first connection: idempotent."""
    global _installed
    if _installed:
        return
    found = version("pamqp")
    if found.split(".")[0] != PAMQP_MAJOR:
        raise RuntimeError(
            f"pamqp {found}: bridge.transport.tolerant_decoding copies pamqp {PAMQP_MAJOR}'s field_table; "
            "check it against this version"
        )
    # pamqp reaches its decoders through these tables (Basic.Properties and method frames by
    # AMQP type name, field tables by type octet) as well as by module attribute.
    decode.short_str = short_str
    decode.timestamp = timestamp
    # Typed for pamqp as any decoder: TOO_DEEP is a value pamqp does not know (check_text refuses it).
    table, array = cast(Any, field_table), cast(Any, field_array)
    decode.field_table = table
    decode.field_array = array
    decode.METHODS.update(shortstr=short_str, table=table, timestamp=timestamp)
    decode.TABLE_MAPPING.update({b"F": table, b"A": array, b"T": timestamp})
    encode.short_string = short_string
    encode.METHODS["shortstr"] = short_string
    _installed = True
