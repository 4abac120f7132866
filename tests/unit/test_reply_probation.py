"""A reply to a broker node not proven yet goes over a probation connection: bounded.

After a failover every reply goes through probation until its node is proven. Opening that
connection had no bound: a node that accepts TCP and never answers (or one the OS keeps trying for
two minutes) held every such reply, and the delivery each one answers, until the prefetch windows
filled and the bridge served nothing. Found by a review, 2026-12-05.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bridge.transport import replies
from bridge.transport.replies import ReplyPublisher

pytestmark = pytest.mark.anyio

REPLY_TO = "amq.rabbitmq.reply-to.g1h2AAlyZXh1c0BvbmUAAF0nAAAAAAAAAAA=.Z3Vlc3Q="  # as the broker rewrites it


class _Request:
    reply_to = REPLY_TO
    correlation_id = "c-1"


async def test_a_reply_whose_probation_connection_never_opens_gives_up_within_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replies, "PROBATION_CONNECT_S", 0.2)
    never = asyncio.Event()

    async def connect() -> Any:
        await never.wait()  # a node that accepts TCP and never answers

    publisher = ReplyPublisher(connect)
    publisher.main = object()  # type: ignore[assignment]  # connected: replies are sent
    started = time.monotonic()
    await asyncio.wait_for(publisher.answer(_Request(), b"{}", is_error=False), 5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2, "the reply waited on a connection that never opened"
    # The next reply tries a connection of its own (nothing half-open is kept).
    assert publisher._probation is None


async def test_a_reply_whose_confirm_never_comes_gives_up_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replies, "PROBATION_REPLY_S", 0.2)
    never = asyncio.Event()

    class _Confirming:
        async def basic_publish(self, *args: Any, **kwargs: Any) -> None:
            await never.wait()  # a broker that never confirms

    class _Channel:
        is_closed = False

        async def get_underlay_channel(self) -> _Confirming:
            return _Confirming()

    class _Connection:
        is_closed = False

        async def channel(self, **kwargs: Any) -> _Channel:
            return _Channel()

        async def close(self) -> None:
            return None

    async def connect() -> Any:
        return _Connection()

    publisher = ReplyPublisher(connect)
    publisher.main = object()  # type: ignore[assignment]
    started = time.monotonic()
    await asyncio.wait_for(publisher.answer(_Request(), b"{}", is_error=False), 5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
