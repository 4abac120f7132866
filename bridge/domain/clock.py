"""Wall-clock time, read through one injectable clock, and a guard against hosts whose clock is off.

Every time the bridge compares or stores (lease deadlines, task ids, Cassandra write timestamps)
comes from one :class:`Clock`. Tests and fault drills inject an offset here to play a host whose
clock is ahead or behind; production uses :class:`SystemClock`.

Lease exclusivity across bridges rests on one assumption: every bridge's clock is within half of
``BRIDGE_CLOCK_SKEW_MARGIN`` of a shared reference (Cassandra's clock), so any two bridges differ by
less than the margin. :class:`SkewGuard` measures this bridge's offset against that reference; when
it is beyond half the margin the bridge stops granting leases and reports itself unready instead of
risking two workers holding one task at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("bridge.clock")


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """The host's clock, optionally shifted by ``offset_ms`` (fault drills play a skewed host)."""

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


class ManualClock:
    """A clock that moves only when told to: tests advance time instead of sleeping."""

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms

    def now_ms(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a manual clock only moves forward; build another to play a host behind")
        self.ms += ms


def next_stamp(now_ms: int, last_stamp: int | None) -> int:
    """A write timestamp (microseconds) that orders after ``last_stamp`` whatever this host's clock.

    A row that decides an outcome must not be lost to last-write-wins between hosts whose clocks
    differ: each write reads the previous stamp and writes ``max(now, previous + 1)`` (a Lamport
    clock riding on wall time), so a write that causally follows another always wins over it.
    """
    now_us = now_ms * 1000
    return now_us if last_stamp is None or now_us > last_stamp else last_stamp + 1


@dataclass
class SkewReading:
    offset_ms: float  # this bridge minus the reference; positive = this bridge is ahead
    error_ms: float  # half the round trip of the probe: the reading's uncertainty
    at_monotonic: float


class SkewGuard:
    """Measures this bridge's clock against a reference and says whether it may grant leases.

    ``probe`` returns the reference's current time in milliseconds (Cassandra's ``now()``). The
    reading with the shortest round trip of a few probes is kept (the least uncertain one).
    Until the first reading succeeds the guard allows leases: an unreachable reference is an outage
    of Cassandra, which every lease needs anyway.
    """

    PROBES = 2  # the shorter round trip of two reads; per bridge and interval: the fleet pays N times

    def __init__(
        self,
        clock: Clock,
        probe: Callable[[], Awaitable[int]],
        *,
        margin_ms: int,
        interval_s: float,
        on_reading: Callable[[SkewReading], None] | None = None,
    ) -> None:
        self.clock = clock
        self.probe = probe
        self.limit_ms = margin_ms / 2
        self.interval_s = interval_s
        self.on_reading = on_reading
        self.reading: SkewReading | None = None

    @property
    def ok(self) -> bool:
        r = self.reading
        return r is None or abs(r.offset_ms) <= self.limit_ms

    def describe(self) -> str:
        r = self.reading
        if r is None:
            return "clock skew not measured yet"
        return (
            f"this bridge's clock is {r.offset_ms:+.0f} ms (+/- {r.error_ms:.0f}) off Cassandra's; "
            f"the limit is +/- {self.limit_ms:.0f} ms (half of BRIDGE_CLOCK_SKEW_MARGIN)"
        )

    async def measure(self) -> SkewReading:
        best: SkewReading | None = None
        for _ in range(self.PROBES):
            t0 = self.clock.now_ms()
            m0 = time.monotonic()
            reference = await self.probe()
            rtt_ms = (time.monotonic() - m0) * 1000
            reading = SkewReading(t0 + rtt_ms / 2 - reference, rtt_ms / 2, time.monotonic())
            if best is None or reading.error_ms < best.error_ms:
                best = reading
        assert best is not None
        was_ok = self.ok
        self.reading = best
        if self.on_reading is not None:
            self.on_reading(best)
        if was_ok and not self.ok:
            log.error("clock skew beyond the margin: refusing leases; %s", self.describe())
        elif not was_ok and self.ok:
            log.warning("clock skew back within the margin: granting leases again; %s", self.describe())
        return best

    async def run(self, stop: asyncio.Event) -> None:
        """Measure every ``interval_s`` (the first measurement is the caller's, before serving)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            if stop.is_set():
                return
            try:
                await self.measure()
            except Exception as exc:  # Cassandra down: readiness reports that separately
                log.debug("clock probe failed: %s", type(exc).__name__)
