"""Which bridge of the fleet runs the background loops (recovery scheduler, result relay).

One bridge at a time, elected by RabbitMQ: ``<queue_prefix>.duty`` is a single-active-consumer
queue that every bridge consumes (prefetch 1). It holds a token message; the active consumer
receives it and keeps it unacknowledged, and *that* makes it the holder. It swaps the token for a
fresh one every ``RENEW_S`` (RabbitMQ closes a channel that keeps a delivery unacknowledged past
its consumer timeout), and stays the holder across the swap.
When the holder dies or loses its channel, the broker requeues the token and makes the next
consumer active, which receives it. Every bridge publishes a token when it
connects (and reconnects) and every ``refresh_s`` while it holds none (so a token lost with a
broker restart is replaced at once); ``x-max-length: 1`` keeps at most one spare token waiting.

Correctness never depends on the election: every action of the loops is idempotent or fenced by a
lease's compare-and-set, so two holders for a moment (a partition) cost reads, not tasks. What
it buys is the fleet's idle cost: the loops' reads happen once for the fleet, not once per bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from pamqp.common import FieldTable

from bridge.domain.cancellation import ConnectionCancelled, stray_as_failure

log = logging.getLogger("bridge.duty")

BROKER_CALL_S = 3.0  # bounded: a robust channel without a connection waits for it forever
# The holder swaps its token for a fresh one this often. RabbitMQ closes a channel whose delivery
# stays unacknowledged longer than its consumer_timeout (30 min by default, checked on a 1 min
# tick): a token kept for ever had the holder's channel closed every half hour, and the duty moved
# (a warning, a gap in recovery and relay, the new holder's loops reading their positions again).
RENEW_S = 60.0


class Duty:
    def __init__(
        self,
        queue_name: str,
        *,
        refresh_s: float = 30.0,
        renew_s: float | None = None,
        queue_arguments: FieldTable | None = None,
    ) -> None:
        self.queue_name = queue_name
        self.renew_s = RENEW_S if renew_s is None else renew_s
        self.renewals = 0
        # The held token was acknowledged for a fresh one, which the broker hands to us next.
        self._renewing = False
        # Its type (``BRIDGE_QUEUE_TYPE``): a quorum duty queue outlives the loss of a cluster node,
        # a classic one on a lost node leaves the fleet without a duty holder until it is back.
        self.queue_arguments: FieldTable = dict(queue_arguments or {})
        self.refresh_s = refresh_s
        self._channel: AbstractChannel | None = None
        self._token: AbstractIncomingMessage | None = None
        self.acquired = asyncio.Event()
        self._offering: set[asyncio.Task[None]] = set()  # offers made after a reconnect
        self._connection: AbstractRobustConnection | None = None
        # Stood down: this bridge cannot reach Cassandra, so it neither holds nor takes the duty
        # (the loops it would run fail at every tick while another bridge could run them).
        self.standing_down = False
        self._standing: asyncio.Task[None] | None = None
        # Called as the duty leaves this bridge: what it exports as the holder goes at once, not at
        # its next refresh (until then the fleet exported it twice: a sum doubled).
        self._lost_callbacks: list[Callable[[], None]] = []

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._lost_callbacks.append(callback)

    def _let_go(self) -> None:
        was_held, self._token = self._token is not None, None
        self._renewing = False
        self.acquired.clear()
        if was_held:
            for callback in self._lost_callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("a duty-lost callback failed")

    @property
    def held(self) -> bool:
        return self._token is not None

    async def attach(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        await self._consume(connection)
        # A broker restart loses the token (a transient message): offer one as soon as the
        # connection and this consumer are back, not at the next refresh (up to refresh_s without
        # a recovery scheduler or a result relay in the whole fleet).
        connection.reconnect_callbacks.add(self._reconnected)
        await self.offer_token()

    async def _consume(self, connection: AbstractRobustConnection) -> None:
        channel = self._channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=1)
            channel.close_callbacks.add(self._lost)
            args: FieldTable = {
                **self.queue_arguments,
                "x-single-active-consumer": True,
                "x-max-length": 1,
                "x-overflow": "drop-head",
            }
            queue = await channel.declare_queue(self.queue_name, durable=True, arguments=args)
            await queue.consume(self._delivered)
        except BaseException:
            # An attempt cut short (a step-up's bound) after the broker registered its consume:
            # left open, that consumer could take the token, which nothing here would know of,
            # renew or release, and no bridge held the duty until the broker's consumer timeout.
            # Closed, the broker hands a token it took to the next consumer.
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(channel.close(), BROKER_CALL_S))
            raise

    def follow_storage(self, up: bool) -> None:
        """Cassandra went out of reach from this bridge (``up`` False): hand the duty over and stop
        competing for it; back in reach: compete again. A holder cut off alone kept the duty, and
        the fleet ran no recovery and no result relay for as long as the cut lasted."""
        if up != self.standing_down:
            return
        self.standing_down = not up
        if self._standing is not None:
            self._standing.cancel()
        self._standing = asyncio.get_running_loop().create_task(self._step_up() if up else self.release())

    async def _step_up(self) -> None:
        while not self.standing_down and self._connection is not None:
            try:
                async with asyncio.timeout(BROKER_CALL_S):
                    await self._consume(self._connection)
            except Exception as exc:  # the broker is away too: try again
                log.debug("duty: cannot consume again yet (%s)", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            await self.offer_token()
            return

    async def offer_token(self) -> None:
        if self._channel is None or self.held or self.standing_down:
            return
        with contextlib.suppress(Exception):  # the broker is away: the next refresh offers it
            await self._publish_token(self._channel)

    async def _publish_token(self, channel: AbstractChannel) -> None:
        publish = channel.default_exchange.publish(aio_pika.Message(b"duty"), routing_key=self.queue_name)
        await asyncio.wait_for(publish, BROKER_CALL_S)

    async def _delivered(self, message: AbstractIncomingMessage) -> None:
        if self.standing_down:
            return  # left unacknowledged: the channel closing now gives it to another bridge
        if self._renewing:  # the fresh token after a renewal: the duty stays here
            self._renewing = False
            self._token = message
            self.renewals += 1
            return
        if self._token is not None:  # a spare token reached the holder: one is enough
            with contextlib.suppress(Exception):
                await asyncio.wait_for(message.ack(), BROKER_CALL_S)
            return
        self._token = message
        self.acquired.set()
        log.info("this bridge now runs the recovery scheduler and the result relay")

    def _reconnected(self, *_: object) -> None:
        task = asyncio.get_running_loop().create_task(self.offer_token())
        self._offering.add(task)
        task.add_done_callback(self._offering.discard)

    def _lost(self, *_: object) -> None:
        if self._token is not None:
            log.warning("scheduler duty lost with the AMQP channel; another bridge takes it over")
        self._let_go()

    async def run(self, stop: asyncio.Event) -> None:
        """Offer a token now and then while holding none (a lost token is replaced); renew the one
        held before RabbitMQ's consumer timeout takes it away."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                wait_s = self.renew_s if self.held else min(self.refresh_s, self.renew_s)
                await asyncio.wait_for(stop.wait(), timeout=wait_s)
            if stop.is_set():
                return
            try:
                # A stuck connection's close cancels the broker calls in flight: the loop goes on
                # (it ended, and this bridge stopped renewing and offering tokens).
                with stray_as_failure():
                    if self.held:
                        await self.renew()
                    else:
                        await self.offer_token()
            except ConnectionCancelled:
                log.debug("duty: a token call was cut short by its connection's close")

    async def renew(self) -> None:
        """Swap the held token for a fresh one without letting the duty go: the fresh token is
        published first, then the held one acknowledged. This bridge is the queue's single active
        consumer, with prefetch 1, so the broker hands it the next token (the fresh one, or a
        spare that was waiting) as soon as the ack frees its slot.

        A fresh token that has not come back by the next renewal lets the duty go (the held one is
        acked: this bridge holds none), and a token is offered at once. Either the broker dropped
        the publish, and as the active consumer this bridge receives the offered one and holds the
        duty again; or this bridge is no longer the active consumer: the broker cancelled its
        consumer (the duty queue deleted, or a classic one's node restarted), the queue was
        declared and consumed again, and another consumer became the active one and received the
        tokens. Publishing another and waiting, as before, it kept ``held`` for good beside the new
        holder: two bridges ran the scheduler and the relay (results published twice, gauges
        doubled) until its channel closed."""
        token, channel = self._token, self._channel
        if token is None or channel is None or self.standing_down:
            return
        if self._renewing:
            log.warning(
                "scheduler duty: the renewed token did not come back within %.0f s (this bridge is no longer "
                "the duty queue's active consumer, or the broker dropped it): letting the duty go",
                self.renew_s,
            )
            self._let_go()
            await self.offer_token()
            return
        try:
            await self._publish_token(channel)
            self._renewing = True
            await asyncio.wait_for(token.ack(), BROKER_CALL_S)
        except Exception as exc:  # the channel is going: its loss hands the duty over as before
            self._renewing = False
            log.debug("duty: token not renewed (%s)", type(exc).__name__)

    async def release(self) -> None:
        """Shutdown: hand the duty over now. Closing the channel cancels this consumer and makes the
        broker requeue the token to the next one (a nack first would hand it back to us).

        A step-up under way (``follow_storage``: Cassandra back) is cancelled first: left running,
        it consumed the duty queue again after this release and took the token back, and the
        stopping bridge held the duty with its loops already cancelled (the fleet ran no recovery
        and no result relay until its transport closed)."""
        standing = self._standing
        if standing is not None and standing is not asyncio.current_task():  # (not the stand-down's own release)
            self._standing = None
            standing.cancel()
            await asyncio.wait({standing}, timeout=BROKER_CALL_S)
        self._let_go()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._channel.close(), BROKER_CALL_S)


class AlwaysOnDuty:
    """No election (a single bridge, tests of the domain): this bridge always runs the loops."""

    held = True

    def __init__(self) -> None:
        self.acquired = asyncio.Event()
        self.acquired.set()

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Never lost."""


__all__ = ["AlwaysOnDuty", "Duty"]
