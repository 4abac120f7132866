"""A stand-in for an aiormq channel whose frames the bridge writes as bytes
(``bridge.transport.frames``): what is queued on its connection is decoded with pamqp, and each
publish is handed to the fake's own ``basic_publish``, as aiormq would have been called."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pamqp.frame
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader


class _DecodingQueue:
    def __init__(self, owner: FrameChannel) -> None:
        self.owner = owner

    def full(self) -> bool:
        return False

    async def put(self, queued: ChannelFrame) -> None:
        data, decoded = queued.payload, []
        while data:
            consumed, channel, frame = pamqp.frame.unmarshal(data)
            assert channel == self.owner.number
            decoded.append(frame)
            data = data[consumed:]
        while decoded:
            method, header, *rest = decoded
            assert isinstance(method, Basic.Publish), f"only publishes are expected here, got {method!r}"
            assert isinstance(header, ContentHeader)
            body = b""
            while len(body) < header.body_size:
                chunk = rest.pop(0)
                assert isinstance(chunk, ContentBody)
                body += chunk.value
            decoded = rest
            await self.owner.basic_publish(
                body, routing_key=method.routing_key, properties=header.properties, exchange=method.exchange
            )


class FrameChannel:
    """Subclasses define ``basic_publish(body, *, routing_key, properties, exchange, ...)``."""

    is_closed = False
    number = 1
    publisher_confirms = False
    connection = SimpleNamespace(connection_tune=SimpleNamespace(frame_max=131072))

    def __init__(self) -> None:
        self.write_queue = _DecodingQueue(self)

    async def get_underlay_channel(self) -> Any:
        return self

    async def basic_publish(self, body: bytes, *, routing_key: str, properties: Basic.Properties, **_: Any) -> None:
        raise NotImplementedError
