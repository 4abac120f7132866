"""A publisher-confirm channel whose publishes RabbitMQ refuses (``basic.nack``) is opened afresh.

Why: on RabbitMQ before 3.11.x/3.12.x, a channel whose first publish to a quorum queue comes
while that queue elects a new leader (the node of its leader lost) keeps sending to the lost
leader (rabbitmq-server#9208, fixed by #9241): measured on 3.10 with a 3-node cluster, every
publish of such a channel was refused (or, without confirms, dropped) for as long as the node
stayed down, and a channel opened five seconds after the kill was served. A bridge whose results
channel had published no result before the kill (a bridge just started, or one that had acked
no task with a token) kept every result pending for that long. A new channel is served.

Renewing costs one channel close and open (the robust channel's own restore replays what was
declared on it), at most once every :data:`RENEW_MIN_INTERVAL_S`, and it fails every other
publish in flight on the channel (results are sent again by the relay). A destination (a
publish's routing key) refused again after a renewal made for it waits twice as long for the
next, from :data:`RENEW_MIN_INTERVAL_S` up to :data:`RENEW_MAX_INTERVAL_S`, until one of its
publishes is confirmed: a queue that refuses publishes for another reason (a tenant's results
queue at its length limit with ``reject-publish``) renewed the shared channel every 5 s for as
long as it stayed full, failing every other tenant's result in flight each time; it now costs
about ten renewals in its first quarter of an hour, then one every 5 minutes. #9208 is still
served as before: its channel, renewed during the election and refused again, is renewed 5 s
later (the 3-node drill). Two cheaper rules failed (found by review and CI, 2026-12-07): counting
nacks in a row over the channel never renewed it in #9208's case (the other queues' confirms
between reset the count), and one renewal per destination until confirmed was too few.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from aio_pika.abc import AbstractRobustChannel
from aiormq.exceptions import DeliveryError, PublishError
from pamqp import commands

log = logging.getLogger("bridge.transport")

RENEW_MIN_INTERVAL_S = 5.0
RENEW_MAX_INTERVAL_S = 300.0
BACKOFFS_KEPT = 10_000  # destinations remembered as refused since a renewal (the oldest forgotten)


class PublishesRefused(Exception):
    """Why the bridge closed a channel itself: RabbitMQ refused its publishes (nacks)."""


def nacked(exc: BaseException) -> bool:
    """A publish the broker refused with ``basic.nack`` (not a return: no queue bound is another
    matter, which a new channel does not change)."""
    return (
        isinstance(exc, DeliveryError)
        and not isinstance(exc, PublishError)
        and isinstance(exc.frame, commands.Basic.Nack)
    )


class ChannelRenewal:
    """Closes channel ``name``'s current AMQP channel when its publishes are nacked; the robust
    channel then reopens itself (as after a channel the broker closed) and the transport's
    channel-loss handling takes over from there."""

    def __init__(
        self,
        name: str,
        channel_of: Callable[[], AbstractRobustChannel | None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._channel_of = channel_of
        self._spawn = spawn
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._last = -RENEW_MIN_INTERVAL_S
        # By destination, since a renewal made for it: (no renewal for it before, the next wait).
        self._backoff: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.renewals = 0

    def confirmed(self, key: str) -> None:
        """A publish to ``key`` (its routing key) was confirmed: it is served."""
        self._backoff.pop(key, None)

    def refused(self, exc: BaseException, key: str) -> None:
        """A publish to ``key`` failed with ``exc``: renew the channel if it was a nack, unless
        ``key`` waits for its next renewal."""
        if not nacked(exc):
            return
        now = self._clock()
        if (self._task is not None and not self._task.done()) or now - self._last < RENEW_MIN_INTERVAL_S:
            return
        waiting = self._backoff.get(key)
        if waiting is not None and now < waiting[0]:
            return
        wait_s = RENEW_MIN_INTERVAL_S if waiting is None else waiting[1]
        self._backoff[key] = (now + wait_s, min(wait_s * 2, RENEW_MAX_INTERVAL_S))
        self._backoff.move_to_end(key)
        while len(self._backoff) > BACKOFFS_KEPT:
            self._backoff.popitem(last=False)
        self._last = now
        self.renewals += 1
        self._task = self._spawn(self._renew())

    async def _renew(self) -> None:
        channel = self._channel_of()
        if channel is None or channel.is_closed:
            return  # closed or being restored already: the new channel is what renewal would give
        log.warning(
            "RabbitMQ refused a publish on the %s channel (nack): opening it afresh (a quorum queue's leader "
            "lost while the channel first published to it keeps refusing it on RabbitMQ before 3.11)",
            self.name,
        )
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 5.0)
            why = PublishesRefused(f"publishes on the {self.name} channel nacked")
            await asyncio.wait_for(underlay.close(why), 5.0)
        except Exception as exc:  # the channel went meanwhile: its restore gives a new one all the same
            log.info("renewing the %s channel: %s", self.name, type(exc).__name__)
