"""A publisher-confirm channel whose publishes RabbitMQ refuses (``basic.nack``) is opened afresh.

Why: on RabbitMQ before 3.11.x/3.12.x, a channel whose first publish to a quorum queue comes
while that queue elects a new leader (the node of its leader lost) keeps sending to the lost
leader (rabbitmq-server#9208, fixed by #9241): measured on 3.10 with a 3-node cluster, every
publish of such a channel was refused (or, without confirms, dropped) for as long as the node
stayed down, and a channel opened five seconds after the kill was served. A bridge whose results
channel had published no result before the kill (a bridge just started, or one that had acked
no task with a token) kept every result pending for that long. A new channel is served.

Renewing costs one channel close and open (the robust channel's own restore replays what was
declared on it), at most once every :data:`RENEW_MIN_INTERVAL_S`: a queue that refuses
publishes for another reason (its length limit with ``reject-publish``) costs a reopen every few
seconds, nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aio_pika.abc import AbstractRobustChannel
from aiormq.exceptions import DeliveryError, PublishError
from pamqp import commands

log = logging.getLogger("bridge.transport")

RENEW_MIN_INTERVAL_S = 5.0


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
        self.renewals = 0

    def refused(self, exc: BaseException) -> None:
        """A publish on the channel failed with ``exc``: renew the channel if it was a nack."""
        if not nacked(exc):
            return
        now = self._clock()
        if (self._task is not None and not self._task.done()) or now - self._last < RENEW_MIN_INTERVAL_S:
            return
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
