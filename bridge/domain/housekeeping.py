"""Trimming the queue counters: rows past every reader's window, deleted by the duty holder.

``queue_counts`` (a row per queue and day) and ``delayed_counts`` (a row per queue and minute in
which a delayed task falls due) are Cassandra counter tables, which cannot carry a TTL. Stats
read only the days within the task TTL (``bridge.domain.stats``), so older rows are never read
again, yet they stayed on disk for ever: a queue with delayed tasks due every minute grew its
``delayed_counts`` partition by 525,600 rows a year (about 25 MB), towards Cassandra's large
partition warnings.

The bridge holding the fleet's duty deletes, every :data:`TRIM_INTERVAL_S`, each registered
queue's rows older than the retention (at most :data:`MAX_QUEUES` a pass, the next going on
where it stopped) (two range deletions per queue: one tombstone each, at the
head of the partition, which stats' reads from the window's first day skip). The retention is
generous on purpose: twice the TTL and at least :data:`MIN_RETENTION_DAYS`, plus a day, so that a
bridge with a shorter ``BRIDGE_TASK_TTL`` (a setting changed pod by pod) does not cut a longer
window, and no clock skew reaches a row still counted. Those rows are never written again: a
count moves under the day of its task's id or a delayed task's due minute, both within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bridge.domain.counting import DAY_MS

if TYPE_CHECKING:
    from bridge.domain.clock import Clock
    from bridge.domain.records import QueueKey
    from bridge.domain.store import TaskStore

log = logging.getLogger("bridge.housekeeping")

TRIM_INTERVAL_S = 6 * 3600.0  # two deletions per queue, four times a day: nothing for the cluster
TRIM_FIRST_S = 300.0  # after the duty came here (a fleet restarting does not trim at once)
MIN_RETENTION_DAYS = 30
MAX_QUEUES = 1_000_000  # the registered queues walked per pass
TRIM_PAGE = 1_000  # read a page at a time: a million registered queues held at once took 370 MB


class Duty(Protocol):
    @property
    def held(self) -> bool: ...


def first_kept_day(now_ms: int, ttl_ms: int) -> int:
    """The first day whose counter rows are kept: rows of earlier days are trimmed."""
    keep_ms = max(2 * ttl_ms, MIN_RETENTION_DAYS * DAY_MS) + DAY_MS
    return (now_ms - keep_ms) // DAY_MS


@dataclass
class _Walk:
    """Where a trim pass is: the last queue it reached (None: the start), and its counts."""

    after: QueueKey | None
    walked: int = 0
    failed: int = 0


class CounterTrim:
    def __init__(self, store: TaskStore, clock: Clock, ttl_ms: int) -> None:
        self.store = store
        self.clock = clock
        self.ttl_ms = ttl_ms
        self.passes = 0
        self.failed = 0  # queues whose trim failed, all passes together
        # Where a pass stopped short (MAX_QUEUES walked, or the duty left): the next goes on from
        # there. Each pass began at the first queue, so with more registered queues than a pass
        # walks (a tenant naming a service per job), those after them were never trimmed.
        self._resume: QueueKey | None = None

    async def trim_once(self, held: Callable[[], bool] = lambda: True) -> int:
        """One pass over the registered queues, while ``held`` (the duty is here), from where the
        last pass of this process stopped; the number of queues walked. A queue whose delete
        fails is passed over (tried again next pass): one failure ended the pass, and with 200,000
        queues (400,000 deletes) few passes got through, so the queues past where they failed
        were never trimmed (found by review)."""
        before_day = first_kept_day(self.clock.now_ms(), self.ttl_ms)
        walk = _Walk(self._resume)
        try:
            await self._walk(walk, before_day, held)
        finally:
            # Kept also when a page read fails (one timeout among a thousand reads): the pass's
            # progress was lost, and the next began where the last one had (the re-review).
            self._resume = walk.after
            self.failed += walk.failed
        self.passes += 1
        log.info(
            "queue counters trimmed", extra={"queues": walk.walked, "failed": walk.failed, "before_day": before_day}
        )
        return walk.walked

    async def _walk(self, walk: _Walk, before_day: int, held: Callable[[], bool]) -> None:
        while walk.walked < MAX_QUEUES and held():
            size = min(TRIM_PAGE, MAX_QUEUES - walk.walked)
            page = await self.store.queue_page(walk.after, size)
            left = False
            for q in page:
                if not held():
                    left = True
                    break  # the duty left: its new holder trims (no second pass beside its own)
                walk.walked += 1
                try:
                    await self.store.trim_counts(q, before_day)
                except Exception as exc:  # this queue's trouble: the next pass tries it again
                    walk.failed += 1
                    if walk.failed == 1:
                        log.warning("queue counters of %s/%s not trimmed: %s", q.owner, q.service, exc)
                walk.after = q
            if left:
                return
            if len(page) < size:
                walk.after = None  # the end: the next pass starts again at the first queue
                return

    async def run(self, stop: asyncio.Event, duty: Duty) -> None:
        """Trim while this bridge holds the duty: first :data:`TRIM_FIRST_S` after it came, then
        every :data:`TRIM_INTERVAL_S`."""
        held_since: float | None = None
        next_at = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if not duty.held:
                held_since = None
            else:
                now = loop.time()
                if held_since is None:
                    held_since, next_at = now, now + TRIM_FIRST_S
                if now >= next_at:
                    try:
                        await self.trim_once(held=lambda: duty.held)
                    except Exception as exc:  # the next pass tries again; nothing depends on it
                        log.warning("queue counters not trimmed: %s", exc)
                    next_at = loop.time() + TRIM_INTERVAL_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(60.0, TRIM_FIRST_S))
