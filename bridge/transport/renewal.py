"""A publisher-confirm channel whose publishes RabbitMQ refuses (``basic.nack``) is opened afresh.

Why: on RabbitMQ before 3.11.x/3.12.x, a channel whose first publish to a quorum queue comes
while that queue elects a new leader (the node of its leader lost) keeps sending to the lost
leader (rabbitmq-server#9208, fixed by #9241): measured on 3.10 with a 3-node cluster, every
publish of such a channel was refused (or, without confirms, dropped) for as long as the node
stayed down, and a channel opened five seconds after the kill was served. A bridge whose results
channel had published no result before the kill (a bridge just started, or one that had acked
no task with a token) kept every result pending for that long. A new channel is served.

Renewing costs one channel close and open (the robust channel's own restore replays what was
declared on it), and it fails every other publish in flight on the channel (results are sent
again by the relay). So renewals back off while nacks keep coming: the first at once, the next
after :data:`RENEW_MIN_INTERVAL_S`, each wait after twice the one before, up to
:data:`RENEW_MAX_INTERVAL_S`; nacks quiet for longer than :data:`QUIET_RESET_S` (and than the
wait, up to :data:`QUIET_RESET_MAX_S`) make the next incident start again from the shortest
wait. A queue that refuses publishes for another reason (a tenant's results queue at its length
limit with ``reject-publish``, often bound to many services) renewed the shared channel every 5 s
for as long as it stayed full, failing every other tenant's result in flight each time; it now
costs renewals at 0, 5, 15, 35, 75, 155 and 315 s, then one every 5 minutes, whether results keep
coming for it or only the relay's retries (1 s doubling to 60 s apart) reach it. #9208 is served
as before: its channel, renewed during the election and refused again, is renewed 5 s later (the
3-node drill), also 90 s after such a full queue drained; elections at least 35 s apart (5 s to be
served, 30 s of quiet) are each served so. While a full queue keeps refusing, a #9208 election
meanwhile is served at the next renewal, up to 5 minutes later. Rules tried and dropped (found
by review and CI, 2026-12-07): counting nacks in a row over the channel never renewed it in
#9208's case (the other queues' confirms between reset the count); one renewal per routing key
until it was confirmed was too few for #9208; a backoff per routing key still renewed every few
seconds when the full queue took many services' results (each key started at 5 s), and never
forgot a key's long wait; a reset at a confirm renewed a full queue drained slowly every 5-10 s.
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
RENEW_MAX_INTERVAL_S = 300.0
# No nack for this long (and for longer than the wait): the next starts afresh. Short enough for
# back-to-back elections a minute apart (a rolling restart of the broker) to be served as the
# first: at 60 s, the second's second renewal came 20 s after its first, the third's 80 s. A reset
# at a confirm of the last renewal's destination instead (tried) renewed a full queue that its
# consumer drains slowly every 5-10 s again: it confirms a publish whenever a slot frees.
QUIET_RESET_S = 30.0
# ... but never more than this: quiet for as long as a 5-minute wait, an election within 5 minutes
# after a full queue drained got its second renewal 5 minutes late (found by the re-review). The
# relay's retries of a full queue's results come at most ~61 s apart: they keep it backing off.
QUIET_RESET_MAX_S = 90.0


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
        self._not_before = float("-inf")  # no renewal before then
        self._wait = RENEW_MIN_INTERVAL_S  # from the next renewal to the one after it
        self._last_nack = float("-inf")
        self.renewals = 0

    def refused(self, exc: BaseException, key: str) -> None:
        """A publish to ``key`` (its destination, for the log) failed with ``exc``: renew the
        channel if it was a nack and no renewal is waited for."""
        if not nacked(exc):
            return
        now = self._clock()
        if now - self._last_nack > max(min(self._wait, QUIET_RESET_MAX_S), QUIET_RESET_S):
            self._wait = RENEW_MIN_INTERVAL_S  # a new incident, not the same one going on
        self._last_nack = now
        if (self._task is not None and not self._task.done()) or now < self._not_before:
            return
        self._not_before = now + self._wait
        self._wait = min(self._wait * 2, RENEW_MAX_INTERVAL_S)
        self.renewals += 1
        self._task = self._spawn(self._renew(key))

    async def _renew(self, key: str) -> None:
        channel = self._channel_of()
        if channel is None or channel.is_closed:
            return  # closed or being restored already: the new channel is what renewal would give
        log.warning(
            "RabbitMQ refused a publish on the %s channel (nack, to %s): opening it afresh (a quorum queue's "
            "leader lost while the channel first published to it keeps refusing it on RabbitMQ before 3.11; a "
            "queue at its length limit with reject-publish refuses too); next renewal in %.0f s at the earliest",
            self.name,
            key,
            self._not_before - self._clock(),
        )
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 5.0)
            why = PublishesRefused(f"publishes on the {self.name} channel nacked")
            await asyncio.wait_for(underlay.close(why), 5.0)
        except Exception as exc:  # the channel went meanwhile: its restore gives a new one all the same
            log.info("renewing the %s channel: %s", self.name, type(exc).__name__)
