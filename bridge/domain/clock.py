"""Wall-clock time, read through one injectable clock, and a guard against clocks that are off.

Every time the bridge compares or stores (lease deadlines, task ids, Cassandra write timestamps)
comes from one :class:`Clock`. Tests and fault drills inject an offset here to play a host whose
clock is ahead or behind; production uses :class:`AnchoredClock` (``BRIDGE_CLOCK_SOURCE=cassandra``,
the default) or :class:`SystemClock` (``host``).

Lease exclusivity across bridges rests on one assumption: every bridge's clock is within half of
``BRIDGE_CLOCK_SKEW_MARGIN`` of a shared reference (Cassandra's clock), so any two bridges differ by
less than the margin, and a lease is taken back only the margin after its deadline.

- ``host``: the bridge reads its host's clock. :class:`SkewGuard` measures the host's offset from
  Cassandra's; beyond half the margin the bridge stops granting leases. The margin must cover the
  hosts' worst skew between two measurements (NTP steps included), hence a wide one.
- ``cassandra``: the bridge reads Cassandra's clock, as measured by the guard's probe and carried
  between probes by this host's *monotonic* clock (:class:`AnchoredClock`). The host's wall clock
  plays no part: an offset or a step of it changes nothing. What is left is the probe's own
  uncertainty (half its round trip) plus the monotonic clock's drift since the probe, which the guard
  bounds and checks against half the margin. Both are milliseconds on a LAN, so the margin (and the
  wait between a lease's deadline and its redelivery) can be milliseconds too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
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


def pointer_stamp(now_ms: int, last_stamp: int | None) -> int:
    """The stamp of a worker pointer a claim writes ahead: ``max(now, last + 2)``.

    A write that *undoes* a pointer (a fetch dropping the write-ahead of a claim it lost, a fail or
    a refused ack forgetting the worker's task) is stamped just after the pointer it read,
    ``last + 1``, so that any pointer written after that read survives it. A claim that read the
    same row must therefore land after that clear, not on it: stamped ``last + 1`` too, the two
    tied, and on equal timestamps Cassandra keeps the null (a tombstone wins), which wiped the
    new task's pointer while the task stayed leased to the worker (a fail on one bridge
    overlapping the worker's next fetch on another did so in up to 12 rounds of 40)."""
    now_us = now_ms * 1000
    return now_us if last_stamp is None or now_us > last_stamp + 1 else last_stamp + 2


@dataclass
class SkewReading:
    offset_ms: float  # this host's clock minus the reference; positive = the host is ahead
    error_ms: float  # half the round trip of the probe (+ the reference's 1 ms resolution)
    at_monotonic: float  # seconds (time.monotonic) at the probe's midpoint
    reference_ms: float = 0.0  # the reference's time at that midpoint (best estimate)


# How fast this host's monotonic clock may run apart from Cassandra's, as a fraction: a free-running
# quartz stays within about 50 ppm; 100 ppm is 3 ms in 30 s. The raw clock (below), not the one NTP
# slews: chrony slews CLOCK_MONOTONIC at up to 83,333 ppm (ntpd 500) after a step of the wall
# clock, and carried by it, a bridge's time ran 150 ms off in 30 s while its bound said 4.
MONOTONIC_DRIFT = 100e-6
_RAW_CLOCK: int | None = getattr(time, "CLOCK_MONOTONIC_RAW", None)


def raw_monotonic() -> float:
    """Seconds of CLOCK_MONOTONIC_RAW (the hardware's rate, never slewed by NTP) where the platform
    has it, else ``time.monotonic``. Like it, it stops while the host is suspended."""
    return time.clock_gettime(_RAW_CLOCK) if _RAW_CLOCK is not None else time.monotonic()


class AnchoredClock:
    """Cassandra's clock, carried between readings by this host's monotonic clock.

    ``now_ms`` = the reference's time at the anchor reading + monotonic time elapsed since it. The
    host's wall clock is used only before the first reading (a bridge's start waits for one before
    it takes any request, and grants no lease without one: see :class:`SkewGuard`). The time never
    goes backwards: a new anchor a millisecond behind the old one's extrapolation holds the clock
    still for that millisecond instead.
    """

    def __init__(
        self,
        fallback: Clock,
        *,
        drift: float = MONOTONIC_DRIFT,
        monotonic: Callable[[], float] = raw_monotonic,
    ) -> None:
        self.fallback = fallback
        self.drift = drift
        self.monotonic = monotonic
        self.anchor: SkewReading | None = None
        self._last = -(2**62)
        # Told when the first reading replaces the host's clock (``on_first_anchor``).
        self._first_anchor: list[Callable[[], None]] = []

    def on_first_anchor(self, callback: Callable[[], None]) -> None:
        """``callback`` runs when the first reading replaces the host's clock: what was derived
        from the host's time until then (the driver's write timestamps) starts again from this one."""
        self._first_anchor.append(callback)

    def now_ms(self) -> int:
        a = self.anchor
        if a is None:
            return self.fallback.now_ms()
        t = int(a.reference_ms + (self.monotonic() - a.at_monotonic) * 1000)
        if t < self._last:
            return self._last
        self._last = t
        return t

    def uncertainty_ms(self) -> float | None:
        """How far ``now_ms`` may be from the reference's time now (None before any reading): the
        anchor's bound, plus how far the clock is held ahead of its extrapolation (it never goes
        backwards: after an anchor behind the time already read, it stands still until the
        reference catches up, and a bridge whose bound left that out said it was within a
        millisecond while ahead by all of it)."""
        a = self.anchor
        if a is None:
            return None
        t = a.reference_ms + (self.monotonic() - a.at_monotonic) * 1000
        return self._aged(a) + max(0.0, self._last - t)

    def _aged(self, reading: SkewReading) -> float:
        return reading.error_ms + max(0.0, self.monotonic() - reading.at_monotonic) * 1000 * self.drift

    def offer(self, reading: SkewReading) -> bool:
        """Anchor on ``reading`` if it bounds the time better than the current anchor does by now
        (a probe slowed by a busy Cassandra must not replace a better, older one), or if the two
        cannot both be right: the anchor carried to the reading's moment is further from it than
        both their bounds together. The monotonic clock then stood still or jumped (a host
        suspended, a VM paused or live-migrated: the guest's monotonic clock does not count that
        time), and every time read since was that far off, however small its bound said it was.
        Kept for being the better bound, such an anchor threw away the one reading that showed it
        wrong: leases granted already expired on other bridges' clocks, deadlines filed in buckets
        the recovery passes had read, for as long as the bridge ran.

        A better bound that disagrees so is taken too, and said as loudly: one reading cannot tell a
        host that paused from a Cassandra node whose clock is off (its ``now()`` answered the probe),
        and before, a node ahead by minutes moved the bridge's time that far without a word."""
        a = self.anchor
        if a is not None:
            agrees = abs(self._gap_ms(a, reading)) <= self._aged_at(a, reading.at_monotonic) + reading.error_ms
            if agrees and self._aged(reading) >= self._aged(a):
                return False
            if not agrees:
                log.error(
                    "clock: this bridge's time was %+.0f ms off Cassandra's as read now (the host or its VM "
                    "paused, its monotonic clock jumped, or the Cassandra node that answered keeps another "
                    "time); it keeps Cassandra's time from this reading on",
                    -self._gap_ms(a, reading),
                )
        self.anchor = reading
        if a is None:
            self._last = -(2**62)  # the host's clock, used until now, says nothing about this one
            for callback in self._first_anchor:
                callback()
        return True

    @staticmethod
    def _gap_ms(anchor: SkewReading, reading: SkewReading) -> float:
        """The reading's time minus the anchor's, carried to the reading's monotonic moment."""
        return reading.reference_ms - (anchor.reference_ms + (reading.at_monotonic - anchor.at_monotonic) * 1000)

    def _aged_at(self, reading: SkewReading, at_monotonic: float) -> float:
        return reading.error_ms + max(0.0, at_monotonic - reading.at_monotonic) * 1000 * self.drift


class SkewGuard:
    """Measures this bridge's clock against a reference and says whether it may grant leases.

    ``probe`` returns the reference's current time in milliseconds (Cassandra's ``now()``). The
    reading with the shortest round trip of a few probes is kept (the least uncertain one).

    With an ``anchor`` (``BRIDGE_CLOCK_SOURCE=cassandra``) each reading is offered to the
    :class:`AnchoredClock`, and the bridge may grant leases while the anchor's uncertainty is within
    half the margin; before the first reading it may not. Without one (``host``), leases are allowed
    while the host's offset is within half the margin, and until the first reading succeeds (an
    unreachable reference is an outage of Cassandra, which every lease needs anyway).
    """

    PROBES = 2  # the shorter round trip of two reads; per bridge and interval: the fleet pays N times
    MAX_PROBES = 6  # ... or more while none of them came back fast enough to bound the time well
    RETRY_S = 1.0  # measuring again this soon while leases are refused (not after a whole interval)
    # ... then twice as long at each refusal in a row, up to this (and the interval), with jitter:
    # a Cassandra slow for the whole fleet (round trips past the limit) had every bridge send up to
    # six probes a second, 600 reads a second for 100 bridges, while none of them served fetches.
    RETRY_MAX_S = 8.0

    def __init__(
        self,
        clock: Clock,
        probe: Callable[[], Awaitable[int]],
        *,
        margin_ms: int,
        interval_s: float,
        on_reading: Callable[[SkewReading], None] | None = None,
        anchor: AnchoredClock | None = None,
    ) -> None:
        self.clock = clock  # the host's clock: its offset is measured (and reported) in both modes
        self.probe = probe
        self.limit_ms = margin_ms / 2
        self.interval_s = interval_s
        self.on_reading = on_reading
        self.anchor = anchor
        self._monotonic = anchor.monotonic if anchor is not None else time.monotonic
        self.reading: SkewReading | None = None
        # Whether leases were last said granted (None: nothing said yet). With the anchor, the
        # bound runs out between two measurements (its uncertainty grows with the drift allowed):
        # judged at a measurement alone, the onset was almost never logged, only the recovery.
        self._said_ok: bool | None = None

    @property
    def ok(self) -> bool:
        if self.anchor is not None:
            u = self.anchor.uncertainty_ms()
            return u is not None and u <= self.limit_ms
        r = self.reading
        # The offset's error counts: one slow probe (Cassandra busy: now() read 700 ms into a
        # 720 ms round trip) put an 800 ms offset at 460, within a 500 ms limit.
        return r is None or abs(r.offset_ms) + r.error_ms <= self.limit_ms

    def error_bound_ms(self) -> float | None:
        """How far this bridge's time may be off Cassandra's now: the anchor's uncertainty, or
        the host's measured offset plus the measurement's error (None before a measurement)."""
        if self.anchor is not None:
            return self.anchor.uncertainty_ms()
        r = self.reading
        return None if r is None else abs(r.offset_ms) + r.error_ms

    def describe(self) -> str:
        r = self.reading
        if self.anchor is not None:
            u = self.anchor.uncertainty_ms()
            if u is None:
                return "Cassandra's clock not measured yet"
            return (
                f"this bridge keeps Cassandra's time within +/- {u:.1f} ms; the limit is +/- {self.limit_ms:.1f} ms "
                "(half of BRIDGE_CLOCK_SKEW_MARGIN): raise the margin if Cassandra is this far away"
            )
        if r is None:
            return "clock skew not measured yet"
        return (
            f"this bridge's clock is {r.offset_ms:+.0f} ms (+/- {r.error_ms:.0f}) off Cassandra's; "
            f"the limit is +/- {self.limit_ms:.0f} ms (half of BRIDGE_CLOCK_SKEW_MARGIN)"
        )

    async def measure(self) -> SkewReading:
        best: SkewReading | None = None
        for attempt in range(self.MAX_PROBES):
            if attempt >= self.PROBES and (best is None or best.error_ms <= self.limit_ms / 2):
                break  # two probes, unless neither bounds the time well (a busy moment): then up to 6
            t0 = self.clock.now_ms()
            m0 = self._monotonic()
            reference = await self.probe()
            m1 = self._monotonic()
            rtt_ms = (m1 - m0) * 1000
            # now() has a resolution of 1 ms: the reference's true time is in [reference, reference + 1).
            ref_mid = reference + 0.5
            error_ms = rtt_ms / 2 + 0.5
            reading = SkewReading(t0 + rtt_ms / 2 - ref_mid, error_ms, (m0 + m1) / 2, ref_mid)
            if best is None or reading.error_ms < best.error_ms:
                best = reading
        assert best is not None
        first = self.reading is None
        self.reading = best
        if self.anchor is not None:
            self.anchor.offer(best)
        if self.on_reading is not None:
            self.on_reading(best)
        if first and self.ok and self.anchor is not None:
            log.info("clock: %s (the host's own clock is %+.0f ms off)", self.describe(), best.offset_ms)
        self.say_state()
        return best

    def say_state(self) -> None:
        """Log a change of whether leases are granted, wherever it is seen (a measurement, or the
        bound running out between two)."""
        ok = self.ok
        if ok == self._said_ok:
            return
        if not ok:
            log.error("clock skew beyond the margin: refusing leases; %s", self.describe())
        elif self._said_ok is False:
            log.warning("clock skew back within the margin: granting leases again; %s", self.describe())
        self._said_ok = ok

    def next_probe_s(self) -> float:
        """While leases are granted: the interval, or sooner if the time's bound would run out before
        it (the bound widens by the drift allowed since the last reading: 100 ppm, 3 ms in 30 s). A
        long interval (``BRIDGE_CLOCK_CHECK_INTERVAL=300``) or a tight margin (5 ms) left it to run
        out between two probes, and every bridge of the fleet refused leases for much of each
        interval (62% of the time at 25 ms and 300 s, half of it at 5 ms and 30 s)."""
        a = self.anchor
        u = None if a is None else a.uncertainty_ms()
        if a is None or u is None:
            return self.interval_s
        target = self.limit_ms * 0.8  # measured again with a fifth of the bound to spare
        if u >= target:
            return min(self.interval_s, self.RETRY_S)
        return min(self.interval_s, max(self.RETRY_S, (target - u) / (a.drift * 1000)))

    async def run(self, stop: asyncio.Event) -> None:
        """Measure every ``interval_s`` (the first measurement is the caller's, before serving), and
        every second while leases are refused, to serve again as soon as the clock allows it."""
        refused = 0  # measurements in a row after which leases were still refused
        while True:
            self.say_state()
            if self.ok:
                refused, wait_s = 0, self.next_probe_s()
            else:
                refused += 1
                ceiling = min(self.interval_s, self.RETRY_MAX_S, self.RETRY_S * 2 ** min(refused - 1, 16))
                # Jitter, not a secret: the fleet's bridges met the slow Cassandra at one moment.
                wait_s = random.uniform(ceiling / 2, ceiling)  # nosec B311
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait_s)
            if stop.is_set():
                return
            try:
                await self.measure()
            except Exception as exc:  # Cassandra down: readiness reports that separately
                log.debug("clock probe failed: %s", type(exc).__name__)
