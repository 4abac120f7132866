"""The hot path's hand-written AMQP frames (bridge.transport.frames) are byte for byte what pamqp,
the library aiormq encodes with, writes for the same publish or ack; and pamqp reads them back."""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.transport import frames

short_text = st.text(max_size=40)
maybe_text = st.none() | short_text
header_values = st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1) | short_text
tables = st.none() | st.dictionaries(st.text(min_size=1, max_size=12), header_values, max_size=4)


def pamqp_publish(
    channel: int, routing_key: str, body: bytes, props: Basic.Properties, frame_max: int, exchange: str = ""
) -> bytes:
    """What aiormq's ``basic_publish`` queues: the method, the header and the body split as it splits."""
    parts: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key),
        ContentHeader(properties=props, body_size=len(body)),
    ]
    max_content = frame_max - frames.FRAME_OVERHEAD
    if body and len(body) < max_content:
        parts.append(ContentBody(body))
    elif body:
        parts += map(ContentBody, iter(partial(io.BytesIO(body).read, max_content), b""))
    return b"".join(pamqp.frame.marshal(p, channel) for p in parts)


@given(
    channel=st.integers(1, 2047),
    routing_key=short_text,
    body=st.binary(max_size=300),
    frame_max=st.sampled_from([4096, 131072]) | st.integers(40, 200),
    content_type=maybe_text,
    headers=tables,
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    correlation_id=maybe_text,
    expiration=st.none() | st.integers(0, 10**9).map(str),
    message_id=maybe_text,
    message_type=maybe_text,
    user_id=maybe_text,
)
def test_a_publish_is_what_pamqp_writes(
    channel: int,
    routing_key: str,
    body: bytes,
    frame_max: int,
    content_type: str | None,
    headers: dict[str, Any] | None,
    delivery_mode: int | None,
    priority: int | None,
    correlation_id: str | None,
    expiration: str | None,
    message_id: str | None,
    message_type: str | None,
    user_id: str | None,
) -> None:
    fields: dict[str, Any] = {
        "content_type": content_type,
        "headers": headers,
        "delivery_mode": delivery_mode,
        "priority": priority,
        "correlation_id": correlation_id,
        "expiration": expiration,
        "message_id": message_id,
        "message_type": message_type,
        "user_id": user_id,
    }
    ours = frames.publish(channel, routing_key, body, frames.properties(**fields), frame_max=frame_max)
    theirs = pamqp_publish(channel, routing_key, body, Basic.Properties(**fields), frame_max)
    assert ours == theirs


def test_a_publish_reads_back_as_sent() -> None:
    body = b'{"result": {"task": null}}' * 9
    props = frames.properties(
        content_type="application/json",
        headers={"traceparent": "00-abc-def-01"},
        delivery_mode=1,
        correlation_id="c-1",
        message_id="m" * 32,
        message_type="result",
        user_id="queue-bridge",
    )
    data = frames.publish(7, "amq.rabbitmq.reply-to.abc", body, props, frame_max=100)
    decoded = []
    while data:
        consumed, channel, frame = pamqp.frame.unmarshal(data)
        assert channel == 7
        decoded.append(frame)
        data = data[consumed:]
    method, header, *chunks = decoded
    assert isinstance(method, Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory) == ("", "amq.rabbitmq.reply-to.abc", False)
    assert isinstance(header, ContentHeader) and header.body_size == len(body)
    p = header.properties
    assert (p.content_type, p.correlation_id, p.message_type, p.user_id) == (
        "application/json",
        "c-1",
        "result",
        "queue-bridge",
    )
    assert p.headers == {"traceparent": "00-abc-def-01"} and p.delivery_mode == 1
    assert len(chunks) == 3 and all(len(c.value) <= 92 for c in chunks)
    assert b"".join(c.value for c in chunks) == body


def test_an_empty_body_has_no_body_frame() -> None:
    data = frames.publish(1, "q", b"", frames.properties(), frame_max=131072)
    assert data == pamqp_publish(1, "q", b"", Basic.Properties(), 131072)


@given(channel=st.integers(1, 2047), tag=st.integers(1, 2**63 - 1), multiple=st.booleans())
def test_an_ack_is_what_pamqp_writes(channel: int, tag: int, multiple: bool) -> None:
    assert frames.ack(channel, tag, multiple=multiple) == pamqp.frame.marshal(
        Basic.Ack(delivery_tag=tag, multiple=multiple), channel
    )


@given(channel=st.integers(1, 2047), tag=st.integers(1, 2**63 - 1), requeue=st.booleans(), multiple=st.booleans())
def test_a_nack_and_a_reject_are_what_pamqp_writes(channel: int, tag: int, requeue: bool, multiple: bool) -> None:
    assert frames.nack(channel, tag, requeue=requeue, multiple=multiple) == pamqp.frame.marshal(
        Basic.Nack(delivery_tag=tag, multiple=multiple, requeue=requeue), channel
    )
    assert frames.reject(channel, tag, requeue=requeue) == pamqp.frame.marshal(
        Basic.Reject(delivery_tag=tag, requeue=requeue), channel
    )


def test_a_short_string_over_255_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="255"):
        frames.short_string("é" * 128)
