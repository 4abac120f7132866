"""RabbitMQ's consumer timeout and the duty token (real broker; alone: it changes a broker-wide
setting).

RabbitMQ closes a channel whose delivery stays unacknowledged longer than ``consumer_timeout`` (30
min by default, checked on every channel tick, once a minute). The duty holder kept its token
unacknowledged for as long as it held the duty: in production its channel was closed every half
hour, with a warning, and the duty moved (a gap in recovery and relay, the next holder's loops
reading their positions again). Here the timeout is 3 s and the tick 1 s (set at run time for the
channels opened after, restored after the test): the holder renews its token every 0.5 s and
keeps the duty, and its channel, through 10 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for
from tests.integration.test_operator_broker_actions import rabbitmqctl

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.exclusive]

SETTINGS = {"consumer_timeout": "3000", "channel_tick_interval": "1000"}
# What an unset key stands for (RabbitMQ 3.10's defaults): a channel reads its tick interval at
# every tick, and one that finds it unset crashes (the broker closed every connection with
# INTERNAL_ERROR), so an unset key is restored as its default rather than unset again.
DEFAULTS = {"consumer_timeout": "1800000", "channel_tick_interval": "60000"}


def _get(key: str) -> str | None:
    out = rabbitmqctl("eval", f"application:get_env(rabbit, {key}).").strip()
    return out.removeprefix("{ok,").removesuffix("}") if out.startswith("{ok,") else None


@pytest.fixture
def short_consumer_timeout() -> Iterator[None]:
    before = {key: _get(key) for key in SETTINGS}
    for key, value in SETTINGS.items():
        rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {value}).")
    try:
        yield
    finally:
        for key, value in before.items():
            rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {value or DEFAULTS[key]}).")


async def test_the_duty_holder_keeps_the_duty_past_rabbitmqs_consumer_timeout(
    short_consumer_timeout, make_bridge, monkeypatch
):
    monkeypatch.setattr("bridge.transport.duty.RENEW_S", 0.5, raising=False)
    b = await make_bridge()
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    lost: list[object] = []
    b.duty._channel.close_callbacks.add(lambda *args: lost.append(args[-1]))
    not_held = 0
    watch_until = time.monotonic() + 10.0  # a measured window: more than three consumer timeouts
    while time.monotonic() < watch_until:
        not_held += not b.duty.held
        await asyncio.sleep(0.1)  # the window's sampling pace: seeing that nothing happens takes time
    assert not lost, f"the broker closed the duty channel: {lost[0]!r}"
    assert not_held == 0, f"the duty was not held at {not_held} of the window's samples"
    assert b.duty.renewals >= 10, f"{b.duty.renewals} renewals in 10 s at one per 0.5 s"


async def test_a_renewal_whose_fresh_token_was_lost_is_followed_by_another(
    short_consumer_timeout, make_bridge, monkeypatch, names
):
    """Were a renewal's fresh token lost (the broker dropped the publish), the held one is acked
    already and nobody holds a token: at the next renewal the holder lets the duty go and offers
    a token at once, which comes back to it (the queue's single active consumer, its one slot
    free): it holds the duty again, and renewals go on."""
    monkeypatch.setattr("bridge.transport.duty.RENEW_S", 0.5, raising=False)
    b = await make_bridge()
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    publish, dropped = b.duty._publish_token, []

    async def dropped_once(channel: object) -> None:
        if not dropped:
            dropped.append(channel)  # as if the broker had dropped it
            return
        await publish(channel)

    b.duty._publish_token = dropped_once
    await wait_for(lambda: dropped, 10, what="a renewal's fresh token lost")
    after_loss = b.duty.renewals
    await wait_for(lambda: b.duty.renewals >= after_loss + 3, 10, what="renewals going on after the loss")
    unacked = rabbitmqctl("list_queues", "name", "messages_unacknowledged")
    row = [line.split("\t") for line in unacked.splitlines() if line.startswith(names["queue_prefix"] + ".duty\t")]
    assert row and row[0][1] == "1", f"the holder holds no token: {row}"
    assert b.duty.held
