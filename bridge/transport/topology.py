"""The bridge's AMQP names and the topology it declares (docs/asyncapi.yaml ``x-topology``)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
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


def durable_queue_arguments(settings: Settings, arguments: FieldTable | None = None) -> FieldTable:
    """A durable queue's arguments with its type (``BRIDGE_QUEUE_TYPE``). Quorum queues are replicated
    across a RabbitMQ cluster: the requests, the adds not yet stored and the results waiting for the
    engine outlive the loss of a node. Classic adds nothing: a queue's type cannot change, and one
    declared again with another type is refused (406), so queues declared before this setting
    existed are declared again exactly as before."""
    args: FieldTable = dict(arguments or {})
    if settings.queue_type == "quorum":
        args["x-queue-type"] = "quorum"
    return args


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
class ExchangeSpec:
    name: str
    kind: aio_pika.ExchangeType
    arguments: FieldTable | None = None


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A consumed queue: its exact arguments and its bindings ((exchange, routing key), ...).

    One description for the declaration at start and for the one after an operator deleted the
    queue under the bridge (:func:`declare_consumed_queue`): a queue declared again with other
    arguments would be refused (406), and one without all its bindings would lose requests."""

    name: str
    arguments: FieldTable
    bindings: tuple[tuple[ExchangeSpec, str | None], ...]  # None: aio-pika's default, the queue's name


def consumed_queues(settings: Settings) -> dict[str, QueueSpec]:
    """The queues of :data:`CONSUMED`, by name (add, fetch, ack, lifecycle, unrouted)."""
    names = Names(settings.exchange, settings.queue_prefix)
    main = ExchangeSpec(
        settings.exchange, aio_pika.ExchangeType.DIRECT, {"alternate-exchange": names.unrouted_exchange}
    )
    unrouted = ExchangeSpec(names.unrouted_exchange, aio_pika.ExchangeType.FANOUT)
    args = durable_queue_arguments(settings, {"x-dead-letter-exchange": names.dead_letter_exchange})
    specs = {method: QueueSpec(names.queue(method), args, ((main, method),)) for method in METHODS}
    specs[LIFECYCLE_QUEUE] = QueueSpec(
        names.queue(LIFECYCLE_QUEUE), args, tuple((main, method) for method in LIFECYCLE_METHODS)
    )
    specs["unrouted"] = QueueSpec(names.queue("unrouted"), args, ((unrouted, None),))  # a fanout: no key
    return specs


@dataclass(frozen=True, slots=True)
class Topology:
    queues: dict[str, AbstractQueue]  # add, fetch, ack, lifecycle, unrouted
    results_exchange: AbstractExchange
    add_retry_lane: bool  # declared (the bridge's user may be refused it: an older permission set)


async def declare_topology(
    settings: Settings, connection: AbstractConnection, consume: AbstractChannel, publish: AbstractChannel
) -> Topology:
    """Declare (idempotently) every exchange, queue and binding; the results exchange on ``publish``.

    What is declared on ``consume`` (a robust channel) is declared again by aio-pika at every
    reconnection, so nothing an operator may delete without breaking that replay is declared there
    passively: the dead-letter queue goes through :func:`declare_dead_letter` (short-lived channels)."""
    s = settings
    await declare_dead_letter(settings, connection)
    specs = consumed_queues(settings)
    exchanges: dict[str, AbstractExchange] = {}
    for spec in specs.values():
        for exchange, _key in spec.bindings:
            if exchange.name not in exchanges:
                exchanges[exchange.name] = await consume.declare_exchange(
                    exchange.name, exchange.kind, durable=True, arguments=exchange.arguments
                )
    queues = {method: await _declare_consumed_on(consume, spec, exchanges) for method, spec in specs.items()}
    lane = await declare_add_retry_lane(settings, connection)
    results = await publish.declare_exchange(s.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    if s.results_queue:
        # A durable queue for the engine, so results published while it is down wait for it.
        # Declared and bound on the results' own channel: when that channel is reopened (a
        # publish to an exchange deleted meanwhile closes it), the robust channel declares the
        # exchange again and, only for what was declared on it, the queue and its binding.
        results_q = await publish.declare_queue(s.results_queue, durable=True, arguments=durable_queue_arguments(s))
        await results_q.bind(results, routing_key="#")
    return Topology(queues, results, lane)


async def _declare_consumed_on(
    channel: AbstractChannel, spec: QueueSpec, exchanges: dict[str, AbstractExchange]
) -> AbstractQueue:
    queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
    for exchange, key in spec.bindings:
        await queue.bind(exchanges[exchange.name], routing_key=key)
    return queue


@contextlib.asynccontextmanager
async def _probe(connection: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    """A short-lived channel: a refusal (404, 406, 403) closes only it, and what is declared on it
    is never replayed (a robust channel replays its declarations only until it is closed by us)."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        yield channel
    finally:
        # Closed by us even when a refusal closed it: a robust channel the broker closed reopens
        # itself, and one left open would replay what was declared on it at every reconnection.
        with contextlib.suppress(Exception):
            await channel.close()


async def declare_consumed_queue(settings: Settings, connection: AbstractConnection, method: str) -> None:
    """Declare the queue of ``method`` (one of :data:`CONSUMED`) again, with its exact arguments,
    its exchanges and its bindings: an operator deleted it while the bridge consumed it."""
    spec = consumed_queues(settings)[method]
    async with _probe(connection) as probe:
        # Its exchanges too (idempotent, same arguments): an operator who deleted one along with it
        # would otherwise leave every binding refused with a 404.
        exchanges: dict[str, AbstractExchange] = {}
        for exchange, _key in spec.bindings:
            if exchange.name not in exchanges:
                exchanges[exchange.name] = await probe.declare_exchange(
                    exchange.name, exchange.kind, durable=True, arguments=exchange.arguments
                )
        await _declare_consumed_on(probe, spec, exchanges)


async def declare_add_retry_lane(settings: Settings, connection: AbstractConnection) -> bool:
    """The add retry lane (bridge.transport.add_retry): nobody consumes it; its messages expire
    back to the add queue. On a channel of its own: a broker that refuses it (permissions set
    before the lane existed) closes only that channel, and adds keep being retried in place.
    Declared again after each reconnection and when a publish to it is returned (an operator
    deleted it), as the dead-letter queue is: declared once at start, a deleted lane returned
    every deferral, and a broken owner's adds all retried in place, holding the add window."""
    names = Names(settings.exchange, settings.queue_prefix)
    lane = durable_queue_arguments(
        settings,
        {
            "x-message-ttl": LANE_DELAY_MS,
            "x-dead-letter-exchange": settings.exchange,
            "x-dead-letter-routing-key": "add",
        },
    )
    # A short-lived channel closed by us even when a refusal closed it: left to itself, a robust
    # channel the broker closed reopens, one more idle channel at every declaration (after every
    # reconnection and every returned deferral).
    async with _probe(connection) as probe:
        try:
            await probe.declare_queue(names.queue(LANE_SUFFIX), durable=True, arguments=lane)
        except aiormq.exceptions.ChannelAccessRefused:
            log.warning(
                "the bridge's AMQP user may not declare %s: adds of an owner whose key-server entry is unusable "
                "are retried in place (they can hold the add window); grant it the permissions `queue-bridge "
                "permissions` prints",
                names.queue(LANE_SUFFIX),
            )
            return False
    return True


async def declare_dead_letter(settings: Settings, connection: AbstractConnection) -> None:
    """The dead-letter exchange, its queue and their binding, on short-lived channels only.

    The queue is bounded (issue 13.6): a flood of bad messages must not fill RabbitMQ's disk and
    block every publisher on the broker; beyond the limits the oldest dead letters are dropped.
    Nothing here may be recorded on a robust channel: an operator may delete the queue (to drop
    what piled up there), and a robust channel that replays a passive declare of it at the next
    reconnection gets a 404 at every attempt, for ever (the bridge was dead). The transport runs
    this again after each reconnection instead, which also brings a deleted queue back."""
    s, names = settings, Names(settings.exchange, settings.queue_prefix)
    args = durable_queue_arguments(
        s,
        {
            "x-max-length": s.dead_letter_max_length,
            "x-max-length-bytes": s.dead_letter_max_bytes,
            "x-overflow": "drop-head",
        },
    )
    async with _probe(connection) as probe:
        dlx = await probe.declare_exchange(names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        try:
            dlq = await probe.declare_queue(names.dead_letter_queue, durable=True, arguments=args)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            if "x-queue-type" in str(exc):
                # Declared with the other type (BRIDGE_QUEUE_TYPE differs): a queue cannot change
                # type, so the start is refused with the broker's reason, as for the request
                # queues; the queue and what it holds are left as they are.
                log.warning("dead-letter queue %s exists with another queue type: %s", names.dead_letter_queue, exc)
                raise
            # Declared without limits (an older bridge) or with other ones (the settings changed since):
            # queue arguments cannot change in place. A policy bounds a queue declared without
            # them; where both set one, RabbitMQ applies the lower, so a policy cannot raise a limit
            # the queue was declared with.
            policy = {"max-length": s.dead_letter_max_length, "max-length-bytes": s.dead_letter_max_bytes}
            log.warning(
                "dead-letter queue %s exists with other arguments than the configured limits "
                "(BRIDGE_DEAD_LETTER_MAX_LENGTH %d, _MAX_BYTES %d), which stay in force. Declared without "
                "limits (an older bridge), bound it with a policy: rabbitmqctl set_policy qb-dead-letter "
                "'^%s$' '%s' --apply-to queues. Declared with other limits, a policy can only lower them: "
                "to raise them, drain the queue, delete it, and restart a bridge (it declares it anew)",
                names.dead_letter_queue,
                s.dead_letter_max_length,
                s.dead_letter_max_bytes,
                re.escape(names.dead_letter_queue),
                orjson.dumps({**policy, "overflow": "drop-head"}).decode(),
            )
        else:
            await dlq.bind(dlx)
            return
    # The 406 closed that channel; the queue exists (with other arguments): bind it on a new one.
    async with _probe(connection) as probe:
        dlq = await probe.declare_queue(names.dead_letter_queue, passive=True)
        await dlq.bind(names.dead_letter_exchange)
