"""A publisher-confirm channel whose publishes RabbitMQ refuses (``basic.nack``) is opened afresh.

Why: on RabbitMQ before 3.11.x/3.12.x, a channel whose first publish to a quorum queue comes
while that queue elects a new leader (the node of its leader lost) keeps sending to the lost
leader (rabbitmq-server#9208, fixed by #9241): measured on 3.10 with a 3-node cluster, every
publish of such a channel was refused (or, without confirms, dropped) for as long as the node
stayed down, and a channel opened five seconds after the kill was served. A bridge whose results
channel had published no result before the kill (a bridge just started, or one that had acked
no task with a token) kept every result pending for that long. A new channel is served.

Renewing costs one channel close and open (the robust channel's own restore replays what was
declared on it), at most once every :data:`RENEW_MIN_INTERVAL_S`. A destination (a publish's
routing key) still refused on the new channel is not what #9208 does: no renewal for it again
until one of its publishes is confirmed. A queue that refuses publishes for another reason (a
tenant's results queue at its length limit with ``reject-publish``) renewed the shared channel
every 5 s, failing every other tenant's result in flight on it (sent again by the relay, some
twice) and logging a broker bug that was not there; it costs one renewal now. Counting refusals
in a row over the whole channel instead (a first fix) never renewed it in the very case above:
#9208 refuses one quorum queue, and the results to every other queue, confirmed between, reset
the count (found by review, 2026-12-07).
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
TRIED_KEPT = 10_000  # destinations remembered as refused on a renewed channel


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
        # Destinations a renewal was for, not confirmed since: refused on the new channel too,
        # they do not renew it again.
        self._tried: OrderedDict[str, None] = OrderedDict()
        self.renewals = 0

    def confirmed(self, key: str) -> None:
        """A publish to ``key`` (its routing key) was confirmed: it is served."""
        self._tried.pop(key, None)

    def refused(self, exc: BaseException, key: str) -> None:
        """A publish to ``key`` failed with ``exc``: renew the channel if it was a nack, unless a
        renewal was made for ``key`` already and it has been refused since."""
        if not nacked(exc) or key in self._tried:
            return
        now = self._clock()
        if (self._task is not None and not self._task.done()) or now - self._last < RENEW_MIN_INTERVAL_S:
            return
        self._last = now
        self._tried[key] = None
        while len(self._tried) > TRIED_KEPT:
            self._tried.popitem(last=False)
        self.renewals += 1
        self._task = self._spawn(self._renew(key))

    async def _renew(self, key: str) -> None:
        channel = self._channel_of()
        if channel is None or channel.is_closed:
            return  # closed or being restored already: the new channel is what renewal would give
        log.warning(
            "RabbitMQ refused a publish to %r on the %s channel (nack): opening it afresh (a quorum queue's "
            "leader lost while the channel first published to it keeps refusing it on RabbitMQ before 3.11; "
            "refused again on the new channel, it is the queue's own refusal, such as its length limit)",
            key,
            self.name,
        )
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 5.0)
            why = PublishesRefused(f"publishes on the {self.name} channel nacked")
            await asyncio.wait_for(underlay.close(why), 5.0)
        except Exception as exc:  # the channel went meanwhile: its restore gives a new one all the same
            log.info("renewing the %s channel: %s", self.name, type(exc).__name__)
