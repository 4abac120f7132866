"""Publishing replies without letting one requester break the bridge's connection.

Replies go to the requester's ``reply_to`` through the default exchange. With direct reply-to the
broker hands the bridge ``amq.rabbitmq.reply-to.<pid>.<key>``, where ``<pid>`` is an Erlang pid
(base64) whose node is named ``reply@<hash>``. Any client can put such a name in ``reply_to``
itself, and RabbitMQ (3.10-3.13) answers a publish to a malformed one, or to one whose node hash
matches no cluster node, by closing the publishing *connection* with 541 INTERNAL_ERROR: every
in-flight reply on it is lost, at the will of any user (issue 13.3).

So, before a request is executed its ``reply_to`` is checked (:func:`check_reply_to`: malformed
means ``bad_request``), and replies to a node the bridge has not yet seen accepted are published
on a separate *probation* connection with publisher confirms. A confirmed publish proves the node;
later replies to it use the main reply channel. A forged node can only ever close the probation
connection, which is reopened on demand.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from bridge.domain.cancellation import stray_as_failure
from bridge.transport import frames
from bridge.transport.request import RequestMessage

log = logging.getLogger("bridge.amqp")

DIRECT_REPLY_PREFIX = "amq.rabbitmq.reply-to."
_DIRECT = re.compile(r"^amq\.rabbitmq\.reply-to\.([A-Za-z0-9+/]+={0,2})\.([A-Za-z0-9+/]*={0,2})$")
# A pid as RabbitMQ (3.10-3.13, pid_recomposition:from_binary/1) decodes it, by pattern: any other
# shape fails there and closes the publishing connection (541), even when its node is a real one.
# The node atom: ATOM_UTF8_EXT or SMALL_ATOM_UTF8_EXT (length in 2 or 1 bytes), not the latin-1 tags.
_ATOM_TAGS = {118: 2, 119: 1}
# Then exactly id and serial (4 bytes each) and creation: 4 bytes in NEW_PID_EXT ('X', which the
# broker makes), 1 in PID_EXT ('g', Erlang 22).
_PID_TAILS = {ord("X"): 12, ord("g"): 9}
MAX_PROVEN_NODES = 256
MAX_CHECKED_NAMES = 4096  # reply_to names already parsed (a worker keeps its name for its connection)
NOT_PERSISTENT = 1
# On every reply: the bridge's clock (Cassandra's time, ms since the epoch) as it built the reply.
# Clients set their requests' x-deadline on that clock instead of their host's, which may be off.
NOW_HEADER = "x-now"


def message_ids() -> Iterator[str]:
    """Message ids of 32 hex digits, as aiormq's own (a random UUID each): a random prefix drawn
    once and a count."""
    prefix = uuid.uuid4().hex[:20]
    return (f"{prefix}{n:012x}" for n in itertools.count())


# A reply to a node not proven yet goes over a probation connection: opening it and the confirm
# are bounded, as every reply is best effort (the requester retries). Unbounded, a connection to a
# node that accepts TCP and never answers (or a dead one the OS tries for two minutes) held every
# such reply, and the deliveries they answer, while the prefetch windows filled: after a failover
# every reply goes through probation until its node is proven.
PROBATION_CONNECT_S = 5.0
PROBATION_REPLY_S = 10.0
RESTORE_WAIT_S = 3.0  # how long a reply waits for its channel to be restored after a reconnection


class _NotConfirmed(RuntimeError):
    """The broker answered a reply's publish with something other than an ack."""


class BadReplyTo(ValueError):
    pass


_checked: OrderedDict[str, str] = OrderedDict()


def reply_node(reply_to: str) -> str | None:
    """The node a direct reply-to name points at (``reply@<hash>``), or None for a plain queue
    name. Raises :class:`BadReplyTo` for a direct reply-to name the broker could not have made.
    A name is checked before its request runs and again for its reply, and a worker sends the same
    one for as long as its channel lives: names already read are remembered (bounded, oldest out)."""
    if not reply_to.startswith(DIRECT_REPLY_PREFIX):
        return None
    node = _checked.get(reply_to)
    if node is None:
        node = _checked[reply_to] = _parse_node(reply_to)
        if len(_checked) > MAX_CHECKED_NAMES:
            _checked.popitem(last=False)
    return node


def _parse_node(reply_to: str) -> str:
    m = _DIRECT.match(reply_to)
    if m is None:
        raise BadReplyTo("reply_to is not a direct reply-to name: send amq.rabbitmq.reply-to")
    try:
        pid = base64.b64decode(m.group(1), validate=True)
        base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise BadReplyTo("reply_to is not a direct reply-to name: send amq.rabbitmq.reply-to") from None
    # External term format: 131, then a pid: its node atom and exactly its numbers. The node alone is
    # not enough: once a node is proven its replies take the main channel, and a name cut short
    # after a real node (or with bytes after its pid) would close the main connection.
    if len(pid) < 4 or pid[0] != 131 or pid[1] not in _PID_TAILS or pid[2] not in _ATOM_TAGS:
        raise BadReplyTo("reply_to is not a direct reply-to name: send amq.rabbitmq.reply-to")
    width = _ATOM_TAGS[pid[2]]
    size = int.from_bytes(pid[3 : 3 + width], "big")
    node = pid[3 + width : 3 + width + size]
    if len(node) != size or size == 0 or len(pid) - (3 + width + size) != _PID_TAILS[pid[1]]:
        raise BadReplyTo("reply_to is not a direct reply-to name: send amq.rabbitmq.reply-to")
    try:
        return node.decode()  # the broker reads the node as UTF-8 (binary_to_atom/2)
    except UnicodeDecodeError:
        raise BadReplyTo("reply_to is not a direct reply-to name: send amq.rabbitmq.reply-to") from None


class ReplyPublisher:
    """Publishes replies: on the main reply channel to proven nodes and plain queues, on a
    probation connection (with confirms) to nodes not seen accepted yet. The main channel's frames
    are encoded here (``bridge.transport.frames``) and queued on aiormq's connection writer, without
    waiting for the socket: the requester's retry covers a reply lost with its connection."""

    def __init__(self, connect: Callable[[], Awaitable[AbstractConnection]], *, user: str | None = None) -> None:
        self._connect = connect
        # RabbitMQ checks that user_id is the connection's user: it proves the reply is the bridge's.
        self.user = user
        self.main: AbstractChannel | None = None
        self._main_frames: aiormq.Channel | None = None  # main's aiormq channel (changes on reconnect)
        # Replies need a message id (32 hex; aiormq would draw a random UUID for each): a random
        # prefix per process and a count.
        self._ids = message_ids()
        self._probation: AbstractConnection | None = None
        self._probation_channel: AbstractChannel | None = None
        self.proven: set[str] = set()
        self._opening = asyncio.Lock()
        self.refused = 0  # replies the broker refused (forged reply_to): only the probation connection paid
        self.now_ms: Callable[[], int] | None = None  # the bridge's clock, for NOW_HEADER (None: not sent)

    async def answer(
        self, request: RequestMessage, body: bytes, *, is_error: bool, headers: dict[str, Any] | None = None
    ) -> None:
        """Reply to ``request`` (if it has a reply_to); a requester that is gone is only logged:
        it retries, and the state is in Cassandra. With :attr:`now_ms` set, the reply says the
        bridge's time (:data:`NOW_HEADER`), read here: just before it is sent."""
        if not request.reply_to or self.main is None:
            return
        if self.now_ms is not None:
            headers = {**(headers or {}), NOW_HEADER: self.now_ms()}
        fields: dict[str, Any] = {
            "content_type": "application/json",
            "correlation_id": request.correlation_id,
            "message_type": "error" if is_error else "result",
            "user_id": self.user,
            "headers": headers or {},
            "delivery_mode": NOT_PERSISTENT,
            "message_id": next(self._ids),
        }
        try:
            # A reply to a node not proven yet waits for a confirm on the probation connection:
            # when aiormq closes that connection as stuck, the wait ends in a CancelledError this
            # task was not sent. Raised on, it ended the request's task before its delivery was
            # settled (the settle comes after the reply): a lost reply, like any other here.
            with stray_as_failure():
                await self.publish(body, fields, request.reply_to)
        except BadReplyTo:
            return  # checked before the request ran: nobody to answer
        except Exception as exc:
            log.warning("reply to %s not delivered: %s", request.reply_to, type(exc).__name__)

    async def publish(self, body: bytes, fields: dict[str, Any], reply_to: str) -> None:
        """Publish a reply whose properties are ``fields`` (``Basic.Properties``' names)."""
        node = reply_node(reply_to)
        if node is None or node in self.proven:
            # Not mandatory: RabbitMQ returns mandatory messages sent to direct reply-to even when it
            # delivers them, and a requester that is gone simply retries. Written as bytes
            # (bridge.transport.frames): one reply per request.
            await frames.publish_on(await self._main_channel(), reply_to, body, frames.properties(**fields))
            return
        async with asyncio.timeout(PROBATION_REPLY_S):
            await self._publish_on_probation(node, body, fields, reply_to)

    async def _publish_on_probation(self, node: str, body: bytes, fields: dict[str, Any], reply_to: str) -> None:
        channel = await self._probation_open()
        try:
            confirming = await channel.get_underlay_channel()
            # Waits for the broker's confirm: it proves the node, or the broker refuses the name.
            confirmed = await confirming.basic_publish(
                body, routing_key=reply_to, properties=Basic.Properties(**fields)
            )
            if not isinstance(confirmed, Basic.Ack):
                raise _NotConfirmed(f"the broker refused the reply ({type(confirmed).__name__})")
        except Exception as exc:
            if channel is self._probation_channel:  # not already replaced after another failure
                if _refused_by_broker(exc):
                    log.warning("a reply to an unknown broker node was refused: its requester sent a forged reply_to")
                    self.refused += 1
                else:
                    # The probation connection lost (a node restarting, a failover: every reply goes
                    # through it until its node is proven again), not a forged name: said as one, a
                    # broker restart logged a forgery per reply.
                    log.warning("a reply through the probation connection failed: %s", type(exc).__name__)
                await self.close_probation()
            raise
        if len(self.proven) < MAX_PROVEN_NODES:
            self.proven.add(node)  # confirmed: the broker knows this node

    def forget_proven(self) -> None:
        """After a reconnection: nodes are proven again, through the probation connection. A node
        proven once and gone from the cluster since stayed proven, and RabbitMQ closed the main
        connection (541) at each reply to it: the reply went before its request's ack, so the
        request came back, was answered on the main connection again, and so on."""
        self.proven.clear()

    async def _main_channel(self) -> aiormq.Channel:
        channel = self._main_frames
        if channel is None or frames.closing(channel):
            assert self.main is not None
            # A reconnection restores the channels one after the other, and the consume channel
            # may deliver requests before this one is back: their replies failed at once
            # (ChannelInvalidStateError), an ack applied and its caller never told. Waited for,
            # boundedly (a requester that is gone simply retries).
            async with asyncio.timeout(RESTORE_WAIT_S):
                ready = getattr(self.main, "ready", None)  # a robust channel's: restored
                if ready is not None:
                    await ready()
                channel = self._main_frames = cast(aiormq.Channel, await self.main.get_underlay_channel())
        return channel

    async def _probation_open(self) -> AbstractChannel:
        async with self._opening:  # concurrent replies share one probation connection
            if self._probation_channel is not None and not self._probation_channel.is_closed:
                return self._probation_channel
            await self.close_probation()
            async with asyncio.timeout(PROBATION_CONNECT_S):
                self._probation = await self._connect()
                self._probation_channel = await self._probation.channel(publisher_confirms=True)
            return self._probation_channel

    async def close_probation(self) -> None:
        conn, self._probation, self._probation_channel = self._probation, None, None
        if conn is not None and not conn.is_closed:
            try:
                await conn.close()
            except Exception as exc:  # already going away
                log.debug("closing the probation connection: %s", type(exc).__name__)


def _refused_by_broker(exc: BaseException) -> bool:
    """The broker's own refusal of a reply's name: not confirmed, or the connection closed with
    541 (INTERNAL_ERROR: what RabbitMQ does to a publish to a direct reply-to name it cannot
    resolve)."""
    if isinstance(exc, aiormq.exceptions.ConnectionInternalError):
        return True
    if isinstance(exc, aiormq.exceptions.ConnectionClosed | aiormq.exceptions.ChannelClosed):
        return 541 in exc.args
    return isinstance(exc, _NotConfirmed)
