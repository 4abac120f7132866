"""The duty's renewal when its fresh token never comes back: pure logic, a channel that delivers
nothing (this bridge no longer the duty queue's active consumer). The real broker's case (the duty
queue deleted and consumed again by another) is tests/integration/test_r11_duty_cancelled_consumer.py."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bridge.transport.duty import Duty

pytestmark = pytest.mark.anyio


class _Exchange:
    def __init__(self) -> None:
        self.published = 0

    async def publish(self, message: Any, routing_key: str) -> None:
        self.published += 1  # and never delivered back to this bridge


class _Channel:
    def __init__(self) -> None:
        self.default_exchange = _Exchange()


class _Token:
    def __init__(self) -> None:
        self.acked = 0

    async def ack(self) -> None:
        self.acked += 1


async def test_a_renewal_whose_token_never_comes_back_lets_the_duty_go() -> None:
    duty = Duty("q.duty", renew_s=60.0)
    channel, token = _Channel(), _Token()
    duty._channel = cast(AbstractChannel, channel)
    duty._token = cast(AbstractIncomingMessage, token)
    duty.acquired.set()
    lost: list[bool] = []
    duty.on_lost(lambda: lost.append(True))

    await duty.renew()  # a fresh token published, the held one acked
    assert (channel.default_exchange.published, token.acked, duty.held) == (1, 1, True)
    await duty.renew()  # a renewal period later: it never came (another consumer is the active one)
    assert not duty.held, "kept the duty with no token"
    assert lost == [True], "the duty-lost callbacks ran (its gauges dropped)"
    assert not duty.acquired.is_set()
    assert channel.default_exchange.published == 2, "a token offered at once: back here if still the active one"
    await duty.renew()  # nothing held: nothing to renew
    assert channel.default_exchange.published == 2


async def test_a_renewal_whose_token_comes_back_keeps_the_duty() -> None:
    duty = Duty("q.duty", renew_s=60.0)
    channel, token = _Channel(), _Token()
    duty._channel = cast(AbstractChannel, channel)
    duty._token = cast(AbstractIncomingMessage, token)
    lost: list[bool] = []
    duty.on_lost(lambda: lost.append(True))
    for n in range(1, 4):
        await duty.renew()
        fresh = _Token()
        await duty._delivered(cast(AbstractIncomingMessage, fresh))  # the fresh token, back here
        assert duty.held and duty.renewals == n
        token = fresh
    assert lost == []
