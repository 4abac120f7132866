"""The hot path's frame decoder (bridge.transport.frame_decoding) reads every frame exactly as pamqp
(made tolerant, as the bridge runs it) does: the same objects, field by field, or, for a frame it
does not take, the same error; generated frames, and bytes no client should send."""

from __future__ import annotations

import datetime
import re
import struct
from typing import Any

import aiormq.connection
import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from bridge.transport import frame_decoding, tolerant_decoding

pamqp_unmarshal = frame_decoding._pamqp_unmarshal  # pamqp's own, as it was before any install

short_text = st.text(max_size=40)
maybe_text = st.none() | short_text
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | short_text
header_values = (
    scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=5), scalars, max_size=3)
)
tables = st.none() | st.dictionaries(st.text(min_size=1, max_size=12), header_values, max_size=5)
timestamps = st.none() | st.integers(0, 2**32 - 1).map(lambda s: datetime.datetime.fromtimestamp(s, tz=datetime.UTC))


@pytest.fixture(autouse=True, scope="module")
def tolerant() -> None:
    tolerant_decoding.install()  # as the bridge runs: frame_decoding.install() installs it first


def fields(frame: Any) -> dict[str, Any]:
    """Everything aiormq reads of a decoded frame."""
    if isinstance(frame, ContentHeader):
        props = {name: getattr(frame.properties, name) for name in Basic.Properties.__slots__}
        return {"type": "header", "class_id": frame.class_id, "weight": frame.weight, "size": frame.body_size, **props}
    if isinstance(frame, ContentBody):
        return {"type": "body", "value": frame.value}
    names = getattr(frame, "__slots__", None) or vars(frame)
    return {"type": type(frame).__name__, **{name: getattr(frame, name) for name in names}}


def without_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # the failing frame object's repr


def same_as_pamqp(data: bytes) -> None:
    expected: Any
    try:
        expected = pamqp_unmarshal(data)
    except UnmarshalingException as exc:
        expected = exc
    if isinstance(expected, UnmarshalingException):
        with pytest.raises(UnmarshalingException) as raised:
            frame_decoding.unmarshal(data)
        assert without_addresses(str(raised.value)) == without_addresses(str(expected))
        return
    got = frame_decoding.unmarshal(data)
    assert got[:2] == expected[:2]
    assert type(got[2]) is type(expected[2])
    assert fields(got[2]) == fields(expected[2])


@given(
    channel=st.integers(1, 2047),
    consumer_tag=short_text,
    delivery_tag=st.integers(0, 2**63 - 1),  # pamqp writes it signed
    redelivered=st.booleans(),
    exchange=st.sampled_from(["", "amq.direct", "qb.requests"]),
    routing_key=short_text,
)
def test_a_deliver_reads_as_pamqp_reads_it(
    channel: int, consumer_tag: str, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str
) -> None:
    method = Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    data = pamqp.frame.marshal(method, channel)
    same_as_pamqp(data)
    _, _, got = frame_decoding._fast(data) or (None, None, None)
    assert isinstance(got, Basic.Deliver), "the fast path took it"


@given(
    channel=st.integers(1, 2047),
    body_size=st.integers(0, 2**40),
    content_type=maybe_text,
    content_encoding=maybe_text,
    headers=tables,
    delivery_mode=st.none() | st.sampled_from([1, 2]),  # what pamqp lets one write
    priority=st.none() | st.integers(0, 9),
    correlation_id=maybe_text,
    reply_to=maybe_text,
    expiration=maybe_text,
    message_id=maybe_text,
    timestamp=timestamps,
    message_type=maybe_text,
    user_id=maybe_text,
    app_id=maybe_text,
)
def test_a_content_header_reads_as_pamqp_reads_it(channel: int, body_size: int, **props: Any) -> None:
    frame = ContentHeader(body_size=body_size, properties=Basic.Properties(**props))
    data = pamqp.frame.marshal(frame, channel)
    same_as_pamqp(data)
    _, _, got = frame_decoding._fast(data) or (None, None, None)
    assert isinstance(got, ContentHeader), "the fast path took it"


@given(channel=st.integers(0, 2047), value=st.binary(min_size=1, max_size=2000))
def test_a_body_reads_as_pamqp_reads_it(channel: int, value: bytes) -> None:
    data = pamqp.frame.marshal(ContentBody(value), channel)
    same_as_pamqp(data)


def raw_frame(kind: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + end


def short(raw: bytes) -> bytes:
    return bytes((len(raw),)) + raw


def test_text_that_is_not_utf8_reads_as_the_tolerant_decoders_read_it() -> None:
    bad = b"\xff\xfe-id"
    deliver = raw_frame(1, 3, b"\x00\x3c\x00\x3c" + short(bad) + struct.pack(">QB", 7, 1) + short(b"") + short(bad))
    same_as_pamqp(deliver)
    props = short(b"application/json") + short(bad)  # content type, correlation id
    content = raw_frame(2, 3, struct.pack(">HHQH", 60, 0, 5, 0x8000 | 0x0400) + props)
    same_as_pamqp(content)
    _, _, frame = frame_decoding.unmarshal(content)
    assert frame.properties.correlation_id.encode("utf-8", "surrogateescape") == bad


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"AMQP\x00\x00\x09\x01", id="protocol header"),
        pytest.param(pamqp.frame.marshal(Heartbeat(), 0), id="heartbeat"),
        pytest.param(pamqp.frame.marshal(Basic.Ack(5, multiple=True), 1), id="other method"),
        pytest.param(pamqp.frame.marshal(commands.Channel.CloseOk(), 1), id="close-ok"),
        pytest.param(raw_frame(1, 1, b"\x00\x3c\x00\x3c" + short(b"tag")), id="deliver cut short"),
        pytest.param(raw_frame(3, 1, b"body", end=b"\x00"), id="bad frame end"),
        pytest.param(raw_frame(2, 1, struct.pack(">HHQH", 60, 0, 1, 0x8000) + b"\x09ab"), id="string past frame"),
        pytest.param(raw_frame(2, 1, struct.pack(">HHQH", 60, 0, 1, 0x0001) + b"\x00\x00"), id="flag continuation"),
        pytest.param(raw_frame(2, 1, struct.pack(">HHQH", 50, 0, 1, 0)), id="another class"),
        pytest.param(raw_frame(2, 1, struct.pack(">HHQH", 60, 0, 1, 0x2000) + b"\x00\x00\x00\x09xx"), id="bad table"),
        pytest.param(raw_frame(2, 1, struct.pack(">HHQH", 60, 0, 1, 0x0040) + b"\x00\x01"), id="short timestamp"),
        pytest.param(raw_frame(2, 1, struct.pack(">HHQH", 60, 0, 1, 0x0040) + b"\xff" * 8), id="far timestamp"),
        pytest.param(raw_frame(2, 1, struct.pack(">HHQH", 60, 0, 1, 0x8000) + short(b"x") + b"!"), id="left over"),
        pytest.param(raw_frame(3, 1, b""), id="empty body frame"),
    ],
)
def test_unusual_frames_read_or_fail_as_pamqp_reads_them(data: bytes) -> None:
    same_as_pamqp(data)


@given(st.binary(min_size=8, max_size=80))
def test_any_bytes_read_or_fail_as_pamqp_reads_them(data: bytes) -> None:
    # Framed as aiormq frames them (7-byte head, payload, end octet), with payloads no client sends.
    kind = data[0] % 4
    same_as_pamqp(raw_frame(kind or 1, 1, b"\x00\x3c\x00\x3c" + data[1:] if kind == 0 else data[1:]))


def test_install_puts_it_where_aiormq_reads_frames() -> None:
    original = pamqp.frame.unmarshal
    try:
        frame_decoding.install()
        assert aiormq.connection.pamqp.frame.unmarshal is frame_decoding.unmarshal
        assert frame_decoding._installed
    finally:
        pamqp.frame.unmarshal = original
        frame_decoding._installed = False
