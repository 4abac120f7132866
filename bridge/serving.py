"""Consume requests only while this bridge can serve them, so that healthy bridges take them.

An unready bridge that keeps consuming answers every request it takes with ``unavailable`` while
healthy bridges of the fleet sit idle (issue 13.10). This loop looks at state the bridge already
has, with no network I/O of its own (so it costs nothing per second, whatever the fleet size):

- no Cassandra node connected (the driver's host state), or the connected ones answer nothing
  (``bridge.storage.stall``: a statement waited half its timeout with nothing answered): stop
  consuming everything. Only then does the loop ask the store something itself, a ping a second,
  so that a bridge with no statement of its own to send learns when the store is back;
- clock beyond the skew limit (:class:`~bridge.domain.clock.SkewGuard`): stop consuming fetches,
  the only requests that grant leases; adds, acks and the lifecycle queue go on. Off by over a
  second (or not known at all): the lifecycle queue too, whose fails, redrives and purges it would
  refuse (answered, not requeued: a worker's fail sent back to it again and again), and adds
  (and the unrouted queue, which takes adds), whose ids would place them behind the fleet's scans
  (the domain refuses them too: the HTTP gateway's). Acks go on. Merely
  uncertain (a Cassandra slow for the whole fleet: milliseconds), the lifecycle queue goes on:
  paused then, every heartbeat of the fleet stopped and leases of healthy work ran out.

When the cause is gone, consuming resumes. What was not taken waits in RabbitMQ meanwhile (requests
carry their callers' deadlines: a request whose caller gave up is dropped unexecuted when taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from bridge.domain.cancellation import stray_as_failure
from bridge.transport.topology import CONSUMED, LIFECYCLE_QUEUE

log = logging.getLogger("bridge.serving")

ALL = frozenset(CONSUMED)
LEASING = frozenset({"fetch"})
# Off by over a second: adds too (an add's id is its place in the queue: placed behind what the
# fleet's scans had passed, a task was answered stored and never handed out with its hint lost).
CLOCK_FAR_OFF = frozenset({"fetch", LIFECYCLE_QUEUE, "add", "unrouted"})


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
        clock_far_off: Callable[[], bool] = lambda: False,
        interval_s: float = 0.25,
        on_change: Callable[[frozenset[str]], None] | None = None,
        probe_storage: Callable[[], Awaitable[object]] | None = None,
        probe_every_s: float = 1.0,
    ) -> None:
        self.consumers = consumers
        self.storage_up = storage_up
        self.probe_storage = probe_storage
        self.probe_every_s = probe_every_s
        self._probe: asyncio.Task[None] | None = None
        self._probed_at = 0.0
        self.clock_ok = clock_ok
        self.clock_far_off = clock_far_off
        self.interval_s = interval_s
        self.on_change = on_change
        self.paused: frozenset[str] = frozenset()

    def wanted_paused(self) -> frozenset[str]:
        if not self.storage_up():
            return ALL
        if not self.clock_ok():
            return CLOCK_FAR_OFF if self.clock_far_off() else LEASING
        return frozenset()

    async def step(self) -> None:
        want = self.wanted_paused()
        if want == ALL:
            self._probe_later()
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

    def _probe_later(self) -> None:
        """One store probe at a time, at most one a ``probe_every_s``, only while paused for it."""
        loop = asyncio.get_running_loop()
        if self.probe_storage is None or (self._probe is not None and not self._probe.done()):
            return
        if loop.time() - self._probed_at < self.probe_every_s:
            return
        self._probed_at = loop.time()
        self._probe = loop.create_task(self._probe_once(self.probe_storage))

    @staticmethod
    async def _probe_once(probe: Callable[[], Awaitable[object]]) -> None:
        try:
            await probe()
        except Exception as exc:  # still away: the next step probes again
            log.debug("store probe: %s", type(exc).__name__)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                # A consume or cancel pending on a connection aiormq ends as stuck raises a
                # CancelledError nobody asked for: it ended this loop, silently, and the bridge
                # stayed paused (unready) for good and never paused for an outage again.
                with stray_as_failure():
                    await self.step()
            except Exception as exc:  # AMQP down: the robust connection restores it; try again
                log.debug("serving gate: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
        if self._probe is not None:
            self._probe.cancel()
