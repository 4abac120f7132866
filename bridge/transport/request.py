"""A delivery as the bridge reads it: the few fields a request handler needs, over aiormq's frame.

aio-pika wraps every delivery in an ``IncomingMessage`` (about thirty attribute writes through a
guarded ``__setattr__``) and runs the consumer callback in a task of its own, and its ``Message``
and ``publish`` add the same again on the way out. So the hot path (requests, replies, hints)
reads and writes aiormq's frames directly, which cut the bridge's CPU per task by a fifth to a
third (``docs/performance.md``, "The request path on aiormq, and frames written as bytes");
connection recovery, declarations and the rarer publishes (results, duty, probation replies) stay
aio-pika's.

Settling writes its frame without waiting for it to reach the socket: frames of one connection go
out in the order they were queued, so a reply queued before its request's ack is always written
before it, and a connection that dies loses both (the broker then redelivers the request).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol, cast

import aiormq
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from bridge.transport import frames


class RequestMessage(Protocol):
    """What the request handlers read from a delivery and how they settle it."""

    body: bytes
    routing_key: str | None
    reply_to: str | None
    correlation_id: str | None
    user_id: str | None
    message_id: str | None
    headers: Mapping[str, Any] | None
    redelivered: bool | None
    timestamp: datetime | None

    @property
    def processed(self) -> bool: ...

    async def ack(self) -> None: ...

    async def nack(self, requeue: bool = True) -> None: ...

    async def reject(self, requeue: bool = False) -> None: ...


def channel_gone(message: RequestMessage) -> bool:
    """The channel ``message`` came on is closed or closing: it cannot be settled any more, and
    the broker delivers it again (to this bridge once the channel is back, or to another)."""
    return isinstance(message, Delivery) and message.channel_closing


class DeliveryGone(Exception):
    """A request's channel closed before it was handled: left to the broker (``channel_gone``)."""


class AlreadySettled(RuntimeError):
    """A delivery settled twice: the broker would close the channel for it (406 PRECONDITION_FAILED)."""


class Delivery:
    """One delivery of a consumer or of ``basic.get``, settled at most once on its own channel
    (after a reconnection that channel is closed: settling then raises, and the broker has already
    requeued the message)."""

    __slots__ = (
        "_channel",
        "_settled",
        "_tag",
        "body",
        "correlation_id",
        "headers",
        "message_id",
        "priority",
        "redelivered",
        "reply_to",
        "routing_key",
        "timestamp",
        "user_id",
    )

    def __init__(self, delivered: DeliveredMessage) -> None:
        frame = delivered.delivery
        props = delivered.header.properties
        assert isinstance(frame, (Basic.Deliver, Basic.GetOk)), "a delivery or a basic.get-ok"
        assert frame.delivery_tag is not None
        self.body: bytes = delivered.body
        self.routing_key: str | None = frame.routing_key
        self.redelivered: bool | None = frame.redelivered
        self.reply_to: str | None = props.reply_to
        self.correlation_id: str | None = props.correlation_id
        self.user_id: str | None = props.user_id
        self.message_id: str | None = props.message_id
        self.headers: Mapping[str, Any] | None = props.headers
        self.timestamp: datetime | None = props.timestamp
        self.priority: int | None = props.priority
        self._channel: AbstractChannel = delivered.channel
        self._tag: int = frame.delivery_tag
        self._settled = False

    @property
    def processed(self) -> bool:
        return self._settled

    @property
    def channel_closing(self) -> bool:
        return frames.closing(cast(aiormq.Channel, self._channel))

    def _settle_once(self) -> None:
        if self._settled:
            raise AlreadySettled(f"delivery {self._tag} is settled already")
        self._settled = True

    async def ack(self) -> None:
        self._settle_once()
        # One per request: written as bytes (bridge.transport.frames), as aiormq's basic_ack would.
        channel = cast(aiormq.Channel, self._channel)
        await frames.write(channel, frames.ack(channel.number, self._tag))

    # A requeue and a dead-letter are written as bytes too: aiormq's basic_nack and basic_reject
    # wait for room in the connection's write queue without end, and once the connection closed
    # with that queue full (a writer stuck on its socket) nothing took from it again: the request's
    # task never ended, and every later graceful stop waited its whole grace for it.
    async def nack(self, requeue: bool = True) -> None:
        self._settle_once()
        channel = cast(aiormq.Channel, self._channel)
        await frames.write(channel, frames.nack(channel.number, self._tag, requeue=requeue))

    async def reject(self, requeue: bool = False) -> None:
        self._settle_once()
        channel = cast(aiormq.Channel, self._channel)
        await frames.write(channel, frames.reject(channel.number, self._tag, requeue=requeue))
