"""RPC over RabbitMQ direct reply-to, and the Engine / Worker façades."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self
from urllib.parse import unquote, urlparse

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)

from bridge.client.errors import (
    BadRequestError,
    BridgeClientError,
    BrokerRefused,
    ConnectionLost,
    IntegrityError,
    InternalError,
    PayloadTooLargeError,
    RequestTimeout,
    TransportError,
    UnauthorizedError,
    UnavailableError,
    UnknownOwnerError,
    error_from_reply,
)
from bridge.client.results import results_consumer
from bridge.domain import jsonvalue
from bridge.transport.addresses import node_urls
from bridge.transport.failover import connect_first

__all__ = [
    "DEADLINE_HEADER",
    "NOW_HEADER",
    "REPLY_TO",
    "Engine",
    "FailOutcome",
    "ParkedTask",
    "RpcClient",
    "ServiceStats",
    "Task",
    "Worker",
    "iso_not_before",
    "results_consumer",
    "user_of",
]

REPLY_TO = "amq.rabbitmq.reply-to"
DEADLINE_HEADER = "x-deadline"
# On replies: the bridge's clock (Cassandra's time, ms since the epoch) as it built the reply.
NOW_HEADER = "x-now"
CLOCK_WARN_MS = 1_000  # an offset from the bridge's clock beyond this is worth telling the user, once
OFFSET_WINDOW_S = 60.0  # replies whose x-now the clock offset is taken from (the largest of them)
IDEMPOTENCY_HEADER = "x-idempotency-key"  # contract 1.5: the add's own idempotency key (empty: none)
# The keys the bridge takes in that header: 0 to 255 printable characters. A copy of
# ``IDEMPOTENCY_PATTERN`` in bridge/transport/envelope.py (importing that module would load the
# server's settings, crypto and HTTP stacks into every client); tests/unit/test_client_refusals.py
# holds the two together. Any other key is refused ``bad_request``: an add without ``wait`` (no
# reply-to) was dead-lettered with nobody told, so ``Engine.add`` refuses it before sending.
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{0,255}")
# The shortest lease the contract allows (``timeToRecover``: docs/asyncapi.yaml ``minimum: 100``,
# ``ge=100`` in bridge/domain/models.py): a shorter one is refused ``bad_request`` at every beat.
MIN_TIME_TO_RECOVER_MS = 100
MIN_BEAT_S = 0.1  # keep_alive never beats faster than this, however short the lease
LEASE_ENDED_BEAT_S = 1.0  # keep_alive after extends without an answer, once the lease ran out: this at least
BEAT_BACKOFF_MAX_S = 10.0  # ... backing off (full jitter) up to this
FAIL_RESENDS = 2  # a fail without an answer is sent again this many times when its lease comes back
SEND_MIN_S = 2.0  # a call whose wait is shortened (a beat's) still has this long to connect and write
BEAT_WAIT_MIN_S = 0.5  # keep_alive: a beat waits for its reply half the lease left, but at least this
REDRIVE_RATE = 50.0  # the bridge's default BRIDGE_REDRIVE_RATE: parked tasks put back per second
REDRIVE_ALL_MAX = 1000  # parked tasks one ``redrive all`` request puts back at most
PURGE_MAX = 20_000  # ready tasks one purge request looks at, at most (the bridge's bound)
# How long the bridge may take per task of a request that changes tasks one compare-and-set (a
# Cassandra LWT, several round trips) at a time: its reply is awaited the client's timeout plus
# this much per task it may touch, as a redrive's is by its pace. Generous on purpose: a wait too
# short reported "no reply" for a purge the bridge went on with; a longer one costs only the wait
# when no bridge answers.
PURGE_SECONDS_PER_TASK = 0.01  # a lease read (shared by 50), a compare-and-set, a mark
DISCARD_SECONDS_PER_TASK = 0.02  # a lease read, a compare-and-set and a delete, one id after another
UNKNOWN_LEASE_S = 3.0  # a lease keep_alive cannot read, of a length it was not told: beat every second
# Reads that the bridge runs as long requests (its LONG_METHODS): ``stats`` of every queue reads
# the counts of up to 1,000 queues (16 at a time), ``parked`` up to 10,000 index rows and their
# leases. Awaited this much longer than a short request, as a purge's reply is by its tasks.
STATS_ALL_WAIT_S = 10.0
PARKED_WAIT_S = 5.0
# The bridge's queue of each method's requests: add, fetch and ack have one each, the lifecycle
# methods share one. A reply to any request of a queue shows the route to it works.
ROUTE_OF_METHOD = {"add": "add", "fetch": "fetch", "ack": "ack"}

log = logging.getLogger("bridge.client")


def _route(method: str) -> str:
    return ROUTE_OF_METHOD.get(method, "lifecycle")


def user_of(url: str) -> str:
    parsed = urlparse(url)
    return unquote(parsed.username or "guest")


# Requests whose late replies still tell the bridge's time (a few seconds of a busy client's).
ISSUED_REMEMBERED = 4096

_BROKER_MAX_SIZE = re.compile(r"larger than (?:configured )?max size (\d+)")  # both of RabbitMQ's wordings


def _too_large(closed_by: object, size: int) -> PayloadTooLargeError | None:
    """The error of a request of ``size`` bytes whose channel the broker closed because of a
    message over its ``max_message_size`` (406 PRECONDITION_FAILED, "message size N is larger
    than configured max size M"), None for any other close or a request within the bound. Taken
    for a lost connection, such a request was sent again and again: an engine's add for ever, a
    worker's ack until the lease ended (and the task ran again, every lease)."""
    if not isinstance(closed_by, ChannelPreconditionFailed):
        return None
    bound = _BROKER_MAX_SIZE.search(str(closed_by))
    if bound is None or size <= int(bound.group(1)):
        return None
    return PayloadTooLargeError(
        f"the request's {size} bytes are over RabbitMQ's max_message_size ({bound.group(1)}): refused by the broker"
    )


class RpcClient:
    """Publishes requests to the bridge's exchange and awaits replies on direct reply-to.

    Direct reply-to is at-most-once: a reply can be lost if the connection drops. The worker's
    RPCs are safe to repeat (fetch returns the held task again, a repeated ack of a completed task
    is answered true), so callers retry them on :class:`~bridge.client.errors.TransportError`
    (:class:`RequestTimeout`, :class:`ConnectionLost`). An add is safe to repeat only with a
    ``message_id`` (its idempotency key): the first copy may have been stored, and a retry without
    one stores a second task.

    ``timeout`` bounds each call as a whole (plus what the request itself may take: a long-poll's
    wait, a redrive's pace): getting a connection and a channel, sending the request, awaiting
    its reply. A broker that stops reading this client's socket (a memory or disk alarm: it stops
    reading publishers) blocks the send of a large request; the call then raises
    :class:`RequestTimeout` at its deadline instead of waiting for the alarm to end, and the next
    call goes on a new connection. Connecting tries each node for ``connect_timeout`` (default
    ``timeout``) at most; a call whose deadline cut a node's connect starts the next call at the
    node after it.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "queue-bridge",
        timeout: float = 10.0,
        hosts: Sequence[str] = (),
        connect_timeout: float | None = None,
    ) -> None:
        self.url = url
        # ``hosts``: the nodes of a RabbitMQ cluster, each with ``url``'s user, vhost and options
        # (as the bridge's BRIDGE_AMQP_HOSTS). A new connection starts at the node after the one
        # whose connection was lost or left a request without a reply.
        self.urls = node_urls(url, hosts)
        self._node = 0  # index in self.urls of the node of the open (or last) connection
        self.exchange_name = exchange
        self.timeout = timeout
        # Each node's bound to accept a connection (default ``timeout``): a node that accepts TCP
        # and never answers takes that long before the next is tried.
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.user = user_of(url)
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None
        # Requests without a reply (``add(wait=False)``) go on a channel of their own in confirm
        # mode, opened on first use on the same connection: with nothing to answer them, the
        # broker's ack is the only word that one was taken (RPCs, answered by the bridge, need no
        # confirm and do not wait for one).
        self._confirms: AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._pending_method: dict[str, str] = {}  # correlation id -> method, while its reply is awaited
        self._pending_bytes: dict[str, int] = {}  # correlation id -> its body's size (see ``_too_large``)
        # The correlation ids of the last requests sent (a reply to one, a late one included, tells
        # the bridge's time; any other message on the reply channel does not): see ``_on_reply``.
        self._issued: OrderedDict[str, None] = OrderedDict()
        # route (the bridge's queue, ``ROUTE_OF_METHOD``) -> when a reply through it last came (monotonic)
        self._replied: dict[str, float] = {}
        self._connecting = asyncio.Lock()
        self._closed = False
        # The channel a request got no reply on: the next request goes on a new connection.
        self._suspect: AbstractChannel | None = None
        # Closes of replaced connections, under way in the background (see _retire).
        self._retiring: set[asyncio.Task[None]] = set()
        # The bridge's clock minus this host's monotonic clock (ms), from the replies' x-now (None
        # until one says it, or with bridges that do not): deadlines are set on the bridge's clock,
        # which judges them, so a host clock that is off does not make every request late or
        # early. Carried by the monotonic clock, not the wall clock: a step of the host's clock
        # (NTP, an operator) moves neither the bridge's time as this client reckons it nor the
        # deadlines (against the wall clock, a step forward was kept in the largest offset of the
        # window for a minute).
        self._mono_offset_ms: int | None = None
        self._offsets: deque[tuple[float, int]] = deque()  # (when seen, monotonic offset) of the last replies
        self._clock_warned = False

    async def open(self) -> None:
        self._closed = False
        await self._ensure_open()

    async def _ensure_open(self) -> AbstractChannel:
        """(Re)connect on demand. Replies are bound to a connection, so instead of the robust
        connection's automatic restore (which re-declares what it saw), a lost connection fails
        what was pending and the next call connects afresh."""
        async with self._connecting:
            if self._closed:  # close() ran while this call waited for the lock: connect no more
                raise ConnectionLost("the client was closed before the request was sent", sent=False)
            if self.channel is not None and not self.channel.is_closed and self.channel is not self._suspect:
                return self.channel
            if self.channel is not None and self.channel is self._suspect:
                log.warning("no reply to a request on this connection: sending the next one on a new connection")
            if self.connection is not None:
                self._node = (self._node + 1) % len(self.urls)  # its node may be the trouble: start after it
            self._retire()
            order = self.urls[self._node :] + self.urls[: self._node]
            try:
                connection, step = await connect_first(order, timeout=self.connect_timeout)
            except asyncio.CancelledError:
                # The call's deadline (or its caller) cut the connect: the node being tried did not
                # accept in time. The next call starts after it, or a node that never answers (a
                # host gone without a reset) would take every call's whole time.
                self._node = (self._node + 1) % len(self.urls)
                raise
            self.connection = connection
            self._node = (self._node + step) % len(self.urls)
            connection.close_callbacks.add(self._on_lost)
            try:
                # Bounded: a broker that stopped reading this socket (an alarm) never answers the
                # channel's open, and open() has no deadline of a call around it.
                async with asyncio.timeout(self.timeout):
                    channel = await connection.channel(publisher_confirms=False)
                    channel.close_callbacks.add(self._on_lost)
                    # Direct reply-to: consume the pseudo-queue (no-ack) on the channel we publish on.
                    reply_queue = await channel.get_queue(REPLY_TO, ensure=False)
                    await reply_queue.consume(self._on_reply, no_ack=True)
            except (OSError, aio_pika.exceptions.AMQPError):
                raise
            except Exception as exc:
                # Only what a closing connection raises; a TypeError or an AttributeError (an API
                # changed under us) is a bug to see, not a connection to retry for ever.
                if not isinstance(exc, CONNECTION_EXCEPTIONS) and type(exc) is not Exception:
                    raise
                # A connection that closed as its channel opened: aiormq raises a plain
                # RuntimeError ("<Connection> closed"), a ChannelInvalidStateError (a consume on a
                # closed channel), even a bare Exception() for an open the close cut. Said as the
                # connection's failure it is (a ConnectionError, as open()'s callers expect, and
                # ConnectionLost not sent in a call, see _send); the next call connects afresh.
                raise ConnectionError(
                    f"the connection to RabbitMQ closed as it opened ({type(exc).__name__}: {exc})"
                ) from None
            if self._closed:
                # close() was called while this connected and waits for the lock: it would close
                # what is stored, but a connection handed on from here would be used (and left
                # open, with its reply consumer) by a client that is closed. Closed here instead.
                self.connection = None
                await self._close_bounded(connection)
                raise ConnectionLost("the client was closed before the request was sent", sent=False)
            self.channel = channel
            return channel

    def _detach(self) -> AbstractConnection | None:
        """Take the connection out of use (the caller closes it): its requests still awaiting a
        reply fail now (ConnectionLost: retry them), and its close callbacks are removed, so that
        its close, however late it ends (a broker that stopped reading answers no close), fails
        nothing sent on the next connection."""
        connection, channel = self.connection, self.channel
        self.connection, self.channel, self._suspect, self._confirms = None, None, None, None
        for closable in (connection, channel):
            if closable is not None:
                with contextlib.suppress(RuntimeError):  # frozen: its close is running the callbacks now
                    closable.close_callbacks.discard(self._on_lost)
        self._on_lost()
        return connection

    def _retire(self) -> None:
        """Detach the connection and close it in the background: the call that replaces it does
        not wait for that (a connection whose socket the broker stopped reading takes minutes to
        close). :meth:`close` waits for it."""
        connection = self._detach()
        if connection is None or connection.is_closed:
            return
        closing = asyncio.create_task(self._close_bounded(connection), name="close a replaced connection")
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)

    async def _close_bounded(self, connection: AbstractConnection) -> None:
        """Close ``connection``, waiting ``timeout`` at most (a broker that stopped reading its
        socket answers no close); never raises: it is being given up either way."""
        if connection.is_closed:
            return
        try:
            await asyncio.wait_for(connection.close(), self.timeout)
        except Exception as exc:  # already failing: the reply-to dies with it all the same
            log.warning("closing the broker connection: %s: %s", type(exc).__name__, exc)

    def _on_lost(self, sender: object = None, exc: object = None, *_: Any) -> None:
        if sender is not None and sender is not self.connection and sender is not self.channel:
            # A connection or channel no longer in use: a channel given up while it opened (a
            # call's deadline cut its consume) kept this callback, and the old connection's close,
            # ending later, failed every request waiting on the next one. Its requests were failed
            # when it was detached.
            return
        # Replies to the old connection are gone: fail what was waiting so callers retry. A channel
        # the broker closed because the exchange is missing or the user may not publish to it is
        # said so: no network retry fixes that, a bridge starting or a permission granted does.
        refused = isinstance(exc, ChannelNotFoundEntity | ChannelAccessRefused)
        for correlation_id, fut in self._pending.items():
            if fut.done():
                continue
            too_large = _too_large(exc, self._pending_bytes.get(correlation_id, 0))
            if too_large is not None:
                fut.set_exception(too_large)
            elif refused:
                fut.set_exception(
                    BrokerRefused(
                        f"RabbitMQ refused the request on exchange {self.exchange_name!r} ({exc}): "
                        "is a bridge running with this exchange, and may this user publish to it?"
                    )
                )
            else:
                fut.set_exception(ConnectionLost("connection to RabbitMQ was lost before the reply; retry the request"))
        self._pending.clear()
        self._pending_method.clear()
        self._pending_bytes.clear()

    async def close(self) -> None:
        self._closed = True
        # Under the connect lock: a call may be (re)connecting, and the connection it is making
        # is not stored yet. Waiting for it (bounded by the connect timeout) means that when this
        # returns, no connection of this client is open and none will be: the call, seeing the
        # client closed, closes what it made and raises ConnectionLost. So are the connections
        # replaced earlier, whose close went on in the background.
        async with self._connecting:
            connection = self._detach()
            if connection is not None:
                await self._close_bounded(connection)
        if self._retiring:
            await asyncio.wait(set(self._retiring))

    async def _drop_connection(self) -> None:
        """Close the broker connection, and with it the reply-to of every request still awaiting
        its answer, but not the client: the next call connects afresh. A bridge then claims
        nothing for such a request's long-poll (it probes the reply-to before a claim)."""
        async with self._connecting:
            connection = self._detach()
        if connection is not None:
            await self._close_bounded(connection)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        # The bridge's time from a reply to a request of ours, a late one included; not from any
        # message: one with a far-future x-now (from whoever learns the reply-to address and may
        # publish to the default exchange) moved the clock for a minute (every lease read as
        # ended, keep-alives beat every 0.1 s).
        if (message.correlation_id or "") in self._issued:
            self._learn_clock(message.headers)
        fut = self._pending.pop(message.correlation_id or "", None)
        method = self._pending_method.pop(message.correlation_id or "", None)
        self._pending_bytes.pop(message.correlation_id or "", None)
        if method is not None:
            self._replied[_route(method)] = time.monotonic()
        if fut is not None and not fut.done():
            fut.set_result((jsonvalue.loads(message.body), dict(message.headers or {})))

    def _learn_clock(self, headers: Mapping[str, Any] | None) -> None:
        """Take the offset of the bridge's clock from a reply's x-now. The reply was built just
        before it was sent, so the error is about one broker hop (it can only make the offset
        smaller: a deadline a little early by the bridge's clock, never late). A header that is
        missing or not an integer (a bridge before it, anything else) is ignored."""
        now = (headers or {}).get(NOW_HEADER)
        if isinstance(now, bool) or not isinstance(now, int) or now <= 0:
            return
        seen_at = time.monotonic()
        offset = now - int(seen_at * 1000)
        # The largest of the last minute's: a reply held on its way (behind a broker's flow
        # control or alarm) says a time already past, so its offset is too small by the delay,
        # never too large. Taken as it came, a keep-alive timed on it beat after its lease ended.
        # A sliding maximum: offsets no larger than a newer one can never be the maximum again,
        # so each reply costs O(1) however many a busy worker gets in a minute.
        while self._offsets and self._offsets[-1][1] <= offset:
            self._offsets.pop()
        self._offsets.append((seen_at, offset))
        while seen_at - self._offsets[0][0] > OFFSET_WINDOW_S:
            self._offsets.popleft()
        self._mono_offset_ms = self._offsets[0][1]
        offset = self.clock_offset_ms or 0
        if abs(offset) > CLOCK_WARN_MS and not self._clock_warned:
            self._clock_warned = True
            log.warning(
                "this host's clock is %.1f s %s the bridge's (Cassandra's time): request deadlines are "
                "set on the bridge's clock from now on, but fix this host's clock (NTP)",
                abs(offset) / 1000,
                "behind" if offset > 0 else "ahead of",
            )

    @property
    def clock_offset_ms(self) -> int | None:
        """The bridge's clock minus this host's wall clock (ms) now, as the replies' ``x-now`` told
        it; None until one did."""
        if self._mono_offset_ms is None:
            return None
        return round((self.bridge_time() - time.time()) * 1000)

    def bridge_time(self) -> float:
        """Now by the bridge's clock (seconds since the epoch), as far as this client knows: from
        the replies' ``x-now``, carried by this host's monotonic clock (a step of its wall clock
        does not move it); this host's wall clock until a reply told it."""
        if self._mono_offset_ms is None:
            return time.time()
        return time.monotonic() + self._mono_offset_ms / 1000

    async def publish(
        self,
        method: str,
        body: Any,
        *,
        reply: bool = True,
        owner: str | None = None,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        raw: bytes | None = None,
        wait_s: float = 0.0,
        deadline: float | None = None,
    ) -> asyncio.Future[Any] | None:
        """Send a request: the future of its reply (None without ``reply``).

        ``deadline`` (on the event loop's clock; by default ``timeout`` from now) bounds getting a
        channel and the send. Past it, a request not yet being written raises ConnectionLost
        (``sent`` false); one being written raises RequestTimeout: its frames are queued on the
        connection and may still go out when the broker reads again (a bridge drops an RPC that
        comes past its ``x-deadline``; an add is stored: retry it with its ``message_id``), and
        the next call goes on a new connection.

        Without ``reply`` the request goes in confirm mode (mandatory): this returns once RabbitMQ
        has taken it (routed to a queue, and on a durable queue written), and raises
        :class:`BrokerRefused` if it was not (no queue bound for ``method``, the exchange missing,
        the broker nacked it) and RequestTimeout if the broker did not say by the deadline. What a
        bridge then does with it is not awaited.

        With ``reply``, the future fails with RequestTimeout if no reply came by the deadline (plus
        ``wait_s``): nothing is kept waiting for a reply that will not come."""
        loop = asyncio.get_running_loop()
        at = deadline if deadline is not None else loop.time() + self.timeout
        correlation_id, fut = await self._request(
            method, body, reply=reply, owner=owner, message_id=message_id, headers=headers, raw=raw, deadline=deadline
        )
        if fut is not None:
            expires = at + (wait_s if deadline is None else 0.0)  # a caller's deadline already holds the wait
            loop.call_at(expires, self._expire, correlation_id, method, round(expires - loop.time(), 3))
        return fut

    def _expire(self, correlation_id: str, method: str, waited: float) -> None:
        """The deadline of a :meth:`publish` reply: its entry is taken out (a reply that never
        comes would keep it for the life of the connection) and its future fails."""
        fut = self._pending.pop(correlation_id, None)
        self._pending_method.pop(correlation_id, None)
        self._pending_bytes.pop(correlation_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(RequestTimeout(f"no reply to {method} within {waited:g}s", waited_s=waited))

    async def _request(
        self,
        method: str,
        body: Any,
        *,
        reply: bool = True,
        owner: str | None = None,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        raw: bytes | None = None,
        wait_s: float = 0.0,
        deadline: float | None = None,
        send_by: float | None = None,
    ) -> tuple[str, asyncio.Future[Any] | None]:
        """:meth:`publish`: (the request's correlation id, the future of its reply or None).
        ``wait_s`` is the caller's to count in ``deadline``; ``send_by``, when earlier than the
        deadline, bounds connecting and writing alone (the request still says ``deadline``)."""
        del wait_s
        if self._closed:
            raise RuntimeError("client is closed")
        # Encoded first: a value JSON cannot carry fails here, before a reply is awaited (a future
        # registered for a request never sent would stay pending until the connection closes).
        payload = raw if raw is not None else jsonvalue.dumps(body)
        loop = asyncio.get_running_loop()
        started = loop.time()
        at = deadline if deadline is not None else started + self.timeout
        bound = at if send_by is None else min(at, send_by)
        writing: list[AbstractChannel] = []  # the channel, once the write began (read on a timeout)
        try:
            async with asyncio.timeout_at(bound):
                # Built once connected: its ``timestamp`` says when it was sent (a nameless ack is
                # judged by it) and its ``x-deadline`` is this deadline.
                return await self._send(
                    method, lambda: self._message(method, payload, at, reply, owner, message_id, headers), writing
                )
        except TimeoutError:
            # Only the deadline's: _send turns every other error (TimeoutError is an OSError) into
            # ConnectionLost.
            waited = round(bound - started, 3)
            if not writing:
                raise ConnectionLost(
                    f"{method} not sent: no channel to RabbitMQ within {waited:g}s", sent=False
                ) from None
            # A write that does not end: the broker does not read this connection's socket (an
            # alarm blocks publishers) or the network stalls. Every request after it would queue
            # behind it, so the next call goes on a new connection. (Without a reply, also a
            # confirm that did not come: it may still have been taken.)
            self._suspect = writing[0]
            raise RequestTimeout(
                f"{method} not sent within {waited:g}s (RabbitMQ is not reading this connection: an alarm?); "
                "it may still go out",
                waited_s=waited,
            ) from None

    def _message(
        self,
        method: str,
        payload: bytes,
        at: float,
        reply: bool,
        owner: str | None,
        message_id: str | None,
        headers: dict[str, Any] | None,
    ) -> aio_pika.Message:
        hdrs: dict[str, Any] = dict(headers or {})
        if owner is not None:
            hdrs["x-owner"] = owner
        # The bridge's clock judges both the deadline and (an ack without a task id) the timestamp.
        now = self.bridge_time()
        if reply:
            # Past this moment we will have given up (and may retry): the bridge drops the request
            # instead of executing it late, when its outcome could only act on state that moved on.
            left = at - asyncio.get_running_loop().time()
            hdrs.setdefault(DEADLINE_HEADER, int((now + left) * 1000))
        return aio_pika.Message(
            payload,
            content_type="application/json",
            correlation_id=uuid.uuid4().hex,
            reply_to=REPLY_TO if reply else None,
            user_id=self.user,
            message_id=message_id,
            headers=hdrs,
            timestamp=datetime.fromtimestamp(now, tz=UTC),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def _send(
        self, method: str, build: Callable[[], aio_pika.Message], writing: list[AbstractChannel]
    ) -> tuple[str, asyncio.Future[Any] | None]:
        """Publish the message ``build`` makes on this client's channel (connecting first if need
        be), or, without a reply, on its confirm channel, awaiting the broker's ack; its correlation
        id and the future of its reply, when it asks for one. ``writing`` gets the (main) channel
        once the write begins."""
        try:
            channel = await self._ensure_open()
        except CONNECTION_EXCEPTIONS as exc:
            # Every failure aio-pika counts as a connection's (connect_first re-raises the last
            # node's as it came: a RuntimeError, a StopAsyncIteration of a handshake that met EOF,
            # not only OSError and AMQPError) is a request not sent: escaping as itself, it ended
            # Worker.run (whose loop retries BridgeClientError only) and stopped a keep-alive.
            raise ConnectionLost(f"cannot reach RabbitMQ: {type(exc).__name__}: {exc}", sent=False) from None
        message = build()
        correlation_id = message.correlation_id or ""
        fut: asyncio.Future[Any] | None = None
        if message.reply_to:
            # Registered before the publish (a reply can come before publish returns) and taken out
            # again on every way out of it that is not a sent request, cancellation included.
            fut = asyncio.get_running_loop().create_future()
            self._pending[correlation_id] = fut
            self._pending_method[correlation_id] = method
            self._pending_bytes[correlation_id] = len(message.body)
            self._issued[correlation_id] = None
            if len(self._issued) > ISSUED_REMEMBERED:
                self._issued.popitem(last=False)
        try:
            target = channel if message.reply_to else await self._confirming(channel)
            exchange = await target.get_exchange(self.exchange_name, ensure=False)
            if self._closed:  # close() ran since the channel was handed out: send nothing more
                raise ConnectionLost("the client was closed before the request was sent", sent=False)
            writing.append(channel)
            # Mandatory (aio-pika's default): in confirm mode a message no queue takes comes back
            # (PublishError) instead of being dropped in silence.
            await exchange.publish(message, routing_key=method)
        except ConnectionLost:
            self._forget(correlation_id, fut)
            raise
        except (DeliveryError, ChannelNotFoundEntity, ChannelAccessRefused) as refused:
            # Confirm mode only: returned, nacked, or the channel closed by the broker (no such
            # exchange, no permission) before its ack. Nothing was taken: not a network trouble.
            self._forget(correlation_id, fut)
            raise BrokerRefused(self._refusal(method, refused)) from None
        except ChannelPreconditionFailed as exc:
            # Confirm mode: the channel closed under the publish. Over the broker's max_message_size,
            # the request itself was refused, and sending it again cannot help.
            self._forget(correlation_id, fut)
            too_large = _too_large(exc, len(message.body))
            if too_large is not None:
                raise too_large from None
            raise ConnectionLost(f"the channel closed under the request ({exc}); retry it", sent=True) from None
        except Exception as exc:
            # Not only AMQP, OS and runtime errors: aiormq fails a publish whose frames were being
            # written when the connection closed with a bare ``Exception()``. Callers catch
            # TransportError to retry; anything else would escape them.
            self._forget(correlation_id, fut)
            # Only a channel already closed before the write means nothing left; a connection lost
            # while the frames were being written may have delivered them (a fetch may still claim
            # a task for this worker: Worker.run waits out its deadline when stopping).
            unsent = not writing or isinstance(exc, ChannelInvalidStateError)
            what = "request not sent" if unsent else "connection lost while sending the request"
            raise ConnectionLost(f"{what} ({type(exc).__name__}); retry it", sent=not unsent) from None
        except BaseException:  # cancelled while publishing (its deadline, its caller): nobody awaits the reply
            self._forget(correlation_id, fut)
            raise
        return correlation_id, fut

    def _refusal(self, method: str, exc: BaseException) -> str:
        """What a :class:`BrokerRefused` of a confirmed publish says."""
        if isinstance(exc, PublishError):
            return (
                f"RabbitMQ returned {method}: no queue is bound to exchange {self.exchange_name!r} for it "
                "(has a bridge declared its queues?); nothing was taken"
            )
        if isinstance(exc, DeliveryError):
            return f"RabbitMQ nacked {method} on exchange {self.exchange_name!r}: it did not take it; retry it"
        return (
            f"RabbitMQ refused {method} on exchange {self.exchange_name!r} ({exc}): "
            "is a bridge running with this exchange, and may this user publish to it?"
        )

    async def _confirming(self, channel: AbstractChannel) -> AbstractChannel:
        """The confirm-mode channel (see :attr:`_confirms`) on the connection of ``channel``,
        opened on first use or after the broker closed it (a publish it refused)."""
        async with self._connecting:
            connection = self.connection
            if connection is None or channel is not self.channel:
                raise ConnectionLost("the connection was replaced before the request was sent", sent=False)
            if self._confirms is None or self._confirms.is_closed:
                try:
                    self._confirms = await connection.channel(publisher_confirms=True, on_return_raises=True)
                except asyncio.CancelledError:
                    # The call's deadline cut the open: a broker that does not answer a channel's
                    # open (an alarm, a stalled network) would not take requests either: the next
                    # call goes on a new connection.
                    self._suspect = channel
                    raise
            return self._confirms

    def _forget(self, correlation_id: str, fut: asyncio.Future[Any] | None) -> None:
        """Drop the reply future of a request whose publish failed: nobody will await it. The
        connection's loss may already have failed it (``_on_lost`` fails every registered future,
        those of calls still queued to publish included); its exception is read here, or asyncio
        logs "Future exception was never retrieved" for an outcome the caller got from publish."""
        self._pending.pop(correlation_id, None)
        self._pending_method.pop(correlation_id, None)
        self._pending_bytes.pop(correlation_id, None)
        if fut is None:
            return
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()

    async def call_raw(
        self, method: str, body: Any, *, within: float | None = None, **kw: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send a request and return (reply body, reply headers) without interpreting errors.

        One deadline, ``timeout`` (plus the request's own ``wait_s``) from now, bounds the whole
        call: connecting, sending (see :meth:`publish`) and awaiting the reply; ``within``, when
        shorter, bounds the wait for the reply alone: the request's ``x-deadline`` stays the
        whole ``timeout`` (a heartbeat's extend that a slow bridge applies late still keeps the
        lease; cut at ``within``, a bridge 3.5 s behind dropped every beat of a 9 s lease)."""
        sent = time.monotonic()
        limit = self.timeout + kw.get("wait_s", 0.0)  # a long-poll fetch is answered after its wait
        now = asyncio.get_running_loop().time()
        at = now + limit
        shortened = within is not None and within < limit
        wait_at = now + within if within is not None and shortened else at
        # Not publish(): the entry of its reply is taken out here, by its id, however the call ends.
        # A shortened call bounds its connect and write too, but never under SEND_MIN_S: cut at a
        # beat's half second, a reconnect that takes a second (TLS to a remote broker) never made it.
        send_by = max(wait_at, now + min(limit, SEND_MIN_S)) if shortened else None
        correlation_id, fut = await self._request(method, body, deadline=at, send_by=send_by, **kw)
        assert fut is not None
        try:
            async with asyncio.timeout_at(wait_at):
                reply: tuple[dict[str, Any], dict[str, Any]] = await fut
                return reply
        except TimeoutError:
            if shortened:  # a wait cut short by its caller says nothing of the route (below)
                raise RequestTimeout(f"no reply to {method} within {within}s", waited_s=within) from None
            # The channel may route nothing to this method's queue any more: RabbitMQ before
            # 3.11.x/3.12.x kept sending a channel's publishes to a quorum queue's lost leader when
            # the channel's first publish to that queue came while the queue elected a new one
            # (rabbitmq-server#9208), silently and for as long as that node stayed down; a new
            # connection is served. Not when a reply through the same route (the same queue of the
            # bridge: a ``stats`` and an ``extend`` share one) came since this request was sent:
            # the route works, the bridge is slow (replacing the connection fails every request in
            # flight on it, and a busy engine's retries would add to the load). Judged by method,
            # a slow ``stats`` whose queue answered extends meanwhile replaced the connection, and
            # every add in flight on it lost its reply (found by review, 2026-12-07).
            if self._replied.get(_route(method), -1.0) < sent:
                self._suspect = self.channel
            raise RequestTimeout(f"no reply to {method} within {limit}s", waited_s=limit) from None
        finally:
            self._pending.pop(correlation_id, None)
            self._pending_method.pop(correlation_id, None)
            self._pending_bytes.pop(correlation_id, None)
        self._pending_bytes.pop(correlation_id, None)

    async def call(self, method: str, body: Any, **kw: Any) -> dict[str, Any]:
        reply, headers = await self.call_raw(method, body, **kw)
        if "error" in reply:
            raise error_from_reply(reply["error"])
        reply["_headers"] = headers
        return reply


def iso_not_before(when: datetime | str) -> str:
    """The wire form of ``notBefore``: ISO 8601 with a UTC offset.

    A naive datetime is refused rather than guessed: read as local time here and as UTC at the
    bridge, it would move the task by hours. A datetime is sent in UTC at the bridge's precision
    (milliseconds), rounded up, so the task is never handed out before the moment asked for. A
    string is checked (it must parse and carry an offset) and sent as given.
    """
    if isinstance(when, str):
        try:
            parsed = datetime.fromisoformat(when)
        except ValueError:
            raise ValueError(f"not_before is not an ISO 8601 date-time: {when!r}") from None
        if parsed.utcoffset() is None:
            raise ValueError(f"not_before needs a UTC offset (such as 'Z' or '+02:00'): {when!r}")
        return when
    if when.utcoffset() is None:
        raise ValueError("not_before must be timezone-aware (for example datetime.now(UTC) + timedelta(...))")
    utc = when.astimezone(UTC)
    if utc.microsecond % 1000:
        utc += timedelta(microseconds=1000 - utc.microsecond % 1000)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _amqp_message_id(key: str) -> str:
    """The AMQP ``message_id`` of an add with this idempotency key: the key itself, or its
    SHA-256 when it is longer than the property's 255 bytes (the key travels whole in its header,
    contract 1.5, up to 255 characters). Put there as is, a longer key failed the publish at every
    try, reported as a lost connection ("retry it"); the digest is the same at every retry, so a
    bridge before 1.5, which de-duplicates on ``message_id``, still sees one add."""
    if len(key.encode("utf-8", "surrogatepass")) <= 255:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _checked_idempotency_key(key: str | None) -> str:
    """The ``x-idempotency-key`` header of an add with this key ("" for none), or ValueError for a
    key the bridge would refuse (see :data:`IDEMPOTENCY_KEY_PATTERN`): over 255 characters, a
    control character, or one UTF-8 cannot carry (a lone surrogate: the publish itself fails)."""
    if not key:
        return ""
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"message_id (the idempotency key) must be 0 to 255 printable characters, the bridge refuses "
            f"any other ({len(key)} characters{', with a control character' if len(key) <= 255 else ''})"
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("message_id (the idempotency key) is not valid Unicode (a lone surrogate)") from None
    return key


def _add_options(
    delay_ms: int | None, not_before: datetime | str | None, max_deliveries: int | None, priority: int | None = None
) -> dict[str, Any]:
    """The optional fields of an add (contract 1.4). Ranges are the bridge's to check (it knows
    the TTL); a request that could only be refused is refused here, before anything is sent."""
    if delay_ms is not None and not_before is not None:
        raise ValueError("give delay_ms or not_before, not both")
    body: dict[str, Any] = {}
    if delay_ms is not None:
        body["delayMs"] = delay_ms
    if not_before is not None:
        body["notBefore"] = iso_not_before(not_before)
    if max_deliveries is not None:
        body["maxDeliveries"] = max_deliveries
    if priority is not None:
        body["priority"] = priority
    return body


@dataclass(frozen=True)
class ServiceStats:
    """One queue's counts as the bridge answers them (``stats``); ``oldest_ready_age_ms`` is None
    when nothing is ready."""

    service_id: str
    ready: int
    in_flight: int
    delayed: int
    parked: int
    oldest_ready_age_ms: int | None

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> ServiceStats:
        age = doc.get("oldestReadyAgeMs")
        return cls(
            str(doc["serviceId"]),
            int(doc["ready"]),
            int(doc["inFlight"]),
            int(doc["delayed"]),
            int(doc["parked"]),
            None if age is None else int(age),
        )


class StatsList(list[ServiceStats]):
    """``Engine.stats``' answer: the counts (a list, as it always was), and ``unavailable``: the
    queues whose counts the bridge could not read now (left out of the list)."""

    def __init__(self, found: Iterable[ServiceStats], unavailable: Iterable[str] = ()) -> None:
        super().__init__(found)
        self.unavailable = [str(name) for name in unavailable]


@dataclass(frozen=True)
class ParkedTask:
    """A parked task (``parked``), without its value: what an operator needs to decide between
    :meth:`Engine.redrive` and :meth:`Engine.discard`. Times are ISO 8601 strings, as on the wire."""

    id: str
    deliveries: int
    # "delivery_limit" (reached max_deliveries), "failed", or "key_missing" (its claims found the key
    # it was sealed with missing for BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS, none handing it out)
    reason: str
    last_error: Any  # the ``error`` of the last technical fail, or None
    parked_at: str
    added_at: str
    # parking it sent the engine a delivery_limit result (not for "key_missing": its token is
    # sealed with the missing key)
    has_token: bool
    # Its error (if any) was left out of the listing: the errors before it filled the reply's
    # budget (4 MiB). Redrive or discard those first to see it.
    last_error_omitted: bool = False

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> ParkedTask:
        return cls(
            str(doc["id"]),
            int(doc["deliveries"]),
            str(doc["reason"]),
            doc.get("lastError"),
            str(doc["parkedAt"]),
            str(doc["addedAt"]),
            bool(doc["hasToken"]),
            bool(doc.get("lastErrorOmitted", False)),
        )


@dataclass(frozen=True)
class ParkedPage:
    """One page of a queue's parked tasks (``Engine.parked_page``). ``after``: where the listing
    stopped short of the index's end (more may be parked): pass it back for the next page; None
    once it read to the end. ``paged`` False: the bridge is older than 1.11 and cannot page
    (``after`` is None whatever is parked past these ``tasks``).

    Pages follow the tasks' ids (their add times), not the times they were parked: a task
    parked behind the cursor while pages were read is in none of the later pages. List from
    the start again to see those."""

    tasks: list[ParkedTask]
    after: str | None
    paged: bool = True


@dataclass(frozen=True)
class FailOutcome:
    """What a technical fail did with the task: it comes back at ``retry_at`` (ISO 8601), or it
    was ``parked`` (its delivery limit reached) and ``retry_at`` is None."""

    task_id: str
    deliveries: int
    parked: bool
    retry_at: str | None

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> FailOutcome:
        retry_at = doc.get("retryAt")
        return cls(
            str(doc["id"]), int(doc["deliveries"]), bool(doc["parked"]), None if retry_at is None else str(retry_at)
        )


class Engine(RpcClient):
    """The workflow-engine side: add tasks and manage queues (optionally for another owner, if the
    bridge trusts us: every request then carries ``x-owner``)."""

    def __init__(self, url: str, *, owner: str | None = None, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.owner = owner

    @classmethod
    def connect(cls, url: str, *, owner: str | None = None, **kw: Any) -> Self:
        return cls(url, owner=owner, **kw)

    async def add(
        self,
        service: str,
        value: Any,
        *,
        token: Any = None,
        message_id: str | None = None,
        traceparent: str | None = None,
        wait: bool = True,
        delay_ms: int | None = None,
        not_before: datetime | str | None = None,
        max_deliveries: int | None = None,
        priority: int | None = None,
    ) -> str | None:
        """Add a task. ``message_id`` (your idempotency key) makes retries idempotent: every
        add with it stores one task, whose id each of them answers. Without it, only a broker
        redelivery of this add (a bridge died holding it) is recognised; a retry of the call
        adds a second task.

        ``delay_ms`` or ``not_before`` (a timezone-aware datetime or an ISO 8601 string with an
        offset; one of the two) hold the task back: it is not handed out before then.
        ``max_deliveries`` bounds its deliveries: one more failure parks it (see :meth:`parked`)
        instead of handing it out again. ``priority`` (0 to 3, higher first; FIFO within a level)
        orders it in its queue. A bridge before contract 1.4 ignores these fields.

        ``wait=False`` awaits no bridge: it returns None once RabbitMQ has *accepted* the add (a
        publisher confirm: routed to the bridge's add queue and, that queue being durable,
        written there), not once a bridge has *stored* it. A bridge stores it later, or refuses it
        then (a bad request, an owner without a key: dead-lettered, see README "Errors") with
        nobody told. An add RabbitMQ does not take raises :class:`BrokerRefused` (no queue bound
        for adds on this exchange: no bridge declared it; no such exchange; a nack) and nothing
        was taken; no confirm by ``timeout`` raises RequestTimeout and it may have been taken:
        retry with the same ``message_id`` (without one, a retry may add a second task).

        A ``message_id`` the bridge would refuse (over 255 characters, or with a control
        character) raises ValueError and nothing is sent: with ``wait=False`` the bridge's
        refusal would only have been dead-lettered.
        """
        key_header = _checked_idempotency_key(message_id)
        body: dict[str, Any] = {"serviceId": service, "value": value}
        if token is not None:
            body["token"] = token
        body.update(_add_options(delay_ms, not_before, max_deliveries, priority))
        # The idempotency key goes in its own header (contract 1.5): without one of the caller's,
        # an empty header tells the bridge that the random message_id (which the AMQP library
        # sets anyway) guards only against a redelivery of this message, which costs no LWT. A
        # bridge before 1.5 ignores the header and de-duplicates on message_id as it always did.
        headers: dict[str, Any] = {IDEMPOTENCY_HEADER: key_header}
        if traceparent:
            headers["traceparent"] = traceparent
        mid = _amqp_message_id(message_id) if message_id else uuid.uuid4().hex
        if not wait:
            await self.publish("add", body, reply=False, owner=self.owner, message_id=mid, headers=headers)
            return None
        reply = await self.call("add", body, owner=self.owner, message_id=mid, headers=headers)
        return str(reply["task"]["id"])

    async def _result(self, method: str, body: dict[str, Any], *, wait_s: float = 0.0) -> Any:
        return (await self.call(method, body, owner=self.owner, wait_s=wait_s))["result"]

    async def cancel(self, service: str, task_id: str, *, request_id: str | None = None) -> bool:
        """Cancel a task wherever it is (ready, delayed, in flight, parked): true if this request
        cancelled it, false if it had already finished or is unknown. A worker holding it gets
        false on its next ack, extend or fail: nothing is published for it.

        ``request_id`` (sent as the AMQP ``message-id``): a retry after no answer with the same
        one answers true again if the first copy cancelled the task (without it, the retry is a
        new request, answered false: "it had finished")."""
        body = {"serviceId": service, "taskId": task_id}
        # A long id as its digest: put whole past the property's 255 bytes, the publish failed.
        mid = None if request_id is None else _amqp_message_id(request_id)
        reply = await self.call("cancel", body, owner=self.owner, message_id=mid)
        return bool(reply["result"])

    async def purge(
        self,
        service: str,
        *,
        progress: Callable[[int], object] | None = None,
        stopped_short: Callable[[], object] | None = None,
    ) -> int:
        """Cancel the queue's ready tasks (never in-flight, delayed or parked ones); how many.

        One request looks at a bounded part of the queue (:data:`PURGE_MAX` index entries) and
        says ``more`` when it stopped short: it is sent again while it says so and still cancels
        something (a round that cancels nothing would look at the same entries again). Each
        reply is awaited as long as its tasks may take; ``progress`` gets each answered round's
        count (if a later round fails, those tasks stay cancelled). ``stopped_short`` is called
        when the last round still said ``more`` (it cancelled nothing): ready tasks may remain."""
        purged = 0
        while True:
            result = await self._result("purge", {"serviceId": service}, wait_s=PURGE_MAX * PURGE_SECONDS_PER_TASK)
            now = int(result["purged"])
            purged += now
            if progress is not None:
                progress(now)
            if not result.get("more"):
                return purged
            if not now:
                # Sent again, it would look at the same entries: the operator is told that ready
                # tasks may remain (the count alone read as "the queue is purged").
                log.warning(
                    "purge of %r stopped: its last request looked at as many entries as one may and "
                    "cancelled none; ready tasks may remain past them (purge again later)",
                    service,
                )
                if stopped_short is not None:
                    stopped_short()
                return purged

    async def stats(self, service: str | None = None) -> StatsList:
        """Counts of one queue, or (``service`` None) of every queue of the owner, from the bridge.
        Of every queue, those whose counts the bridge could not read now are left out and named
        in the list's ``unavailable`` (logged as a warning): ask again later."""
        # ``partial`` (1.10): the queues that can be read, the others named (a bridge before 1.10
        # ignores unknown fields, and answers ``unavailable`` then, which is retried).
        body: dict[str, Any] = {"partial": True} if service is None else {"serviceId": service}
        result = await self._result("stats", body, wait_s=STATS_ALL_WAIT_S if service is None else 0.0)
        found = StatsList([ServiceStats.from_wire(doc) for doc in result["services"]], result.get("unavailable") or ())
        if found.unavailable:
            log.warning(
                "counts of %d queues could not be read now (left out): %s",
                len(found.unavailable),
                ", ".join(found.unavailable[:10]),
            )
        return found

    async def parked(self, service: str, limit: int = 100) -> list[ParkedTask]:
        """The queue's first parked tasks (at most ``limit``, 1..1000), without their values. More
        may be parked: :meth:`parked_page` says so and goes on (from a bridge of contract 1.11)."""
        return (await self.parked_page(service, limit)).tasks

    async def parked_page(self, service: str, limit: int = 100, after: str | None = None) -> ParkedPage:
        """Up to ``limit`` (1..1000) parked tasks after ``after`` (an earlier page's ``after``;
        None: from the first), and where the next page starts (None: none is left). Every parked
        task, a page at a time::

            page = await engine.parked_page(svc, 1000)
            while True:
                ...  # page.tasks
                if page.after is None:
                    break
                page = await engine.parked_page(svc, 1000, after=page.after)
            if not page.paged and len(page.tasks) >= 1000:
                ...  # a bridge before 1.11: more may be parked past these, unlisted

        From a bridge before contract 1.11 ``paged`` is False and ``after`` None whatever is
        parked: only a page shorter than ``limit`` is then known complete."""
        body: dict[str, Any] = {"serviceId": service, "limit": limit}
        if after is not None:
            body["after"] = after
        result = await self._result("parked", body, wait_s=PARKED_WAIT_S)
        # A 1.11 bridge always says where it stopped (null: at the end); one before ignores a
        # request's ``after`` and answers the first page again, which read as the next one.
        paged = "after" in result
        if after is not None and not paged:
            raise BridgeClientError("the bridge is older than contract 1.11: it cannot list past its first page")
        next_after = result.get("after")
        return ParkedPage(
            [ParkedTask.from_wire(doc) for doc in result["tasks"]],
            None if next_after is None else str(next_after),
            paged,
        )

    async def redrive(
        self,
        service: str,
        task_ids: list[str] | None = None,
        *,
        all: bool = False,
        redrive_rate: float = REDRIVE_RATE,
        progress: Callable[[int], object] | None = None,
        parked_before: str | None = None,
        after: str | None = None,
        position: Callable[[str, str], object] | None = None,
    ) -> int:
        """Put parked tasks back in the queue (the named ones, or ``all=True``: every task parked
        when the call starts), their delivery count toward the limit starting again; how many
        went back. Exactly one of ``task_ids`` / ``all``: a request for both or neither is
        refused here (the bridge would answer bad_request).

        One ``all`` request puts back at most 1000 tasks; the first reply says the bound the
        bridge used (``parkedBefore``, its clock, not this host's) and, if it stopped short, the
        row to go on after; both are sent back until a reply has no ``after``, and the total is
        returned. So it ends even while workers still park tasks as fast as they come back:
        tasks parked again after it started stay parked. If a later request fails, the tasks the
        earlier ones put back stay back (call it again: it goes on with what is still parked).
        Against a bridge before contract 1.9 (no ``parkedBefore`` in its reply) it is sent again
        until one answers 0, as the contract then said: that goes on while workers keep parking
        the tasks it puts back.

        The bridge puts them back at ``BRIDGE_REDRIVE_RATE`` a second and answers when done, so
        the reply is awaited that much longer than other requests: pass the bridge's rate as
        ``redrive_rate`` if it is not the default. ``progress`` gets each answered request's count.

        To go on with an ``all`` redrive that failed part way (a later request not answered):
        ``position`` gets each answered request's bound and, while there is more, its ``after``;
        a call with ``parked_before`` and ``after`` set to the last ones goes on from there, with
        the same bound (a call without them takes a new bound: it would put back again the tasks
        the first put back and workers parked since)."""
        if all == (task_ids is not None):
            raise ValueError("give task_ids or all=True (exactly one)")
        if not all and (parked_before is not None or after is not None):
            raise ValueError("parked_before and after go with all=True")
        if task_ids is not None and not task_ids:
            return 0  # nothing named, nothing to ask
        if not all:
            ids = list(task_ids or ())
            named = {"serviceId": service, "taskIds": ids}
            return int((await self._result("redrive", named, wait_s=len(ids) / redrive_rate))["redriven"])
        body: dict[str, Any] = {"serviceId": service, "all": True}
        if parked_before is not None:
            body["parkedBefore"] = parked_before
        if after is not None:
            body["after"] = after
        return await self._redrive_all(body, redrive_rate, progress, position)

    async def _redrive_all(
        self,
        body: dict[str, Any],
        redrive_rate: float,
        progress: Callable[[int], object] | None,
        position: Callable[[str, str], object] | None,
    ) -> int:
        total = 0
        while True:
            result = await self._result("redrive", body, wait_s=REDRIVE_ALL_MAX / redrive_rate)
            now = int(result["redriven"])
            total += now
            if progress is not None:
                progress(now)
            if position is not None and "parkedBefore" in result and "after" in result:
                position(str(result["parkedBefore"]), str(result["after"]))
            if "parkedBefore" not in result:
                # A bridge before 1.9. Not "until a request answers fewer than 1000": it lists up to
                # 1000 parked rows and skips those no longer parked, so only 0 means none is left.
                if not now:
                    return total
                continue
            if "after" not in result:
                return total  # it read every row that could hold a task parked before the bound
            # The same bound every time (the first reply's): not a new now per request, which
            # would take in the tasks workers parked again meanwhile.
            body = {**body, "parkedBefore": result["parkedBefore"], "after": result["after"]}

    async def discard(self, service: str, task_ids: list[str]) -> int:
        """Drop parked tasks for good (only parked ones: others are left alone); how many."""
        if not task_ids:
            return 0
        body = {"serviceId": service, "taskIds": list(task_ids)}
        wait_s = len(task_ids) * DISCARD_SECONDS_PER_TASK  # one id after another, each a compare-and-set
        return int((await self._result("discard", body, wait_s=wait_s))["discarded"])


def _seconds_until(iso: str, now: float) -> float | None:
    """Seconds from ``now`` (the bridge's time, seconds since the epoch) to an ISO 8601 instant of
    the bridge's (None if it does not parse)."""
    try:
        at = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp() - now


def _settling(task: Task | None) -> contextlib.AbstractAsyncContextManager[None]:
    """While an ack or fail of ``task`` is on its way (nothing when it is not a fetched task)."""
    return task._settling_it() if task is not None else contextlib.nullcontext()


class TaskError(Exception):
    """Raised by a ``Worker.run`` handler: the task's answer is this business error (any JSON but
    None): it completes the task and goes to the engine, and is sent again while its ack gets no
    answer, as a result is. Any other exception is a technical failure (the task comes back)."""

    def __init__(self, error: Any) -> None:
        if error is None:  # on the wire that is an ack with a null result: a success
            raise ValueError("a business error cannot be None")
        super().__init__(error)
        self.error = error


@dataclass
class Task:
    worker: Worker
    id: str
    value: Any
    deliveries: int
    lease_expires_at: str
    headers: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None  # the lease's fencing token (bridges before 1.1 do not send it)
    has_token: bool | None = None  # its result goes to the engine (bridges before 1.3 do not say)
    # The lease length its fetch asked for (None: the bridge's default): what keep_alive renews to.
    time_to_recover_ms: int | None = None
    # Set when an extend (the keep_alive heartbeat's, or the handler's own) answered false: the
    # task is no longer this worker's (it went to another, was cancelled or parked). Also when the
    # heartbeat stopped on an error that is not the bridge's (the worker closed), or on an answer
    # no retry changes (:data:`MISCONFIGURED`, such as ``unknown_owner``): its lease runs out. A
    # handler in a long job checks it to stop early: its ack would be answered false anyway.
    lost: bool = False
    # An ack, ack_error or fail of this task was answered: a heartbeat has nothing left to keep
    # (one that raised may be retried, so the lease is kept until an answer).
    _settled: bool = field(default=False, repr=False)
    # An ack, ack_error or fail of this task is on its way: a beat answered false meanwhile may be
    # the bridge seeing that ack applied already (ack and extend go through different queues), not
    # a loss; the answer to the ack says which.
    _settling: int = field(default=0, repr=False)
    # An ack or ack_error of this task was answered false (its result was not applied): Worker.run
    # counts a task its handler acked so in ``lost``, as it does its own acks answered false.
    _ack_refused: bool = field(default=False, repr=False)
    # The (result, error) its handler last asked ``ack`` or ``ack_error`` to send: ``Worker.run``
    # sends it again when that request got no answer (the handler raised, or caught it and
    # returned), not the handler's failure nor its return value.
    _attempted: tuple[Any, Any] | None = field(default=None, repr=False)
    # The same for a ``fail`` its handler sent: (error, retry_in_ms). Sent again too, never an
    # ack: a handler that caught its fail's TransportError and returned had its task acked with
    # its return value, a failure reported to the engine as a success (found by review).
    _fail_attempted: tuple[Any, int | None] | None = field(default=None, repr=False)

    @property
    def _unanswered(self) -> bool:
        """Its handler's own ack, ack_error or fail may still be without an answer."""
        return not self._settled and (self._attempted is not None or self._fail_attempted is not None)

    @contextlib.asynccontextmanager
    async def _attempting(self, result: Any, error: Any) -> AsyncIterator[None]:
        """Remember the outcome sent while it may still be without an answer (``Worker.run``
        sends it again); forgotten when the bridge (or this client, before sending) refused it:
        that is an answer, and what the handler does next is its outcome. The latest outcome
        sent is the one remembered."""
        self._attempted, self._fail_attempted = (result, error), None
        try:
            yield
        except (TransportError, UnavailableError, InternalError):
            # No answer, or none about the outcome (``internal``: the bridge failed on it): it may
            # still apply, and it is what the handler decided (``Worker.run`` sends it again).
            raise
        except (BridgeClientError, ValueError):
            self._attempted = None
            raise

    @contextlib.asynccontextmanager
    async def _fail_attempting(self, error: Any, retry_in_ms: int | None) -> AsyncIterator[None]:
        """:meth:`_attempting` for a fail."""
        self._attempted, self._fail_attempted = None, (error, retry_in_ms)
        try:
            yield
        except (TransportError, UnavailableError, InternalError):
            raise
        except (BridgeClientError, ValueError):
            self._fail_attempted = None
            raise

    @contextlib.asynccontextmanager
    async def _settling_it(self) -> AsyncIterator[None]:
        self._settling += 1
        try:
            yield
        finally:
            self._settling -= 1

    async def ack(self, result: Any = None) -> bool:
        """Complete this task (never another one): true if this lease completed it."""
        async with self._settling_it(), self._attempting(result, None):
            done = await self.worker.ack(result=result, task_id=self.id, epoch=self.epoch, has_token=self.has_token)
        self._settled = True  # answered (a request without an answer may be retried: keep the lease)
        self._ack_refused = self._ack_refused or not done
        return done

    async def ack_error(self, error: Any) -> bool:
        """Complete this task with a business error for the engine (it is not retried): the
        work was done and its answer is an error. For a failure to do the work, see :meth:`fail`."""
        if error is None:  # on the wire that is an ack with a null result: a success
            raise ValueError("a business error cannot be None")
        async with self._settling_it(), self._attempting(None, error):
            done = await self.worker.ack(error=error, task_id=self.id, epoch=self.epoch, has_token=self.has_token)
        self._settled = True
        self._ack_refused = self._ack_refused or not done
        return done

    async def fail(self, error: Any = None, retry_in_ms: int | None = None) -> FailOutcome | None:
        """A technical failure (contract 1.4): give the task back to come again later, after
        ``retry_in_ms`` or the bridge's backoff, or to be parked at its delivery limit. ``error``
        (any JSON) is kept as its last error. None if the task is no longer this worker's.

        Before 1.4 this completed the task with a business error: that is :meth:`ack_error`."""
        async with self._settling_it(), self._fail_attempting(error, retry_in_ms):
            outcome = await self.worker.fail(error, retry_in_ms=retry_in_ms, task_id=self.id, epoch=self.epoch)
        self._settled = True
        return outcome

    async def extend(self, ttr_ms: int | None = None) -> bool:
        """Renew this task's lease to now + ``ttr_ms`` (default: the worker's time to recover, else
        the bridge's default); updates :attr:`lease_expires_at`. False, and :attr:`lost` set, if
        the task is no longer this worker's."""
        return await self._extend(ttr_ms)

    async def _extend(self, ttr_ms: int | None, within: float | None = None) -> bool:
        """:meth:`extend`, its call bounded by ``within`` seconds when given (see ``_heartbeat``)."""
        renewed = await self.worker._renew(ttr_ms, task_id=self.id, epoch=self.epoch, within=within)
        if renewed is None:
            self._mark_lost()
            return False
        self._renewed(renewed)
        return True

    def _mark_lost(self) -> None:
        """The lease is gone or will run out: :attr:`lost`, unless an ack or fail of the task was
        answered or is on its way (after our own ack, an extend answered false is expected; the
        ack's answer says whether the result was applied)."""
        if not self._settled and not self._settling:
            self.lost = True

    def _renewed(self, doc: dict[str, Any]) -> None:
        self.lease_expires_at = str(doc.get("leaseExpiresAt", self.lease_expires_at))
        if doc.get("epoch") is not None:
            self.epoch = int(doc["epoch"])

    @contextlib.asynccontextmanager
    async def keep_alive(self, every_s: float | None = None, ttr_ms: int | None = None) -> AsyncIterator[Task]:
        """Extend the lease in the background while the block runs, for handlers that may outlive
        their time to recover::

            async with task.keep_alive():
                result = await long_job(task.value)
                if task.lost:          # the heartbeat was told the task is someone else's now
                    return
                await task.ack(result)

        A beat every ``every_s`` seconds (default: a third of what is left of the lease, read from
        :attr:`lease_expires_at` before each beat and capped by ``ttr_ms``; at least 0.1 s), each
        renewing the lease to now + ``ttr_ms`` (default: the length the task was fetched with,
        :attr:`time_to_recover_ms`; a beat renewing a 10-minute lease to the worker's or the
        bridge's default of a minute would shorten it). A beat waits for its reply half of what
        is left of the lease at most (the client's ``timeout`` once it has run out), and a beat
        that got no answer is followed by quicker ones, a third of an ever shorter remainder, so
        a lost reply or two do not cost the lease; once the lease has run out (:attr:`lease_expired`) they back off
        instead (1 s at least, doubling with jitter up to 10 s) while no answer comes. The
        default assumes the worker's clock is within about a second of the bridge's (the bridge's
        own skew margin); pass ``every_s`` otherwise.

        An extend answered false stops the heartbeat and sets :attr:`lost`; the handler is not
        interrupted, it checks :attr:`lost`. So does an answer no retry changes, which
        ``Worker.run`` ends on too (:data:`MISCONFIGURED`: ``unknown_owner``, ``unauthorized``,
        ``bad_request``), logged once: beating on, each beat was refused (and dead-lettered) again.
        A request that got no answer (or ``unavailable``, ``internal`` or a code this client does
        not know) is logged and tried again at the next beat, never raised into the handler; one
        that fails otherwise (the worker was closed) stops the heartbeat and sets :attr:`lost` too
        (logged). The heartbeat ends with the block, however the block ends (an exception, a
        cancellation), and once the task is acked or failed.

        ``ttr_ms`` under the contract's minimum (:data:`MIN_TIME_TO_RECOVER_MS`, 100 ms; seconds
        given for milliseconds) raises ValueError before the block runs: the bridge would refuse
        every beat.
        """
        if every_s is not None and every_s <= 0:
            raise ValueError("every_s must be positive")
        if ttr_ms is None:
            ttr_ms = self.time_to_recover_ms
        if ttr_ms is not None and ttr_ms < MIN_TIME_TO_RECOVER_MS:
            raise ValueError(
                f"ttr_ms is in milliseconds, at least {MIN_TIME_TO_RECOVER_MS} "
                f"(the bridge refuses a shorter lease): {ttr_ms}"
            )
        beat = asyncio.create_task(self._heartbeat(every_s, ttr_ms), name=f"keep-alive {self.id}")
        try:
            yield self
        finally:
            beat.cancel()
            # wait(), not ``await beat``: it never raises the beat's cancellation, so only a
            # cancellation of this task itself propagates (a suppress() would swallow that too).
            await asyncio.wait([beat])

    @property
    def lease_expired(self) -> bool:
        """Whether the lease is believed to have run out: :attr:`lease_expires_at` is past by the
        bridge's clock (as far as this client knows it). The task may then go to another worker
        (its ack would be answered false); a keep-alive whose extends got no answer beats once a
        second or slower then. False when the lease's end cannot be read."""
        left = _seconds_until(self.lease_expires_at, self.worker.bridge_time())
        return left is not None and left <= 0

    def _beat_interval(self, ttr_ms: int | None) -> float:
        """A third of the lease that is left (capped by the lease each beat asks for)."""
        # On the bridge's clock, as the lease is: a host clock behind would beat too late.
        left = _seconds_until(self.lease_expires_at, self.worker.bridge_time())
        if left is None:  # not a date-time this client can read: trust the lease asked for
            asked = ttr_ms or self.worker.time_to_recover_ms
            left = asked / 1000 if asked is not None else UNKNOWN_LEASE_S
        if ttr_ms is not None:
            left = min(left, ttr_ms / 1000)
        return max(MIN_BEAT_S, left / 3)

    def _next_beat(self, every_s: float | None, ttr_ms: int | None, failed: int) -> float:
        """The wait before the next beat, ``failed`` beats in a row having got no answer since the
        lease ran out. While the lease runs, the usual beat (a third of what is left: quicker ones
        after a lost reply, to save the lease). Once it has run out there is nothing left to save
        in time: the shrinking third would beat every :data:`MIN_BEAT_S` for as long as RabbitMQ
        or the bridge is away, so the beats back off instead, doubling with full jitter (a fleet
        whose broker went away together does not come back in step) up to
        :data:`BEAT_BACKOFF_MAX_S`, never quicker than :data:`LEASE_ENDED_BEAT_S` (nor than
        ``every_s``)."""
        regular = every_s if every_s is not None else self._beat_interval(ttr_ms)
        if not failed or not self.lease_expired:
            return regular
        backoff = random.uniform(0.0, min(BEAT_BACKOFF_MAX_S, LEASE_ENDED_BEAT_S * 2 ** min(failed, 16)))  # nosec B311: jitter, not a secret
        return max(LEASE_ENDED_BEAT_S, regular, backoff)

    def _beat_wait(self) -> float | None:
        """How long a beat waits for its reply: half of what is left of the lease (at least
        :data:`BEAT_WAIT_MIN_S`), when that is less than the client's ``timeout``; None (the
        ``timeout``) once the lease has run out or when its end cannot be read. Waiting the whole
        ``timeout`` (10 s by default) whatever was left, the next beat went out only after it: two
        lost replies cost a 30 s lease, one a 15 s lease. Bounded, a beat that got no answer is
        followed by the next while a third of an ever shorter remainder is still left."""
        left = _seconds_until(self.lease_expires_at, self.worker.bridge_time())
        if left is None or left <= 0:
            return None
        within = max(BEAT_WAIT_MIN_S, left / 2)
        return within if within < self.worker.timeout else None

    async def _heartbeat(self, every_s: float | None, ttr_ms: int | None) -> None:
        failed = 0  # beats in a row that got no answer since the lease ran out (the backoff's exponent)
        while not self._settled:
            await asyncio.sleep(self._next_beat(every_s, ttr_ms, failed))
            if self._settled:
                return
            try:
                alive = await self._extend(ttr_ms, self._beat_wait())
            except (TransportError, UnavailableError) as exc:
                failed = failed + 1 if self.lease_expired else 0
                log.warning(
                    "keep-alive of task %s: extend not answered (%s)%s; again at the next beat",
                    self.id,
                    exc,
                    " and the lease has run out" if self.lease_expired else "",
                )
                continue
            except MISCONFIGURED as exc:
                # The worker itself is wrong (no key for its owner, a lease under the minimum): no
                # beat will be answered otherwise, and each was refused (and dead-lettered) again,
                # up to ten times a second. Stopped, as ``Worker.run`` is, and the handler told.
                self._mark_lost()
                log.error(
                    "keep-alive of task %s stopped: extend answered %s: %s; no retry changes that, "
                    "its lease will run out (marked lost)",
                    self.id,
                    exc.code,
                    exc,
                )
                return
            except BridgeClientError as exc:
                failed = failed + 1 if self.lease_expired else 0
                log.error(
                    "keep-alive of task %s: extend answered %s: %s; again at the next beat", self.id, exc.code, exc
                )
                continue
            except Exception:
                # Not the bridge's answer (the worker was closed, a bug): beating on would repeat it.
                # Not in silence: the lease will run out, and a handler in a long job that checks
                # ``lost`` stops (it went on for nothing, its ack answered false).
                self._mark_lost()
                log.exception("keep-alive of task %s stopped: its lease will run out (marked lost)", self.id)
                return
            failed = 0
            if not alive:
                if self.lost:
                    log.warning("keep-alive of task %s: the task is no longer this worker's; stopped", self.id)
                return


ACK_ATTEMPTS = 3  # Worker.run: an ack (with next, or alone on stop) sent again after no answer
# Worker.run: answers that say the worker itself is wrong (who it is: an owner without a key, a
# user the bridge refuses; what it asks: a bad service or worker id). No retry fixes them, and a
# loop retrying them would look alive while serving nothing: they end ``run`` (and ``async for``).
MISCONFIGURED = (BadRequestError, PayloadTooLargeError, UnauthorizedError, UnknownOwnerError)
POLL_PAUSE_MAX_S = 5.0  # Worker.run: the longest pause between fetches that got no answer
BACKOFF_BASE_S = 0.1  # ... and the least its doubling starts from, whatever ``poll_interval``
_STOPPED = asyncio.Event()  # a stop already set: an ack sent on the way out takes no next task
_STOPPED.set()
ERROR_MESSAGE_MAX = 4096  # Worker.run: characters of a handler's exception kept in a fail's error
# Worker.run on stop, while a request without an answer may still claim a task for it: how often
# it asks the bridge whether it holds a task (an extend naming none: one read of its pointer).
# Short, so that a task the lost request claimed is handled soon (its lease runs meanwhile).
STOP_ASK_EVERY_S = 0.2
# Worker.run on stop: how long it goes on fetching what a request without an answer may still
# claim, at most (the default of ``Worker.stop_grace``). Its reply-to is closed first, so a
# waiting fetch claims nothing after that (the bridge probes the reply-to before a claim): what is
# left is a claim already past its probe (milliseconds) and a request still queued at a busy bridge
# (a fetch that finds a task at once claims without a probe). A pod's stop must end well inside
# its kill deadline (30 s by default on Kubernetes), which the whole deadline of a lost long-poll
# (``wait_ms`` + the client's timeout + 1 s: 41 s by default) would not.
STOP_GRACE_S = 5.0


class _StopTimeout(Exception):
    """Worker.run: a handler still running ``stop_timeout`` after stop was cancelled."""


@dataclass(frozen=True)
class _Sending:
    """An outcome ``Worker.run`` is sending for ``task`` (see ``Worker._settle_at_cancel``): its
    ``result`` / ``error`` acked, or with ``fail`` (error, retry_in_ms) a fail."""

    task: Task
    result: Any = None
    error: Any = None
    fail: tuple[Any, int | None] | None = None


class Worker(RpcClient):
    """An external worker: ``async for task in worker`` fetches until the loop is left."""

    def __init__(
        self,
        url: str,
        *,
        service: str,
        worker_id: str,
        time_to_recover_ms: int | None = None,
        poll_interval: float = 0.2,
        wait_ms: int = 30_000,
        stop_grace: float = STOP_GRACE_S,
        stop_timeout: float | None = None,
        **kw: Any,
    ) -> None:
        if stop_timeout is not None and stop_timeout < 0:
            raise ValueError("stop_timeout must be None (wait for the handler) or >= 0 seconds")
        if poll_interval < 0:
            raise ValueError("poll_interval must be >= 0 seconds")
        super().__init__(url, **kw)
        # run(): how long a handler may go on after ``stop`` is set before it is cancelled and its
        # task given back to come again at once (``fail`` with ``retry_in_ms=0``). None: waited for
        # however long it takes (a pod's kill deadline may then end it, and its task comes back
        # only when its lease runs out).
        self.stop_timeout = stop_timeout
        # run(): tasks whose handler ran but whose ack was answered false (the lease was lost: the
        # task runs again elsewhere); not counted in what run() returns. Logged one by one too.
        self.lost = 0
        self.wait_ms = wait_ms  # the long-poll of ``async for task in worker`` (0: poll every poll_interval)
        self.stop_grace = stop_grace  # run(): seconds it may go on fetching after stop (see STOP_GRACE_S)
        self.service = service
        self.worker_id = worker_id
        self.time_to_recover_ms = time_to_recover_ms
        self.poll_interval = poll_interval
        self.current: Task | None = None  # what the last fetch returned
        # Whether this worker knows it holds no task (its last fetch found none, or it got an answer
        # to the ack or fail of what it was handed): its next fetch says ``fresh`` and the bridge
        # reads less. Unknown at start (a previous life may hold one) and after any failed request.
        self._holds_nothing = False
        self._unanswered_ack: str | None = None  # the task of an ack_and_fetch whose reply was lost
        # A fetch (or an ack's next) sent that got no answer may still run at the bridge until its
        # deadline, a long-poll waiting there as the oldest waiter: a task it claims is leased to
        # this worker and its reply goes nowhere. Until then (monotonic) an empty answer proves
        # nothing, and only a fetch without ``fresh`` (the bridge reads the worker's pointer)
        # gets that task back.
        self._unsure_until = 0.0
        # Such a request may also have claimed a task already, its reply lost: until an answer
        # says what this worker holds, a stopping worker asks the bridge (past that deadline too).
        self._claim_unanswered = False
        # Set with ``_unsure_until``: the worker's pointer at the bridge may name a task such a
        # request claimed, and nothing has read it since. Past that deadline the first claiming
        # request goes without ``fresh`` (the bridge reads the pointer and hands that task), and
        # ``fresh`` comes back once one sent past the deadline is answered: said at once, the
        # bridge skipped the pointer, and the task waited out its whole lease.
        self._pointer_unread = False
        self._failed_polls = 0  # fetches of the loop in a row that got no answer (their pause grows)
        # (task id, epoch, result) of the last task whose handler ran and whose ack never got an
        # answer: if the bridge hands this worker that very lease again (a fetch not ``fresh``, the
        # drain at stop), the result in hand is acked; the handler does not run a second time.
        self._result_in_hand: tuple[str, int, Any, Any] | None = None  # (task, epoch, result, error)
        # (task id, epoch, error, retry_in_ms) of the last task run() gave back whose fail never got
        # an answer: handed that very lease again (the fail did not apply: the next fetch, not
        # ``fresh``, gets the task this worker holds), the fail is sent again; the handler does
        # not run again at once, without the fail's backoff (and its ack then refused if the
        # first fail landed late).
        # The last element: how many times it was sent again so. At most FAIL_RESENDS: with fails
        # unanswered while fetches are (the lifecycle queue's consumers down), each fetch handed the
        # lease back and the fail went again, for ever; past it the handler runs again, as before.
        self._fail_in_hand: tuple[str, int, Any, int | None, int] | None = None
        # The outcome ``run`` is sending (an ack, which also claims the next task; a fail): kept
        # when ``run`` is cancelled there, for :meth:`_settle_at_cancel`.
        self._concluding: _Sending | None = None
        # A handler that finished in the very loop turn ``run`` was cancelled (with
        # ``stop_timeout``, it runs in a task of its own): its outcome, sent at the cancel.
        self._finished_at_cancel: _Sending | None = None
        # ``run``: the cancellation count of its task when it began, and whether a cancel of it
        # was settled already (``_settle_at_cancel``: the drain in ``run`` then runs no more).
        self._cancel_base = 0
        self._cancel_settled = False

    @classmethod
    def connect(cls, url: str, *, service: str, worker_id: str, **kw: Any) -> Self:
        return cls(url, service=service, worker_id=worker_id, **kw)

    async def fetch(self, time_to_recover_ms: int | None = None, *, wait_ms: int = 0) -> Task | None:
        """One fetch: the task, or None if none is ready (within ``wait_ms``, up to 30,000: long-poll)."""
        body: dict[str, Any] = {"serviceId": self.service, "workerId": self.worker_id}
        ttr = time_to_recover_ms or self.time_to_recover_ms
        if ttr is not None:
            body["timeToRecover"] = ttr
        if wait_ms:
            body["waitMs"] = wait_ms
        if self._holds_nothing and not self._pointer_unread:
            body["fresh"] = True
        self._holds_nothing = False  # until this fetch is answered
        reply = await self._claiming_call("fetch", body, wait_s=wait_ms / 1000)
        return self._handed(reply, reply["_headers"], ttr)

    async def _claiming_call(self, method: str, body: dict[str, Any], wait_s: float = 0.0) -> dict[str, Any]:
        """A request that may claim a task for this worker (a fetch, an ack with ``next``)."""
        # Its deadline (the bridge ends a long-poll there, and executes nothing after it) on this
        # host's monotonic clock, plus a second for the two hosts' clocks: from when it was sent,
        # not from when it failed (a RequestTimeout comes at that deadline already).
        now = time.monotonic()
        deadline = now + wait_s + self.timeout + 1.0
        fresh = body.get("fresh") if method == "fetch" else body.get("next", {}).get("fresh")
        reads_pointer = not fresh and now >= self._unsure_until
        try:
            reply = await self.call(method, body, wait_s=wait_s)
        except TransportError as exc:
            # Only a request that may have reached a bridge can still claim there: not one that
            # never left this client, nor one RabbitMQ refused (then a stopping run would wait for
            # nothing, and fetch meanwhile, while RabbitMQ is down or the exchange missing).
            if not isinstance(exc, BrokerRefused) and not (isinstance(exc, ConnectionLost) and not exc.sent):
                self._unsure_until = max(self._unsure_until, deadline)
                self._claim_unanswered = self._pointer_unread = True
            raise
        except asyncio.CancelledError:
            # Cancelled by its caller (a timeout around it, a task group torn down): the request
            # may be at a bridge, still waiting, and claim a task for this worker there while the
            # connection (its reply-to) lives. The next fetch must not say ``fresh`` until then.
            # Not when no connection was open (cancelled as it connected): nothing was sent, and a
            # cancelled run then asked a broker it could not reach for up to 25 s.
            if self.channel is not None:
                self._unsure_until = max(self._unsure_until, deadline)
                self._claim_unanswered = self._pointer_unread = True
            raise
        if reads_pointer and now >= self._unsure_until:
            self._pointer_unread = False  # read past every unanswered request's deadline
        # Answered: what it says this worker holds is known (an ack's ``next`` answered with an
        # error may have claimed before it failed: not known).
        following = reply.get("next") if method == "ack" else None
        self._claim_unanswered = isinstance(following, dict) and "error" in following
        return reply

    def _knows_it_holds_nothing(self) -> None:
        """An answer says this worker holds no task now: its next fetch may say ``fresh``, unless
        an unanswered request of it may still claim one (:attr:`_unsure_until`)."""
        self._holds_nothing = time.monotonic() >= self._unsure_until

    def _handed(self, reply: dict[str, Any], headers: dict[str, Any], ttr_ms: int | None) -> Task | None:
        """The task a fetch reply (or an ack's ``next``) hands this worker, now :attr:`current`;
        ``ttr_ms``: the lease length the request asked for."""
        if reply.get("result") is None and "task" not in reply:
            self.current = None
            self._knows_it_holds_nothing()
            return None
        t = reply["task"]
        self.current = Task(
            self,
            t["id"],
            reply["result"],
            t["deliveries"],
            t["leaseExpiresAt"],
            headers,
            t.get("epoch"),
            t.get("hasToken"),
            ttr_ms,
        )
        return self.current

    def _named(self, task_id: str | None, epoch: int | None) -> dict[str, Any]:
        """A request body about a task: the one named, else (``task_id`` None: only with
        ``held=True``, see :meth:`_about`) none, and the bridge takes the one it holds."""
        body: dict[str, Any] = {"serviceId": self.service, "workerId": self.worker_id}
        if task_id is not None:
            body["taskId"] = task_id
        if epoch is not None:
            body["epoch"] = epoch
        return body

    def _about(
        self, what: str, task_id: str | None, epoch: int | None, held: bool
    ) -> tuple[Task | None, str | None, int | None]:
        """The task an ack, fail or extend is about: ``(current task if it is that one, id, epoch)``.

        The one named, else the one the last fetch returned. With neither, the request would name
        no task and the bridge would apply it to whatever this worker id holds when it arrives
        (contract 1.0): another process's under the same id (the CLI's) or one a late fetch claimed
        meanwhile. That is refused here (ValueError, nothing sent) unless ``held`` asks for it."""
        current = self.current
        if task_id is None:
            if current is not None:
                return current, current.id, current.epoch
            if not held:
                raise ValueError(
                    f"no task to {what}: fetch one first or name it (task_id, epoch); "
                    f"held=True to {what} whatever task worker {self.worker_id!r} holds at the bridge"
                )
            return None, None, None
        same = current is not None and current.id == task_id and (epoch is None or epoch == current.epoch)
        return (current if same else None), task_id, epoch

    async def ack(
        self,
        result: Any = None,
        *,
        error: Any = None,
        task_id: str | None = None,
        epoch: int | None = None,
        has_token: bool | None = None,
        held: bool = False,
    ) -> bool:
        """Ack a task: the one named (``task_id``, ``epoch`` from the fetch reply), by default the
        one the last fetch returned (:attr:`current`). The ack always names its task, so a late or
        repeated copy of it can never complete another one; with no task named and none fetched it
        is refused (ValueError), unless ``held=True``: then it names none and completes whatever
        task this worker id holds at the bridge when it arrives (contract 1.0; for acting on behalf
        of a worker that is not running: a running one's task would be completed under it).

        Once answered, the task is settled: a :meth:`Task.keep_alive` heartbeat of it stops."""
        task, task_id, epoch = self._about("ack", task_id, epoch, held)
        if task is not None and has_token is None:
            has_token = task.has_token
        body = self._named(task_id, epoch)
        if has_token is not None:
            body["hasToken"] = has_token
        if error is not None:
            body["error"] = error
        else:
            body["result"] = result
        async with _settling(task):
            reply = await self.call("ack", body)
        if task is not None:
            # Answered (true, or false: it is someone else's now): nothing left to keep, and this
            # worker holds nothing.
            task._settled = True
            task._ack_refused = task._ack_refused or not reply["result"]
            self._knows_it_holds_nothing()
        return bool(reply["result"])

    async def ack_and_fetch(
        self, result: Any = None, *, error: Any = None, time_to_recover_ms: int | None = None
    ) -> tuple[bool, Task | None]:
        """(Contract 1.6) Ack the task the last fetch returned and fetch the next one, in one
        request: ``(acked, next task or None)``. The next task is :attr:`current` now. None when
        no task is ready (it never waits: long-poll with :meth:`fetch` then), or when the bridge
        could not fetch it (:meth:`fetch` says why)."""
        current = self.current
        if current is None:
            raise ValueError("no task to ack: fetch one first")
        body = self._named(current.id, current.epoch)
        if current.has_token is not None:
            body["hasToken"] = current.has_token
        if error is not None:
            body["error"] = error
        else:
            body["result"] = result
        # ``fresh``: it held nothing but this task. Not on a retry of an ack whose reply was lost:
        # that ack may have claimed a next task already, which the bridge then hands again. Nor
        # while a request without an answer (a long-poll its caller cancelled) may still claim one
        # for this worker at another bridge (:attr:`_unsure_until`): ``fresh``, the bridge skipped
        # the pointer naming that task, which then waited out its whole lease.
        nxt: dict[str, Any] = {
            "fresh": self._unanswered_ack != current.id
            and time.monotonic() >= self._unsure_until
            and not self._pointer_unread
        }
        ttr = time_to_recover_ms or self.time_to_recover_ms
        if ttr is not None:
            nxt["timeToRecover"] = ttr
        body["next"] = nxt
        self._holds_nothing = False  # until this request is answered
        self._unanswered_ack = current.id
        reply = await self._claiming_call("ack", body)
        self._unanswered_ack = None
        current._settled = True  # answered: its heartbeat, if any, has nothing left to keep
        acked = bool(reply["result"])
        following = reply.get("next")
        if not isinstance(following, dict) or "error" in following:
            # The ack was answered; the next fetch was not: fetch on its own (not ``fresh``, in
            # case it claimed a task before it failed).
            self.current = None
            return acked, None
        return acked, self._handed(following, reply["_headers"], ttr)

    async def _renew(
        self,
        time_to_recover_ms: int | None = None,
        *,
        task_id: str | None = None,
        epoch: int | None = None,
        held: bool = False,
        within: float | None = None,
    ) -> dict[str, Any] | None:
        """:meth:`extend`, answering the renewed lease (``{"id", "epoch", "leaseExpiresAt"}``) or
        None; ``within``: a bound on the call shorter than the client's ``timeout`` (a heartbeat's)."""
        _, task_id, epoch = self._about("extend", task_id, epoch, held)
        body = self._named(task_id, epoch)
        ttr = time_to_recover_ms or self.time_to_recover_ms
        if ttr is not None:
            body["timeToRecover"] = ttr
        reply = await (self.call("extend", body) if within is None else self.call("extend", body, within=within))
        if not reply.get("result"):
            # Not this worker's any more; whether it holds another is unknown (no ``fresh``).
            return None
        renewed: dict[str, Any] = reply["task"]
        current = self.current
        if current is not None and current.id == renewed.get("id"):
            current._renewed(renewed)
        return renewed

    async def extend(
        self,
        time_to_recover_ms: int | None = None,
        *,
        task_id: str | None = None,
        epoch: int | None = None,
        held: bool = False,
    ) -> bool:
        """Renew a task's lease to now + ``time_to_recover_ms`` (default: this worker's, else the
        bridge's): the one named, by default the one the last fetch returned, whose
        ``lease_expires_at`` is updated. False if the task is no longer this worker's (another
        worker got it, it was acked, cancelled or parked): stop working on it. Like the ack, the
        request names its task, so a late copy of it can never renew another one; with none named
        and none fetched it is refused (ValueError) unless ``held=True`` (see :meth:`ack`)."""
        return await self._renew(time_to_recover_ms, task_id=task_id, epoch=epoch, held=held) is not None

    async def fail(
        self,
        error: Any = None,
        *,
        retry_in_ms: int | None = None,
        task_id: str | None = None,
        epoch: int | None = None,
        held: bool = False,
    ) -> FailOutcome | None:
        """Give a task back after a technical failure (the one named, by default the one the last
        fetch returned): it comes back after ``retry_in_ms`` (default: the bridge's backoff), or
        is parked at its delivery limit. ``error`` (any JSON) is kept as its last error. None if
        the task is no longer this worker's. A business error that completes the task is an ack
        with ``error``. Like the ack, it names its task: with none named and none fetched it is
        refused (ValueError) unless ``held=True`` (see :meth:`ack`). Once answered, the task is
        settled: a :meth:`Task.keep_alive` heartbeat of it stops."""
        task, task_id, epoch = self._about("fail", task_id, epoch, held)
        body = self._named(task_id, epoch)
        if error is not None:
            body["error"] = error
        if retry_in_ms is not None:
            body["retryInMs"] = retry_in_ms
        async with _settling(task):
            reply = await self.call("fail", body)
        if task is not None:
            task._settled = True  # answered either way: the task is not this worker's now
            self._knows_it_holds_nothing()
        if not reply.get("result"):
            return None
        return FailOutcome.from_wire(reply["task"])

    async def run(self, handler: Callable[[Task], Awaitable[Any]], *, stop: asyncio.Event | None = None) -> int:
        """Serve tasks with ``handler`` until ``stop`` is set; returns how many it handled: not
        counting a task whose ack was answered false (the lease was lost while the handler ran:
        the task went to another worker, or was cancelled or parked; its result was not applied),
        which is logged with its id and epoch and counted in :attr:`lost`, nor one whose handler
        :attr:`stop_timeout` cut short.

        What ``handler`` returns is the task's result. If it raises, the task is given back
        (:meth:`Task.fail`, the exception's type and message as its error) to come again after the
        bridge's backoff. So is a task whose result the bridge refuses (larger than its limit) or
        JSON cannot carry (its error's type is ``ResultRefused``). A task the handler acked, acked
        with an error or failed itself is left as it is (its own ack answered false counts in
        :attr:`lost`, as the loop's do). Unlike ``async for``, the ack of each task
        also fetches the next one (contract 1.6: one request per task instead of two, ``fetch``
        only when the queue ran dry).

        ``stop`` is checked between tasks: the task in hand is finished and acked first (without
        fetching another; sent again after no answer, as every ack of the loop), so stopping never
        leaves a task leased to this worker. Its handler is waited for however long it takes,
        unless :attr:`stop_timeout` is set: that long after ``stop`` it is cancelled and its task
        given back (``fail`` with ``retry_in_ms=0``: it comes back at once). A long-poll under
        way is given up at once (an idle worker stops within seconds, not after its wait of up to
        :attr:`wait_ms`). It, and any request whose reply was lost, may still claim a task for
        this worker at the bridge: the worker closes their reply-to (a waiting fetch then claims
        nothing) and, for up to :attr:`stop_grace` seconds, asks the bridge whether it holds a
        task and fetches and handles only that one (never new work), before ``run`` returns (see
        :meth:`_claimed_after_stop`): it returns within about ``stop_grace`` plus two requests'
        ``timeout`` after the task in hand was settled (plus the handler's time for a task that
        drain hands it).

        The loop goes on through what the bridge or RabbitMQ answers about a fetch: no answer,
        ``unavailable``, ``internal`` or an error code this client does not know pause the next
        fetch a little longer each time (see :meth:`_poll`); ``integrity_error`` (a task that
        failed authentication, which the bridge dead-lettered) is logged and the next fetch moves
        on at once. (A task sealed with a key not known now is let go by the bridge, which hands
        out the next task instead, or answers ``unavailable`` when there is none.) Only answers that
        say the worker itself is misconfigured end ``run`` with that error
        (:data:`MISCONFIGURED`: ``unknown_owner``, no key for its owner; ``unauthorized``;
        ``bad_request``, such as a service or worker id the bridge refuses): a worker that cannot
        be served then stops with a clear error instead of looking alive forever.
        """
        current = asyncio.current_task()
        # Cancellations of ``run`` are counted from here: a caller that caught an earlier one
        # without ``uncancel()`` leaves the task's count above zero.
        self._cancel_base = current.cancelling() if current is not None else 0
        self._cancel_settled = False
        handled = 0
        task: Task | None = None
        try:
            while task is not None or stop is None or not stop.is_set():
                if task is None:
                    task = await self._poll(stop)
                    if task is None:
                        continue
                counted, task = await self._serve(task, handler, stop)
                handled += counted
            async for claimed in self._claimed_after_stop():
                counted, _ = await self._serve(claimed, handler, stop)
                handled += counted
        except asyncio.CancelledError:
            # Cancelled between tasks (a fetch's pause, the stop's drain): a request without an
            # answer may have claimed a task for this worker; given back, as at a stop.
            if self._run_cancelled_once() and not self._cancel_settled:
                await self._bounded_at_cancel(self._give_back_claimed(), self.stop_grace + 2 * self.timeout)
            raise
        return handled

    def _run_cancelled(self) -> bool:
        """Whether ``run`` itself is being cancelled (not an await inside a handler)."""
        current = asyncio.current_task()
        return current is not None and current.cancelling() > self._cancel_base

    def _run_cancelled_once(self) -> bool:
        """Cancelled once: a second cancel (the caller insisting) ends ``run`` at once."""
        current = asyncio.current_task()
        return current is not None and current.cancelling() == self._cancel_base + 1

    async def _give_back_claimed(self) -> None:
        """The task the bridge hands this worker after a cancel (see :meth:`_claimed_after_stop`):
        settled with the outcome in hand if it is that task, else given back at once."""
        async for claimed in self._claimed_after_stop():
            if await self._settle_in_hand(claimed, _STOPPED) is None:
                await self._give_back(claimed, "Cancelled", "the worker's run was cancelled", retry_in_ms=0)

    async def _serve(
        self, task: Task, handler: Callable[[Task], Awaitable[Any]], stop: asyncio.Event | None
    ) -> tuple[bool, Task | None]:
        """Run ``handler`` on ``task`` and settle it: ack its result, or give it back if it raised
        (unless the handler settled it itself). ``(handled, next task)``: the next task when the
        ack took one (not once ``stop`` is set: it may be set while the handler runs). Not
        handled: a task whose ack was answered false (see :attr:`lost`) or whose handler
        :attr:`stop_timeout` cut short. ``run`` cancelled while an outcome was on its way settles
        it first (:meth:`_settle_at_cancel`)."""
        try:
            return await self._serve_task(task, handler, stop)
        except asyncio.CancelledError:
            # Once: a second cancel (the caller insisting) ends it at once, what was being sent
            # kept in hand (unkept, a later ``run`` of this worker was handed the same lease and
            # ran its handler again).
            if self._concluding is not None:
                if self._run_cancelled_once():
                    await self._settle_at_cancel()
                elif not self._concluding.task._settled:
                    self._keep_in_hand(self._concluding)
            raise
        finally:
            self._concluding = None

    async def _serve_task(
        self, task: Task, handler: Callable[[Task], Awaitable[Any]], stop: asyncio.Event | None
    ) -> tuple[bool, Task | None]:
        settled = await self._settle_in_hand(task, stop)
        if settled is not None:
            return settled
        error: Any = None
        try:
            result = await self._handle(task, handler, stop)
        except TaskError as business:  # the task's answer is a business error
            result, error = None, business.error
        except _StopTimeout:
            return await self._cut_at_stop(task, stop)
        except Exception as exc:
            if not await self._failed_in_handler(task, exc, stop):
                return True, None
            result = None  # (its own ack's outcome is sent: ``_conclude``)
        except asyncio.CancelledError as exc:
            if self._run_cancelled():
                # ``run`` itself is cancelled (``stop`` is the way to end it): the task is settled
                # before the cancellation goes on, not left leased to a worker that is gone: its
                # own unanswered ack or fail sent again, else given back (``_serve``, once).
                finished, self._finished_at_cancel = self._finished_at_cancel, None
                if finished is not None and finished.task is not task:
                    finished = None
                if not task._settled:
                    cancelled = ({"type": "Cancelled", "message": "the worker's run was cancelled"}, 0)
                    self._concluding = (
                        _Sending(task) if task._unanswered else finished or _Sending(task, fail=cancelled)
                    )
                raise
            # Nobody cancelled ``run``: the handler awaited something another part of the program
            # cancelled. Its failure, as any exception: ended, ``run`` left the task leased to a
            # worker that no longer served.
            if task._unanswered:
                return await self._conclude(task, None, None, stop)  # its own unanswered ack: again
            log.warning("task %s failed in its handler: CancelledError: %s", task.id, exc)
            if not task._settled:
                await self._give_back(
                    task, "CancelledError", str(exc) or "an await of the handler was cancelled", stop=stop
                )
            return True, None
        return await self._conclude(task, result, error, stop)

    async def _settle_at_cancel(self) -> None:
        """``run`` was cancelled while a task's outcome was on its way (the loop's ack, which also
        claims the next task; a fail or a give-back; the ack of a result in hand) or its handler
        ran: the outcome is sent again as the loop sends it at a stop (an ack alone, again after no
        answer within ``stop_grace``; a refused one gives the task back; a fail likewise), kept in
        hand until answered; then, as at a stop, the bridge is asked what a request without an
        answer claimed for this worker: that very task is settled with its outcome, any other given
        back (``fail``, ``retry_in_ms=0``). Within ``stop_grace`` plus two requests' ``timeout``
        (25 s with the defaults, inside Kubernetes' 30 s grace), then cut; nothing of it outlives
        ``run``, and what it had not settled stays in hand for a later ``run`` of this worker.
        Cancelled there, the finished task ran again after its lease, and the next one waited out
        its whole lease leased to a worker that was gone (found by review, 2026-12-07)."""
        sending, self._concluding = self._concluding, None
        if sending is None:
            return
        self._cancel_settled = True

        log.warning("run cancelled while task %s was being settled: settling it first", sending.task.id)
        ends = time.monotonic() + self.stop_grace + 2 * self.timeout  # one deadline for both steps
        if not sending.task._settled:
            # At least one whole attempt (a ``stop_grace`` of 0 sent nothing), and never all of the
            # deadline: the drain below keeps the rest.
            self._concluding = sending
            first = max(self.stop_grace, self.timeout)
            if not await self._bounded_at_cancel(self._send_outcome_at_cancel(sending), first):
                return
        await self._bounded_at_cancel(self._give_back_claimed(), max(0.0, ends - time.monotonic()))

    async def _bounded_at_cancel(self, step: Awaitable[None], bound_s: float) -> bool:
        """A step of settling a cancelled ``run``, cut after ``bound_s``; cut or failed, what was
        being sent is kept in hand for a later ``run`` of this worker (:meth:`_keep_in_hand`).
        False when a second cancel came (the caller insists: nothing more is sent)."""
        done = again = False
        try:
            await asyncio.wait_for(step, bound_s)
            done = True
        except asyncio.CancelledError:
            again = True  # a second cancel: the caller insists, nothing more is sent
        except Exception as exc:  # cut by its bound, or failed: kept in hand below
            log.info("settling the cancelled run: a step ended early (%s)", type(exc).__name__)
        cut, self._concluding = self._concluding, None
        if not done and cut is not None and not cut.task._settled:
            self._keep_in_hand(cut)
        return not again

    def _keep_in_hand(self, sending: _Sending) -> tuple[Any, int | None] | None:
        """Remember ``sending`` as in hand (:meth:`_settle_in_hand` settles the task with it if the
        bridge hands it back); the fail, or None for an ack. The latest the task was sent wins: a
        fail the loop was sending (its give-back) comes after any ack, the handler's own included
        (one answered ``internal`` until the loop gave the task back: kept as the ack, the refused
        result was sent again first); else the handler's own unanswered fail or ack, over what
        the loop was acking."""
        task = sending.task
        fail = sending.fail or task._fail_attempted
        if task.epoch is None:  # (a bridge before 1.1 names no epoch: no lease to recognise)
            return fail
        if fail is not None:
            self._hold_fail(task.id, task.epoch, fail[0], fail[1], 0)
            return fail
        sent, sent_error = task._attempted if task._attempted is not None else (sending.result, sending.error)
        self._result_in_hand = (task.id, task.epoch, sent, sent_error)
        if self._fail_in_hand is not None and self._fail_in_hand[:2] == (task.id, task.epoch):
            self._fail_in_hand = None  # one outcome in hand for a lease: the latest
        return None

    def _hold_fail(self, task_id: str, epoch: int, error: Any, retry_in_ms: int | None, resent: int) -> None:
        """Keep a fail in hand for the lease ``(task_id, epoch)``: the latest outcome it was sent,
        so a result kept for it before goes (a result kept as its ack went out, refused since and
        given back by this fail, was acked again first when the bridge handed the task back)."""
        self._fail_in_hand = (task_id, epoch, error, retry_in_ms, resent)
        if self._result_in_hand is not None and self._result_in_hand[:2] == (task_id, epoch):
            self._result_in_hand = None

    async def _send_outcome_at_cancel(self, sending: _Sending) -> None:
        """``sending`` sent as the loop sends an outcome at a stop, kept in hand until answered."""
        task = sending.task
        fail = self._keep_in_hand(sending)
        if fail is not None:
            until = time.monotonic() + self.stop_grace
            await self._send_fail(task, [fail[0], {"type": "Cancelled"}], retry_in_ms=fail[1], until=until)
        else:
            sent, sent_error = task._attempted if task._attempted is not None else (sending.result, sending.error)
            acked, _ = await self._ack_in_loop(task, sent, error=sent_error, stop=_STOPPED)
            if acked is False:
                self.lost += 1
                log.warning(
                    "task %s (epoch %s): its ack at the cancel was answered false: its result was not applied",
                    task.id,
                    task.epoch,
                )
        if task._settled:  # answered: nothing in hand
            self._result_in_hand = self._fail_in_hand = None

    async def _cut_at_stop(self, task: Task, stop: asyncio.Event | None) -> tuple[bool, Task | None]:
        """``task``'s handler was cancelled by :attr:`stop_timeout`: given back to come again at
        once, unless its own ack (or ack_error) got no answer before the cut: that outcome is
        sent again, not the finished task given back to run a second time."""
        if task._unanswered:
            log.warning(
                "task %s: its handler was still running %gs after stop (stop_timeout): cancelled; "
                "the ack or fail it had sent got no answer: sent again",
                task.id,
                self.stop_timeout,
            )
            return await self._conclude(task, None, None, stop)
        log.warning(
            "task %s: its handler was still running %gs after stop (stop_timeout): cancelled, "
            "the task given back to come again at once",
            task.id,
            self.stop_timeout,
        )
        if not task._settled:
            await self._give_back(task, "StopTimeout", "cancelled at the worker's stop", retry_in_ms=0, stop=stop)
        return False, None

    async def _conclude(
        self, task: Task, result: Any, error: Any, stop: asyncio.Event | None
    ) -> tuple[bool, Task | None]:
        """``task``'s handler ended with ``result`` (or the business ``error``): acked, unless the
        handler settled it; what the handler's own unanswered ack said wins over its return."""
        if task._settled:  # the handler settled it (an ack with an error, a fail)
            return self._settled_by_handler(task), None
        self._concluding = _Sending(task, result, error)  # (cleared by ``_serve``)
        if task._fail_attempted is not None:  # its own fail got no answer: that fail again, never an ack
            failed, retry_in_ms = task._fail_attempted
            log.warning("task %s: its handler's fail got no answer: sent again", task.id)
            until = time.monotonic() + self.stop_grace if stop is not None and stop.is_set() else None
            await self._send_fail(task, [failed], retry_in_ms=retry_in_ms, until=until)
            return True, None
        if task._attempted is not None:  # its own ack got no answer: that outcome, not the return value
            result, error = task._attempted
        acked, following = await self._ack_in_loop(task, result, error=error, stop=stop)
        if acked is False:
            # The bridge did not apply the result: the lease had run out and another worker took the
            # task (it runs again there), or it was cancelled or parked. Work done for nothing, which
            # a user must be able to see: counted in ``lost``, not in what ``run`` handled.
            self.lost += 1
            log.warning(
                "task %s (epoch %s): its ack was answered false: this worker's lease was lost (it ran out "
                "and another worker took the task, or it was cancelled or parked); its result was not applied",
                task.id,
                task.epoch,
            )
            return False, following
        return True, following

    async def _settle_in_hand(self, task: Task, stop: asyncio.Event | None) -> tuple[bool, Task | None] | None:
        """``task`` handed back at the lease whose handler ran already and whose ack or fail got
        no answer: settled as the handler's outcome said (what ``_serve`` returns), the handler not
        run again; None for any other task. Either remembered outcome is forgotten here: a lease
        handed back after another task is no longer this worker's."""
        held, self._result_in_hand = self._result_in_hand, None
        if held is not None and held[:2] == (task.id, task.epoch):
            return await self._ack_result_in_hand(task, held[2], held[3], stop)
        failing, self._fail_in_hand = self._fail_in_hand, None
        if failing is not None and failing[:2] == (task.id, task.epoch):
            log.info(
                "task %s (epoch %s) handed back after its fail got no answer: the fail is sent again",
                task.id,
                task.epoch,
            )
            until = time.monotonic() + self.stop_grace if stop is not None and stop.is_set() else None
            await self._send_fail(task, [failing[2]], retry_in_ms=failing[3], resent=failing[4] + 1, until=until)
            return False, None
        return None

    async def _failed_in_handler(self, task: Task, exc: Exception, stop: asyncio.Event | None) -> bool:
        """``task``'s handler raised ``exc``: given back (a technical failure) unless the handler
        settled it; True (nothing given back) when the handler's own ack or ack_error got no
        answer: that outcome is to be sent again (``_serve``). Given back, a business error
        whose ack met a broker blip ran again and was parked "failed", the engine never told it."""
        if not task._unanswered:
            log.warning("task %s failed in its handler: %s: %s", task.id, type(exc).__name__, exc)
            if not task._settled:
                await self._give_back(task, type(exc).__name__, str(exc), stop=stop)
            return False
        log.warning("task %s: its handler's ack or fail got no answer (%s): sent again", task.id, type(exc).__name__)
        return True

    def _settled_by_handler(self, task: Task) -> bool:
        """Whether ``task``, settled by its handler itself, counts as handled: not when its own
        ack was answered false (work done for nothing, counted in :attr:`lost` as the loop's are)."""
        if not task._ack_refused:
            return True
        self.lost += 1
        log.warning(
            "task %s (epoch %s): the ack its handler sent was answered false: this worker's lease "
            "was lost (or the task cancelled or parked); its result was not applied",
            task.id,
            task.epoch,
        )
        return False

    async def _ack_result_in_hand(
        self, task: Task, result: Any, error: Any, stop: asyncio.Event | None
    ) -> tuple[bool, Task | None]:
        """``task`` is the lease whose handler ran already and whose ack got no answer, handed
        back (a fetch not ``fresh``, the drain at stop): its result is acked. Run again, the
        handler's side effects were made twice. Not counted again in what ``run`` handled."""
        log.info("task %s (epoch %s) handed back after its ack got no answer: its result is acked", task.id, task.epoch)
        self._concluding = _Sending(task, result, error)  # (cleared by ``_serve``)
        acked, following = await self._ack_in_loop(task, result, error=error, stop=stop)
        if acked is False:
            self.lost += 1
            log.warning(
                "task %s (epoch %s): its ack was answered false: its result was not applied", task.id, task.epoch
            )
        return False, following

    async def _handle(self, task: Task, handler: Callable[[Task], Awaitable[Any]], stop: asyncio.Event | None) -> Any:
        """``handler(task)``; with :attr:`stop_timeout`, cancelled that long after ``stop`` is set
        (raises _StopTimeout). Without it, a handler is waited for however long it takes."""
        if stop is None or self.stop_timeout is None:
            return await handler(task)
        running = asyncio.ensure_future(handler(task))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                await asyncio.wait({running}, timeout=self.stop_timeout)
        except asyncio.CancelledError:
            # ``run`` cancelled as the handler finished: its outcome is sent, not its work thrown
            # away (the task was given back, and ran again).
            if running.done() and not running.cancelled():
                failed = running.exception()
                if failed is None:
                    self._finished_at_cancel = _Sending(task, running.result())
                elif isinstance(failed, TaskError):
                    self._finished_at_cancel = _Sending(task, None, failed.error)
            raise
        finally:
            stopping.cancel()
            # Also when ``run`` itself is cancelled meanwhile: the handler does not outlive it.
            cut = not running.done()
            if cut:
                running.cancel()
                await asyncio.wait({running})
        if cut:
            raise _StopTimeout
        return running.result()

    async def _claimed_after_stop(self) -> AsyncIterator[Task]:
        """On stop: the tasks a request of this worker without an answer (a fetch given up at
        stop, one whose reply was lost, an ack's next) may still claim for it at the bridge,
        until that request's deadline (:attr:`_unsure_until`). Such a task is leased to this
        worker and its reply goes nowhere: returning at once would leave it leased to a stopped
        worker for its whole lease. The worker first closes its connection, so that such a
        request's long-poll claims nothing more (the bridge probes the reply-to before a claim).
        Then, until the deadline but for :attr:`stop_grace` seconds at most, it asks the bridge
        whether it holds a task (an ``extend`` naming none: the bridge reads the worker's pointer
        and never claims), every :data:`STOP_ASK_EVERY_S`, and only when it does fetches it (not
        ``fresh``: the bridge hands the task held) and yields it, to be handled. A fetch there
        would claim the queue's next task for a worker that is stopping: it takes no new work.
        Nothing when every request was answered.

        Bounded: no request starts after the grace; one under way then is awaited (the client's
        ``timeout`` at most each, an extend and the fetch it calls for), so the asking ends within
        ``stop_grace`` plus two ``timeout``; handling what it yields takes the handler's time on
        top. An ``integrity_error`` answer moves on, an answer saying the worker is misconfigured
        ends the asking (logged). A fetch of its own that loses its reply too is not waited for
        (logged). Past the deadline, it asks once all the same if such a request may have
        claimed a task before its reply was lost (:attr:`_claim_unanswered`: until an answer
        said what the worker holds; nor the pointer read since, :attr:`_pointer_unread`: a
        retry's answer did not say what the lost request claimed after it): otherwise that task
        stayed leased to the stopped worker."""
        if time.monotonic() >= self._unsure_until and not self._claim_unanswered and not self._pointer_unread:
            return
        # Such a request's reply-to dies with the connection: a long-poll waiting at a bridge then
        # claims nothing more. Left to fetch back: a claim past its probe already, or made by a
        # request still queued at a busy bridge, for at most ``stop_grace`` (beyond it, such a
        # task returns when its lease ends; at least once all the same).
        await self._drop_connection()
        unsure_until = self._unsure_until
        until = min(unsure_until, time.monotonic() + self.stop_grace)
        log.info(
            "stopping: asking for a task a request without an answer may claim, for %.1fs",
            max(0.0, until - time.monotonic()),
        )
        failed = 0
        asked = False
        while not asked or time.monotonic() < until:
            asked = True
            # Settled: the extend must name no task, to read what the bridge says is held. Again
            # at every question: a task handled here (its ack sets it as current) was named by
            # every later one (answered false), and a second task claimed for this worker was left.
            self.current = None
            try:
                task = await self._stop_fetch()
            except IntegrityError as exc:  # dead-lettered: the next fetch moves on
                log.error("stopping: a task could not be opened (%s); the bridge dead-lettered it", exc)
                task = None
            except MISCONFIGURED as exc:  # no request of this worker can succeed: nothing to hand back
                log.error("stopping: request refused (%s: %s); not asking any more", exc.code, exc)
                break
            except BridgeClientError as exc:
                failed += 1
                log.warning("stopping: request got no answer (%d in a row): %s", failed, exc)
                task = None
                # Paused as the loop's fetches are (RabbitMQ may be down), never past the grace.
                await asyncio.sleep(max(0.0, min(until - time.monotonic(), self._backoff_s(failed))))
                continue
            failed = 0
            if task is not None:
                yield task
            else:
                await asyncio.sleep(max(0.0, min(until - time.monotonic(), STOP_ASK_EVERY_S)))
        if self._unsure_until > unsure_until:
            log.warning("stopping: a fetch got no answer; a task it may still claim returns when its lease ends")

    async def _stop_fetch(self) -> Task | None:
        """One step of :meth:`_claimed_after_stop`: the task this worker holds at the bridge, if
        any. Asked with an extend naming no task (``held``), which reads the worker's pointer and
        never claims; fetched (never ``fresh``, never waiting) only when it holds one."""
        if not await self.extend(held=True):
            return None
        self._holds_nothing = False  # never ``fresh``: the bridge must hand the held task
        return await self.fetch()

    async def _ack_in_loop(
        self, task: Task, result: Any, *, error: Any = None, stop: asyncio.Event | None
    ) -> tuple[bool | None, Task | None]:
        """Ack ``task`` with ``result`` (or the business ``error``) and, unless ``stop`` is set, take
        the next task from the same reply: ``(what the ack answered, the next task)``, the answer
        None when there was none (or the result was refused), the task None when there is none (the
        caller fetches, and long-polls). On stop (set before or during the retries) the ack goes
        alone; a next task its reply hands once stop is set (stop came while the request was on its
        way) is handled then, as the drain handles a task claimed for the worker. A request without
        an answer, or answered ``unavailable``, is sent again (a retry hands the same next task, see
        :meth:`ack_and_fetch`) while the lease lasts, at least 3 times (:meth:`_ack_retry_until`);
        then the caller's fetch, not ``fresh``, gets this worker's task again if the ack never
        applied and nobody took it (at least once). On stop there is no such fetch, and the retries
        last ``stop_grace`` at most: a task still not acked then returns when its lease ends
        (logged).

        A result the bridge refuses (any error it answers but ``unavailable``: one larger than its
        ``BRIDGE_MAX_VALUE_BYTES`` is ``payload_too_large``) or that JSON cannot carry (a set, a
        coroutine never awaited: :class:`~bridge.domain.jsonvalue.JsonError`, before anything is
        sent) was not applied: sending it again cannot help, and raising would end the loop with the
        task leased to it. The task is given back instead (``type`` ``ResultRefused``)."""
        take_next = stop is None or not stop.is_set()
        until = self._ack_retry_until(task, stopping=not take_next)
        attempt = 0
        refused_last: Exception | None = None  # the last answer: ``internal``, sent again
        # At least ACK_ATTEMPTS, but on stop one (then ``stop_grace`` bounds them): three no-answer
        # attempts of ``timeout`` each outlasted Kubernetes' 30 s grace with the defaults.
        while attempt < (ACK_ATTEMPTS if take_next else 1) or time.monotonic() < until:
            attempt += 1
            if take_next and stop is not None and stop.is_set():
                # Stopped while the ack was being sent again (a broker outage): no next task is
                # taken, and the retries end within ``stop_grace``, not at the lease's end (up to
                # 12 h: the pod ran until it was killed).
                take_next = False
                until = min(until, time.monotonic() + self.stop_grace)
                if time.monotonic() >= until:
                    break
            self.current = task
            try:
                if not take_next:
                    return await (task.ack(result) if error is None else task.ack_error(error)), None
                acked, following = await self.ack_and_fetch(result, error=error)
            except (TransportError, UnavailableError) as exc:
                refused_last = None
                await self._pause_before_ack_again(task, exc, attempt, until)
            except (BridgeClientError, jsonvalue.JsonError) as refused:
                # Sent again only by a loop that goes on (not one that ends at ``until`` on stop:
                # the task was then left leased instead of given back), and given back if the loop
                # ends after it all the same (its pause took it past ``until``).
                going_on = take_next or time.monotonic() < until
                if going_on and await self._ack_again_after(task, refused, attempt):
                    refused_last = refused
                    continue
                await self._give_back(task, "ResultRefused", f"{type(refused).__name__}: {refused}", stop=stop)
                return None, None
            else:
                # A next task the reply hands once stop is set (it came while the request was on
                # its way) was claimed for this worker: handled, as the stop's drain handles one.
                # Given back (a fail), it counted a second delivery: a task on its last allowed
                # one was parked without ever running.
                return acked, following
        if refused_last is not None:  # its last answer was ``internal``: the result was not applied
            await self._give_back(task, "ResultRefused", f"{type(refused_last).__name__}: {refused_last}", stop=stop)
            return None, None
        if task.epoch is not None:  # (a bridge before 1.1 names no epoch: no lease to recognise)
            self._result_in_hand = (task.id, task.epoch, result, error)  # never answered: see ``_serve``
        if not take_next:
            log.warning("task %s not acked before stop: it returns when its lease ends", task.id)
        return None, None

    async def _pause_before_ack_again(self, task: Task, exc: Exception, attempt: int, until: float) -> None:
        if attempt == 1 or attempt % 10 == 0:
            log.warning("ack of task %s not answered (%s), attempt %d", task.id, exc, attempt)
        pause = self._backoff_s(attempt)
        if attempt >= ACK_ATTEMPTS:
            pause = min(pause, max(0.0, until - time.monotonic()))
        await asyncio.sleep(pause)

    async def _ack_again_after(self, task: Task, refused: Exception, attempt: int) -> bool:
        """Whether an ack answered ``refused`` is sent again (after a pause): only ``internal``,
        the bridge failing on it (a bug, a race it did not expect), which says nothing of the
        result, and only while the attempts are under ``ACK_ATTEMPTS``; else the task is given back.
        Given back at once, work that succeeded ran again, and on its last allowed delivery was
        parked "failed", the engine told delivery_limit (found by review, 2026-12-07)."""
        if isinstance(refused, InternalError) and attempt < ACK_ATTEMPTS:
            log.warning("ack of task %s failed at the bridge (%s), attempt %d: sent again", task.id, refused, attempt)
            await asyncio.sleep(self._backoff_s(attempt))
            return True
        log.warning("task %s: its result was refused (%s: %s)", task.id, type(refused).__name__, refused)
        return False

    def _ack_retry_until(self, task: Task, *, stopping: bool) -> float:
        """Until when (monotonic) an ack of ``task`` that gets no answer is sent again: while its
        lease lasts (by the bridge's clock), on stop :attr:`stop_grace` at most. Given up after
        :data:`ACK_ATTEMPTS` (about 1.4 s), the next fetch got the task back and its handler ran
        again (work done twice) whenever RabbitMQ was away a few seconds as a task finished: the
        result is in hand and an ack is idempotent, so it waits for the broker instead. Past the
        lease the task may be another worker's: the loop's fetch (not ``fresh``) then gets it
        back only if nobody took it."""
        left = _seconds_until(task.lease_expires_at, self.bridge_time())
        if left is None:  # a lease end this client cannot read: the attempts alone
            return 0.0
        if stopping:
            left = min(left, self.stop_grace)
        return time.monotonic() + left

    async def _give_back(
        self,
        task: Task,
        kind: str,
        message: str,
        *,
        retry_in_ms: int | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Fail ``task``: its handler raised (``kind`` is the exception's type) or its result was
        refused. The error names ``kind`` and ``message`` (cut to :data:`ERROR_MESSAGE_MAX`
        characters); if the bridge refuses that (larger than its limit) or JSON cannot carry it,
        ``kind`` alone. The loop goes on whatever happens: a task not given back returns when
        its lease ends. With ``stop`` set (the loop ends after this task), a fail without an answer
        is sent again within :attr:`stop_grace`, as the ack at stop is: nothing would send it
        again later, and the task stayed leased for the whole lease its heartbeat last set."""
        if len(message) > ERROR_MESSAGE_MAX:
            message = f"{message[:ERROR_MESSAGE_MAX]}... ({len(message)} characters)"
        errors = [{"type": kind, "message": message}, {"type": kind}]
        until = time.monotonic() + self.stop_grace if stop is not None and stop.is_set() else None
        await self._send_fail(task, errors, retry_in_ms=retry_in_ms, until=until)

    async def _send_fail(
        self,
        task: Task,
        errors: Sequence[Any],
        *,
        retry_in_ms: int | None,
        resent: int = 0,
        until: float | None = None,
    ) -> None:
        """:meth:`_give_back`: fail ``task`` with the first of ``errors`` the bridge takes. One
        without an answer may not have applied: its lease is remembered (:attr:`_fail_in_hand`),
        and if a fetch hands it back, the fail is sent again (see ``_serve``); with ``until``
        (monotonic: the worker stops), sent again until then instead."""
        # ``run`` cancelled meanwhile sends it again (``_settle_at_cancel``), not an ack.
        self._concluding = _Sending(task, fail=(errors[0], retry_in_ms)) if errors else self._concluding
        for error in errors:
            try:
                await self._fail_until(task, error, retry_in_ms, until)
                return
            except (TransportError, UnavailableError) as lost:
                # (A bridge before 1.1 names no epoch: no lease to recognise.)
                if task.epoch is not None and resent < FAIL_RESENDS:
                    self._hold_fail(task.id, task.epoch, error, retry_in_ms, resent)
                log.warning(
                    "task %s: its fail got no answer (%s): sent again if the bridge hands it back to this "
                    "worker; else it returns when its lease ends",
                    task.id,
                    lost,
                )
                return
            except (BridgeClientError, ValueError) as refused:
                log.warning("task %s: its error was refused (%s)", task.id, refused)
        log.warning("task %s not given back: it returns when its lease ends", task.id)

    async def _fail_until(self, task: Task, error: Any, retry_in_ms: int | None, until: float | None) -> None:
        """``task.fail``, sent again after no answer (jittered pauses) until ``until`` when given."""
        failed = 0
        while True:
            try:
                await task.fail(error, retry_in_ms=retry_in_ms)
                return
            except (TransportError, UnavailableError):
                failed += 1
                if until is None or time.monotonic() >= until:
                    raise
                await asyncio.sleep(max(0.0, min(until - time.monotonic(), self._backoff_s(failed))))

    def _backoff_s(self, failed: int) -> float:
        """The pause after ``failed`` requests in a row got no answer: full jitter (uniform up to
        :attr:`poll_interval` doubled per failure, at most :data:`POLL_PAUSE_MAX_S`), so that the
        workers of a fleet that lost RabbitMQ or a bridge at the same moment do not all come back
        at the same moments."""
        # From at least BACKOFF_BASE_S: with ``poll_interval=0`` (a long-polling user's natural
        # choice) every pause was 0, and a fleet's workers retried a restarting broker by the
        # hundreds a second each, a refused connection a millisecond.
        base = max(self.poll_interval, BACKOFF_BASE_S)
        return random.uniform(0.0, min(POLL_PAUSE_MAX_S, base * 2 ** min(failed - 1, 16)))  # nosec B311: jitter, not a secret

    async def _poll(self, stop: asyncio.Event | None = None) -> Task | None:
        """One fetch of the worker's loop (a long-poll of :attr:`wait_ms`); None when it found
        nothing (after :attr:`poll_interval` when not long-polling), found a task it could not
        hand out, or got no answer. Fetches that get no answer (RabbitMQ down or refusing,
        Cassandra down at the bridge) or an error that is not the worker's (``internal``, a code
        this client does not know) in a row pause longer each time, up to
        :data:`POLL_PAUSE_MAX_S`, instead of reconnecting as fast as the loop turns; ``stop`` ends
        the pause. ``integrity_error`` (the task failed authentication: tampered) is logged and
        the next fetch goes at once: the bridge dead-lettered that task and cleared this worker's
        pointer, so it moves on. An error that
        says the worker itself is wrong (:data:`MISCONFIGURED`) is raised: no retry fixes it."""
        started = time.monotonic()
        try:
            task = await self._fetch_unless_stopped(stop)
        except IntegrityError as exc:
            log.error("fetch: a task could not be opened (%s); the bridge dead-lettered it, moving on", exc)
            self._failed_polls = 0
            return None
        except MISCONFIGURED:
            raise
        except BridgeClientError as exc:
            self._failed_polls += 1
            pause = self._backoff_s(self._failed_polls)
            if self._failed_polls == 1 or self._failed_polls % 10 == 0:
                log.warning(
                    "fetch failed (%d in a row, next in %.1fs): %s: %s", self._failed_polls, pause, exc.code, exc
                )
            await self._pause(pause, stop)
            return None
        self._failed_polls = 0
        if task is None and (not self.wait_ms or time.monotonic() - started < self.wait_ms / 2000):
            # Not long-polling, or a long-poll answered empty well before its wait: a bridge that
            # does not long-poll (BRIDGE_HINTS=false, or one before contract 1.2) answers at once,
            # and fetching again at once turned the loop into a busy poll of its store.
            # (At least BACKOFF_BASE_S: with ``poll_interval=0`` a worker sent hundreds of fetches
            # a second to such a bridge, each a scan of the ready index.)
            await self._pause(max(self.poll_interval, BACKOFF_BASE_S), stop)
        return task

    async def _fetch_unless_stopped(self, stop: asyncio.Event | None) -> Task | None:
        """The loop's long-poll, given up when ``stop`` is set meanwhile: a stopping worker does
        not wait out an empty queue's whole wait (up to 30 s, beside a pod's 30 s kill deadline).
        The cancelled fetch may still claim at the bridge: :meth:`_claimed_after_stop` closes its
        reply-to, then fetches what it may have claimed."""
        if stop is None or not self.wait_ms:
            return await self.fetch(wait_ms=self.wait_ms)
        fetching = asyncio.ensure_future(self.fetch(wait_ms=self.wait_ms))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not fetching.done():  # stopped: the fetch given up, and waited for within the ``except``
                fetching.cancel()
                # Bounded, as at a cancel: a fetch still connecting unwinds through a TLS close (up
                # to 30 s), and a stop waited for it with no bound (found by review, 2026-12-08).
                await asyncio.wait({fetching}, timeout=self.timeout)
                if not fetching.done() and self.channel is not None:
                    self._claim_unanswered = self._pointer_unread = True  # may have been sent
        except asyncio.CancelledError:
            # ``run`` cancelled: the fetch's own cancellation marks its request unanswered (it may
            # still claim at the bridge), which the drain then asks about; waited for here, or the
            # drain (on Python 3.12+, run in this task at once) looked before it did. One answered
            # with a task as the cancel came is given back by the drain too.
            fetching.cancel()
            await asyncio.wait({fetching}, timeout=self.timeout)  # (a TLS close may take 30 s)
            if not fetching.done():
                # May have been sent. Not while no connection is open (the fetch still connecting,
                # a node's TLS close under way): nothing was sent, and the drain asked a broker it
                # could not reach for its whole bound after this wait (found by review, 2026-12-08).
                if self.channel is not None:
                    self._claim_unanswered = self._pointer_unread = True
            elif not fetching.cancelled() and fetching.exception() is None and fetching.result() is not None:
                # Answered with a task: the drain asks for it (for ``stop_grace``, not one try).
                self._claim_unanswered = True
                self._unsure_until = max(self._unsure_until, time.monotonic() + self.stop_grace)
            raise
        finally:
            stopping.cancel()
            if not fetching.done():
                fetching.cancel()
        # No await from here on: a cancel of ``run`` in one more loop turn came after the fetch was
        # answered with a task and outside the ``except``, and the task stayed leased to a worker
        # whose run had ended (found by review, 2026-12-08).
        if fetching.done() and not fetching.cancelled():
            return fetching.result()  # answered (or failed) before the cancel took: as it came
        return None

    @staticmethod
    async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
        if stop is None:
            await asyncio.sleep(seconds)
            return
        # Not ``asyncio.wait_for``: on Python 3.11 a cancel that came as ``stop`` was set (shutdown
        # code doing both) was swallowed, and ``run`` returned as if only stopped.
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({stopping}, timeout=seconds)
        finally:
            stopping.cancel()

    async def __aiter__(self) -> AsyncIterator[Task]:
        while True:
            task = await self._poll()
            if task is not None:
                yield task
