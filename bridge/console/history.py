"""The console chart's data: this bridge's add, completion and redelivery counters, per minute.

A background task (:meth:`MetricsHistory.run`, started with the gateway) closes a minute at each
minute boundary: the counters' growth since the previous boundary becomes one point of a ring of
:data:`POINTS` (an hour). :meth:`MetricsHistory.series` serves the ring plus the minute in
progress, read live. The counters are this process's (every owner's tasks through this bridge;
other bridges of a fleet count their own), from :class:`bridge.observability.metrics.BridgeMetrics`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.transport.wire import iso

log = logging.getLogger("bridge.console")

MINUTE_MS = 60_000
POINTS = 60
# The chart's series: (name in the JSON, the counter's name in BridgeMetrics.counter_value).
SERIES: tuple[tuple[str, str], ...] = (
    ("added", "tasks_added"),
    ("completed", "tasks_completed"),
    ("redelivered", "tasks_redelivered"),
)


class Counters(Protocol):
    """What the history reads: a counter's total over all its labels (``BridgeMetrics``)."""

    def counter_value(self, name: str) -> float: ...


@dataclass(frozen=True, slots=True)
class Point:
    minute_ms: int  # the minute's start
    counts: tuple[int, ...]  # one per SERIES


class MetricsHistory:
    def __init__(self, counters: Counters | None, now_ms: Callable[[], int], points: int = POINTS) -> None:
        self._counters = counters
        self._now_ms = now_ms
        self._ring: deque[Point] = deque(maxlen=points)
        self._points = points
        self._minute: int | None = None  # the start of the minute being counted
        self._base: tuple[float, ...] = ()  # the totals at that start

    def _totals(self) -> tuple[float, ...]:
        if self._counters is None:
            return tuple(0.0 for _ in SERIES)
        return tuple(self._counters.counter_value(counter) for _, counter in SERIES)

    def sample(self) -> None:
        """Close the minute in progress if the clock has passed it (minutes skipped count zero)."""
        now = self._now_ms()
        minute = now - now % MINUTE_MS
        totals = self._totals()
        if self._minute is None:
            self._minute, self._base = minute, totals
            return
        if minute <= self._minute:  # the same minute, or the clock went back: keep counting into it
            return
        self._ring.append(Point(self._minute, _deltas(totals, self._base)))
        skipped = range(max(self._minute + MINUTE_MS, minute - self._points * MINUTE_MS), minute, MINUTE_MS)
        for m in skipped:
            self._ring.append(Point(m, tuple(0 for _ in SERIES)))
        self._minute, self._base = minute, totals

    def series(self) -> dict[str, Any]:
        """The last :data:`POINTS` minutes, oldest first; the last one is the minute in progress."""
        if self._minute is None:
            self.sample()
        assert self._minute is not None
        current = Point(self._minute, _deltas(self._totals(), self._base))
        points = [*self._ring, current][-self._points :]
        return {
            "intervalSeconds": MINUTE_MS // 1000,
            "series": [name for name, _ in SERIES],
            "points": [
                {"at": iso(p.minute_ms), **{name: n for (name, _), n in zip(SERIES, p.counts, strict=True)}}
                for p in points
            ],
        }

    async def run(self) -> None:
        """Sample at every minute boundary until cancelled."""
        self.sample()
        while True:
            now = self._now_ms()
            await asyncio.sleep((MINUTE_MS - now % MINUTE_MS) / 1000 + 0.05)
            try:
                self.sample()
            except Exception:  # never let a bad read end the chart
                log.exception("console: metrics sample failed")


def _deltas(totals: tuple[float, ...], base: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(max(0, round(t - b)) for t, b in zip(totals, base, strict=True))
