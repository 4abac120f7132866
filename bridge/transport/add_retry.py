"""The add retry lane: where the adds of an owner whose key-server entry is unusable wait, so that
they do not hold the add consumer's prefetch window for everybody.

An add that meets ``unavailable`` is retried in place, its delivery held (:mod:`~bridge.transport.fate`).
That is right when Cassandra or the key server is down: every owner is stopped alike and holding
the deliveries is the back-pressure. It is wrong when one owner's entry on the key server is
broken (``BadKeyAnswer``): a burst of that owner's adds larger than the window held every slot,
and other owners' adds waited as long as the entry stayed broken. Requeueing does not help (a
requeued message goes back to the head of the queue).

So an owner may hold at most :meth:`AddRetryLane.in_place_limit` adds retrying in place for that
reason; its further adds are published, confirmed, to ``<prefix>.add-retry`` and only then
acknowledged. That queue has no consumer: its messages expire after :data:`LANE_DELAY_MS` and the
broker dead-letters them back to the bridge's exchange with routing key ``add``, so they are taken
again, by any bridge, until the entry is fixed. Nothing is dropped on the way: the publish is
confirmed before the original is acknowledged, and a failed publish (or one not confirmed within
:data:`LANE_CONFIRM_TIMEOUT_S`) leaves the add retrying in place as before.

The copy is published with the bridge's own ``user_id`` (RabbitMQ checks it is the connection's
user, so no tenant can forge it) and the owner in ``x-owner``, which the bridge trusts from its
own user only (:class:`~bridge.transport.envelope.Identity`). Of the caller's headers it carries
only those an add reads (:data:`LANE_HEADERS`): a copied ``CC`` or ``BCC`` header would have the
broker route the copy, in the bridge's name, to any queue those name too (the default exchange
reaches every queue): a tenant's forged results on the engine's queue, or a copy of itself back
in the add queue at each pass, doubling. It carries :data:`DEFERRED_HEADER`,
which makes its idempotency key checked with an LWT (``envelope.idempotency_of``): if the
original's acknowledgement were lost, the broker would deliver both.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange

from bridge.config import Settings
from bridge.domain.cancellation import stray_as_failure
from bridge.transport.permissions import amqp_user
from bridge.transport.request import RequestMessage

log = logging.getLogger("bridge.amqp")

# Fixed, and part of the queue's declaration (x-message-ttl): a bridge declaring another value
# would be refused (406) by a queue its fleet declared first. Long enough that a broken owner's
# backlog of N adds costs the broker N / 10 messages a second, short enough that a fixed entry
# is felt within seconds.
LANE_DELAY_MS = 10_000
LANE_SUFFIX = "add-retry"
DEFERRED_HEADER = "x-qb-deferred"  # how many times the add went through the lane
# The caller's headers a lane copy keeps: what an add reads (its deadline, idempotency key and
# trace context); ``x-owner`` and DEFERRED_HEADER are the bridge's own. Nothing else: a header
# the broker acts on (``CC``, ``BCC``) must not be published in the bridge's name.
# (envelope's DEADLINE_HEADER and IDEMPOTENCY_HEADER, spelled out: envelope imports this module)
LANE_HEADERS = ("x-deadline", "x-idempotency-key", "traceparent", "tracestate")
# A lane publish's confirm is awaited this long at most; past it the publish counts as failed and
# the add is retried in place (``RequestHandlers._defer``). A healthy broker confirms in
# milliseconds. Should the copy land after all (its confirm only late), the add has a twin, as after
# any publish that fails once it left: the copy is flagged deferred, and its idempotency key (if
# it has one) is checked with an LWT (``envelope.idempotency_of``).
LANE_CONFIRM_TIMEOUT_S = 5.0


class AddRetryLane:
    def __init__(self, settings: Settings) -> None:
        self.user = amqp_user(settings.amqp_url.get_secret_value())
        self.name = f"{settings.queue_prefix}.{LANE_SUFFIX}"
        # An owner's share of the window: a sixteenth (at least one delivery).
        self.in_place_limit = max(1, settings.prefetch // 16)
        self._in_place: Counter[str] = Counter()  # owner -> adds retrying in place for a bad key
        self._exchange: AbstractExchange | None = None
        # Told of a failed publish (the transport renews the channel when RabbitMQ nacks).
        self.on_failure: Callable[[BaseException], None] = lambda exc: None

    def attach(self, default_exchange: AbstractExchange) -> None:
        """The default exchange of a channel with publisher confirms (the transport, at start)."""
        self._exchange = default_exchange

    @property
    def available(self) -> bool:
        """Declared and attached (the bridge's user may be refused the queue: then it is not)."""
        return self._exchange is not None

    def full(self, owner: str) -> bool:
        """The owner holds as many adds retrying in place for a bad key as it may (and the lane is
        there to take more: without it, they are all retried in place)."""
        return self.available and self._in_place[owner] >= self.in_place_limit

    @contextmanager
    def retrying_in_place(self, owner: str) -> Iterator[None]:
        """Counts one of the owner's adds as retrying in place for a bad key while it does."""
        self._in_place[owner] += 1
        try:
            yield
        finally:
            self._in_place[owner] -= 1
            if not self._in_place[owner]:
                del self._in_place[owner]

    async def defer(self, message: RequestMessage, owner: str) -> None:
        """Publish a copy of the add to the lane and wait for the broker's confirm (raises if the
        broker did not take it: the caller then keeps the original)."""
        if self._exchange is None:
            raise RuntimeError("transport not started")
        given = message.headers or {}
        headers: dict[str, Any] = {name: given[name] for name in LANE_HEADERS if name in given}
        passes = given.get(DEFERRED_HEADER)
        headers[DEFERRED_HEADER] = (passes if isinstance(passes, int) and not isinstance(passes, bool) else 0) + 1
        headers["x-owner"] = owner
        copy = aio_pika.Message(
            message.body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            message_id=_copy_id(message, headers),
            timestamp=message.timestamp,
            user_id=self.user,
        )
        try:
            # Bounded, as the results' confirms on the same channel (results.CONFIRM_TIMEOUT_S): the
            # add holds its slot of the adds window while it waits. Unbounded, a main connection
            # gone stuck (a black hole: no frame back, no close) held every deferred add until
            # aiormq gave the connection up (three heartbeats: minutes), while the adds connection
            # kept delivering: a broken owner's flood stalled every owner's adds. That close then
            # cancels the wait in a task nobody cancelled: a failure too, not the request's end.
            with stray_as_failure():
                async with asyncio.timeout(LANE_CONFIRM_TIMEOUT_S):
                    await self._exchange.publish(copy, routing_key=self.name, mandatory=True)
        except Exception as exc:
            self.on_failure(exc)
            raise


def _copy_id(message: RequestMessage, headers: dict[str, Any]) -> str | None:
    """The copy's message id: the bridge's own, with the add's idempotency key moved to the
    ``x-idempotency-key`` header (``headers``, changed here), where the copy's next delivery reads
    it (``envelope.idempotency_of``: the same key, the same LWT as before).

    Not the caller's: the copy is published on the results channel, and aiormq matches a
    ``basic.return`` to its publish by message id alone. Two adds with one message id (a caller's
    retry with its key) moved to a lane that was not there at once: the first's return failed the
    second, the first's ack confirmed the first, whose original was then acknowledged, with no copy
    anywhere and no reply. A message id the caller chose could also meet a result's on that channel.
    A key the header cannot carry (control characters: a 1.4 message id, which AMQP allows) keeps
    the caller's id, as before."""
    from bridge.transport.envelope import IDEMPOTENCY_HEADER, IDEMPOTENCY_PATTERN  # envelope imports this module

    given = (message.headers or {}).get(IDEMPOTENCY_HEADER)
    if given not in (None, "", b""):
        return f"qb-lane-{uuid.uuid4().hex}"  # the caller's key is in the header, copied
    # 1.4 (no header): the message id is the key. An empty header: it guards against a redelivery
    # of this message, the copy's twin if the original's acknowledgement was lost.
    key = message.message_id or ""
    if not IDEMPOTENCY_PATTERN.fullmatch(key):
        return message.message_id
    headers[IDEMPOTENCY_HEADER] = key
    return f"qb-lane-{uuid.uuid4().hex}"
