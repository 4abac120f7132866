"""Is a requester still there? A long-poll fetch waits up to 30 s; its worker may be gone by the time
a task arrives (a crash, an OOM kill, a cancelled fetch on a closed connection). Claimed for it, the
task would sit leased to nobody until its ``timeToRecover`` ran out, while live workers of the same
queue waited (the gone worker's fetch is the oldest waiter, so it takes the hint first).

RabbitMQ answers a passive ``queue.declare`` of a direct reply-to name with DeclareOk while the
requester's channel lives and 404 once it is closed; the same for a server-named reply queue
(``amq.gen-...``, the other reply-to the bridge answers), which is exclusive: 405 RESOURCE_LOCKED
while its connection lives (alive), 404 once it is gone. One broker round trip, asked only of
fetches that have waited a while (a fresh waiter's requester is almost surely there)."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import aiormq
from aio_pika.abc import AbstractRobustConnection
from pamqp import commands

log = logging.getLogger("bridge.transport")

PROBE_TIMEOUT_S = 3.0  # past it the requester counts as there: a slow broker must not drop fetches
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to."
SERVER_NAMED = "amq.gen-"


class _PassiveDeclare(commands.Queue.Declare):
    """pamqp refuses the characters of direct reply-to names (``=``, ``+``, ``/``) in a queue name;
    the broker takes them (it made the name)."""

    def validate(self) -> None:
        pass


# Channels kept open between probes: each probe uses one no other probe uses while it runs.
IDLE_CHANNELS_KEPT = 4


class RequesterProbe:
    def __init__(self) -> None:
        self._connection: AbstractRobustConnection | None = None
        # Each probe has a channel to itself: a 404 (or a 405) closes the channel it answers, and
        # aiormq fails every call pending on that channel with it. On one shared channel, a live
        # worker's probe sent beside a gone requester's got the gone one's 404: its long-poll was
        # dropped unanswered, and the worker waited out its own timeout (tests/integration/
        # test_requester_probe.py).
        self._idle: list[aiormq.Channel] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.gone = 0

    def attach(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection

    async def alive(self, reply_to: str) -> bool:
        """False only when the broker says the requester's reply-to no longer exists; any other
        answer (an error, a locked exclusive queue, no answer in time) counts as alive."""
        if not reply_to.startswith((DIRECT_REPLY_TO, SERVER_NAMED)):
            return True
        channel: aiormq.Channel | None = None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                channel = await self._take()
                await channel.rpc(_PassiveDeclare(queue=reply_to, passive=True))
        except aiormq.exceptions.ChannelNotFoundEntity:
            self.gone += 1  # its channel is closed by the broker: not kept
            return False
        except BaseException as exc:
            if channel is not None:
                self._discard(channel)  # closed (a 405), or a call cut short: its state is unknown
            if not isinstance(exc, Exception):
                raise  # cancelled: the fetch is gone
            log.debug("requester probe failed: %s", type(exc).__name__)
            return True
        self._give_back(channel)
        return True

    async def _take(self) -> aiormq.Channel:
        while self._idle:
            channel = self._idle.pop()
            if not channel.is_closed:
                return channel
        # Not a robust channel: a 404 closes it, and aio-pika would reopen (and log) each time.
        assert self._connection is not None and self._connection.transport is not None
        underlay = cast(aiormq.Connection, self._connection.transport.connection)
        return cast(aiormq.Channel, await underlay.channel())

    def _give_back(self, channel: aiormq.Channel) -> None:
        if len(self._idle) < IDLE_CHANNELS_KEPT and not channel.is_closed:
            self._idle.append(channel)
        else:
            self._discard(channel)

    def _discard(self, channel: aiormq.Channel) -> None:
        if channel.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self._close(channel))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(channel: aiormq.Channel) -> None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await channel.close()
        except Exception as exc:
            log.debug("probe channel not closed: %s", type(exc).__name__)
