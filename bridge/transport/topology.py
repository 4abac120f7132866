"""The bridge's AMQP names and the topology it declares (docs/asyncapi.yaml ``x-topology``)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from bridge.config import Settings
from bridge.transport.add_retry import LANE_DELAY_MS, LANE_SUFFIX

log = logging.getLogger("bridge.amqp")

METHODS = ("add", "fetch", "ack")  # one queue each, named after the method
# 1.4, the worker lifecycle: RPCs that share one queue (``<prefix>.lifecycle``), bound by these
# routing keys: rarer than fetch and ack, they need no consumer (and prefetch window) each.
LIFECYCLE_METHODS = ("extend", "fail", "cancel", "purge", "stats", "parked", "redrive", "discard")
LIFECYCLE_QUEUE = "lifecycle"
ROUTING_KEYS = (*METHODS, *LIFECYCLE_METHODS)
# The queues a bridge consumes, by name (unrouted: what no binding took).
CONSUMED = (*METHODS, LIFECYCLE_QUEUE, "unrouted")


@dataclass(frozen=True, slots=True)
class Names:
    exchange: str
    queue_prefix: str

    def queue(self, method: str) -> str:
        return f"{self.queue_prefix}.{method}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.exchange}.dead"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue_prefix}.dead-letter"

    @property
    def unrouted_exchange(self) -> str:
        return f"{self.exchange}.unrouted"


@dataclass(frozen=True, slots=True)
class Topology:
    queues: dict[str, AbstractQueue]  # add, fetch, ack, lifecycle, unrouted
    results_exchange: AbstractExchange
    add_retry_lane: bool  # declared (the bridge's user may be refused it: an older permission set)


async def declare_topology(
    settings: Settings, connection: AbstractConnection, consume: AbstractChannel, publish: AbstractChannel
) -> Topology:
    """Declare (idempotently) every exchange, queue and binding; the results exchange on ``publish``."""
    s, names = settings, Names(settings.exchange, settings.queue_prefix)
    dlx = await consume.declare_exchange(names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await _declare_dead_letter_queue(settings, names, connection, consume)
    await dlq.bind(dlx)
    unrouted = await consume.declare_exchange(names.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    main = await consume.declare_exchange(
        s.exchange,
        aio_pika.ExchangeType.DIRECT,
        durable=True,
        arguments={"alternate-exchange": names.unrouted_exchange},
    )
    args: FieldTable = {"x-dead-letter-exchange": names.dead_letter_exchange}
    queues: dict[str, AbstractQueue] = {}
    for method in METHODS:
        q = await consume.declare_queue(names.queue(method), durable=True, arguments=args)
        await q.bind(main, routing_key=method)
        queues[method] = q
    life = await consume.declare_queue(names.queue(LIFECYCLE_QUEUE), durable=True, arguments=args)
    for method in LIFECYCLE_METHODS:
        await life.bind(main, routing_key=method)
    queues[LIFECYCLE_QUEUE] = life
    lane = await _declare_add_retry_lane(settings, names, connection)
    unrouted_q = await consume.declare_queue(names.queue("unrouted"), durable=True, arguments=args)
    await unrouted_q.bind(unrouted)
    queues["unrouted"] = unrouted_q
    results = await publish.declare_exchange(s.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    if s.results_queue:
        # A durable queue for the engine, so results published while it is down wait for it.
        # Declared and bound on the results' own channel: when that channel is reopened (a
        # publish to an exchange deleted meanwhile closes it), the robust channel declares the
        # exchange again and, only for what was declared on it, the queue and its binding.
        results_q = await publish.declare_queue(s.results_queue, durable=True)
        await results_q.bind(results, routing_key="#")
    return Topology(queues, results, lane)


async def _declare_add_retry_lane(settings: Settings, names: Names, connection: AbstractConnection) -> bool:
    """The add retry lane (bridge.transport.add_retry): nobody consumes it; its messages expire
    back to the add queue. On a channel of its own: a broker that refuses it (permissions set
    before the lane existed) closes only that channel, and adds keep being retried in place."""
    lane: FieldTable = {
        "x-message-ttl": LANE_DELAY_MS,
        "x-dead-letter-exchange": settings.exchange,
        "x-dead-letter-routing-key": "add",
    }
    probe = await connection.channel(publisher_confirms=False)
    try:
        await probe.declare_queue(names.queue(LANE_SUFFIX), durable=True, arguments=lane)
    except aiormq.exceptions.ChannelAccessRefused:
        log.warning(
            "the bridge's AMQP user may not declare %s: adds of an owner whose key-server entry is unusable are "
            "retried in place (they can hold the add window); grant it the permissions `queue-bridge permissions` "
            "prints",
            names.queue(LANE_SUFFIX),
        )
        return False
    finally:
        if not probe.is_closed:
            await probe.close()
    return True


async def _declare_dead_letter_queue(
    settings: Settings, names: Names, connection: AbstractConnection, consume: AbstractChannel
) -> AbstractQueue:
    """Bounded (issue 13.6): a flood of bad messages must not fill RabbitMQ's disk and block
    every publisher on the broker. Beyond the limits the oldest dead letters are dropped."""
    s = settings
    args: FieldTable = {
        "x-max-length": s.dead_letter_max_length,
        "x-max-length-bytes": s.dead_letter_max_bytes,
        "x-overflow": "drop-head",
    }
    probe = await connection.channel(publisher_confirms=False)
    try:
        await probe.declare_queue(names.dead_letter_queue, durable=True, arguments=args)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        # Declared by an older bridge without limits: queue arguments cannot change in place.
        policy = {"max-length": s.dead_letter_max_length, "max-length-bytes": s.dead_letter_max_bytes}
        log.warning(
            "dead-letter queue %s exists without the configured limits; bound it with a policy: "
            "rabbitmqctl set_policy qb-dead-letter '^%s$' '%s' --apply-to queues",
            names.dead_letter_queue,
            re.escape(names.dead_letter_queue),
            orjson.dumps({**policy, "overflow": "drop-head"}).decode(),
        )
    finally:
        if not probe.is_closed:
            await probe.close()
    return await consume.declare_queue(names.dead_letter_queue, passive=True)
