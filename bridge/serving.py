"""Consume requests only while this bridge can serve them, so that healthy bridges take them.

An unready bridge that keeps consuming answers every request it takes with ``unavailable`` while
healthy bridges of the fleet sit idle (issue 13.10). This loop looks at state the bridge already
has, with no network I/O of its own (so it costs nothing per second, whatever the fleet size):

- no Cassandra node connected (the driver's host state): stop consuming everything;
- clock beyond the skew limit (:class:`~bridge.domain.clock.SkewGuard`): stop consuming fetches,
  the only requests that grant leases; adds and acks go on.

When the cause is gone, consuming resumes. What was not taken waits in RabbitMQ meanwhile (requests
carry their callers' deadlines: a request whose caller gave up is dropped unexecuted when taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from bridge.transport.topology import CONSUMED

log = logging.getLogger("bridge.serving")

ALL = frozenset(CONSUMED)
LEASING = frozenset({"fetch"})


class Consumers(Protocol):
    async def pause(self, methods: frozenset[str] | None = None) -> None: ...

    async def resume(self, methods: frozenset[str] | None = None) -> None: ...

    def consuming(self) -> frozenset[str]: ...


class ServingGate:
    def __init__(
        self,
        consumers: Consumers,
        *,
        storage_up: Callable[[], bool],
        clock_ok: Callable[[], bool],
        interval_s: float = 0.25,
        on_change: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self.consumers = consumers
        self.storage_up = storage_up
        self.clock_ok = clock_ok
        self.interval_s = interval_s
        self.on_change = on_change
        self.paused: frozenset[str] = frozenset()

    def wanted_paused(self) -> frozenset[str]:
        if not self.storage_up():
            return ALL
        if not self.clock_ok():
            return LEASING
        return frozenset()

    async def step(self) -> None:
        want = self.wanted_paused()
        if want == self.paused:
            return
        stop, start = want - self.paused, self.paused - want
        if stop:
            await self.consumers.pause(stop)
            log.warning("stopped consuming %s: this bridge cannot serve them now", sorted(stop))
        if start:
            await self.consumers.resume(start)
            log.warning("consuming %s again", sorted(start))
        self.paused = want
        if self.on_change is not None:
            self.on_change(want)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.step()
            except Exception as exc:  # AMQP down: the robust connection restores it; try again
                log.debug("serving gate: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
