"""Connections that move to another RabbitMQ node when theirs goes away.

aio-pika's robust connection reconnects to the one URL it was given. On a cluster, a bridge whose
node was stopped for an upgrade, or died, then waits for that node to come back while the other
nodes could serve it. :class:`FailoverConnection` is the same robust connection (its channels,
consumers and declarations restored as before) whose every connection attempt tries the nodes in
turn, starting after the node it was on.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from aiormq.abc import ExceptionType
from yarl import URL

from bridge.transport.addresses import without_password

__all__ = ["FailoverConnection", "connect_first", "connect_robust"]

log = logging.getLogger("bridge.amqp")

# aio-pika's one connection attempt of a robust connection (a name-mangled private method: its
# loop calls it for the first connection and every reconnection). Checked at import, so that an
# aio-pika release that renames it fails the bridge's start, not a failover in production.
_ATTEMPT = "_RobustConnection__connect_transport"
if not callable(getattr(RobustConnection, _ATTEMPT, None)):  # pragma: no cover - a dependency change
    raise ImportError(f"aio-pika {aio_pika.__version__} has no RobustConnection.{_ATTEMPT}: failover needs updating")


class FailoverConnection(RobustConnection):
    """A robust connection over several URLs (the same user and vhost on the nodes of a cluster).

    Each attempt tries every URL once, from the one after the node last lost, and stops at the
    first that connects; only when all refuse does the attempt fail (and aio-pika retries after
    its reconnect interval, with jitter). With one URL it is aio-pika's robust connection with
    that jitter alone."""

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no RabbitMQ URL to connect to")
        self._urls = [URL(url) for url in urls]
        self._current = 0  # the URL of the open connection (or of the last one)
        self._next = 0  # where the next attempt starts
        self.opened = 0  # connections opened: 1 at start, one more per reconnection
        super().__init__(self._urls[0], **kwargs)

    # aio-pika waits reconnect_interval (5 s unless the URL says) after each failed attempt, the
    # same for every connection. A fleet that lost its broker at one instant (a restart) would
    # then knock in lockstep, hundreds of connections and their declarations at once, every
    # interval. Each wait is drawn from 0.5-1.5 times the interval instead.
    @property
    def reconnect_interval(self) -> float:
        return self._reconnect_base * random.uniform(0.5, 1.5)  # nosec B311 - spreading load, not a secret

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._reconnect_base = float(value)

    async def _on_connection_close(self, closing: Any) -> None:
        # The node this connection was on is the likeliest to be gone: start after it.
        if not (self._close_called or self.is_closed):
            self._next = (self._current + 1) % len(self._urls)
        await super()._on_connection_close(closing)

    async def _RobustConnection__connect_transport(self) -> None:  # noqa: N802 - overrides aio-pika's
        attempt = getattr(super(), _ATTEMPT)
        count, start = len(self._urls), self._next  # (a failed attempt's close moves _next)
        failure: BaseException | None = None
        for step in range(count):
            index = (start + step) % count
            self.url = self._urls[index]
            try:
                await attempt()
            except CONNECTION_EXCEPTIONS as exc:
                failure = exc
                if count > 1:
                    log.warning("RabbitMQ at %s refused or out of reach (%s): trying the next node", self, _why(exc))
                continue
            if index != self._current:
                log.info("connected to RabbitMQ at %s (another node of BRIDGE_AMQP_HOSTS)", self)
            self._current = self._next = index
            self.opened += 1
            return
        assert failure is not None
        raise failure

    @property
    def node_index(self) -> int:
        """The index in its URLs of the node this connection is on (or last was)."""
        return self._current

    @property
    def node(self) -> str:
        """host:port of the node this connection is on (or last was)."""
        url = self._urls[self._current]
        return f"{url.host}:{url.port}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # str() is empty
        return "no answer within the connect timeout"
    return str(exc) or type(exc).__name__


async def connect_robust(
    urls: Sequence[str], *, client_properties: dict[str, Any] | None = None, timeout: float | None = None
) -> AbstractRobustConnection:
    """aio-pika's ``connect_robust`` over :class:`FailoverConnection`.

    ``timeout`` bounds each node's attempt (TCP, TLS, the AMQP handshake), at this first connection
    and at every reconnection: without it a node that accepts TCP and never answers held the
    attempt for ever, and the next node was never tried. A connection that does not come up here
    (every node refused, or this call was cancelled) is closed: aio-pika's reconnection loop
    swallows a cancelled attempt and goes on reconnecting, for ever, until its connection closes."""
    connection = FailoverConnection(urls, client_properties=client_properties)
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection


async def connect_first(
    urls: Sequence[str], *, client_properties: dict[str, Any] | None = None, timeout: float | None = None
) -> tuple[AbstractConnection, int]:
    """A plain (not robust) connection to the first of ``urls`` that accepts one, and its index."""
    failure: ExceptionType | None = None
    for index, url in enumerate(urls):
        try:
            return await aio_pika.connect(url, client_properties=client_properties, timeout=timeout), index
        except CONNECTION_EXCEPTIONS as exc:
            failure = exc
            if len(urls) > 1:
                log.warning(
                    "RabbitMQ at %s refused or out of reach (%s): trying the next node", without_password(url), exc
                )
    assert failure is not None
    raise failure
