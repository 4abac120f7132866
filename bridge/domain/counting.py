"""Queue counts for ``stats``: ready, in flight and delayed tasks per queue, without scanning.

Only transitions decided once, by a compare-and-set or an add, move a count, so that no count
depends on a step that may run twice (re-exposing a lease, announcing a due task):
- ``ready``: tasks never claimed (or redriven and not claimed since): +1 on add and on redrive,
  -1 on the first claim (``claim_new``, or the claim of a redriven task: its hint says so), a
  cancel or a purge of one. A delayed task counts in ``delayed_counts`` under its due minute
  instead and is ready once that minute has passed (``bridge.domain.stats``).
- ``in_flight``: tasks with a lease: +1 on those claims, -1 on a completion, a park, a
  dead-letter, a cancel or a purge of one. A lease that ran out and waits to be claimed
  again (about a second) and a task waiting out a ``fail``'s backoff are in flight.

Writing a Cassandra counter per transition would add a statement to every task, so each bridge
adds the deltas up in memory and flushes them about once a second: one counter update per queue
and day touched, whatever the load.

What it costs in accuracy, said plainly (docs/storage.md, "Queue counts"): a bridge killed -9
loses its last second of deltas, and a counter update that timed out may or may not have
applied. A counted move whose own write (an add, a claim, a completion) timed out with its
outcome unknown is not lost: it is looked up again off the request's path and counted if it
landed (``landed_later``), since the caller's retry then finds it done and counts nothing. The
counts are attributed to the day of the task's id, and only the days within the
task TTL are summed, so whatever drift there is leaves the counts with the tasks it concerned.
``parked`` is not a count: it reads the parked index. An exact census is ``queue-bridge stats``
(it walks the index).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from bridge.domain.errors import MaybeApplied, Unavailable
from bridge.domain.records import QueueKey
from bridge.domain.timeline import ms_of
from bridge.observability.throttled import ThrottledWarning

if TYPE_CHECKING:
    from bridge.domain.store import TaskStore

log = logging.getLogger("bridge.counts")

DAY_MS = 86_400_000
MINUTE_MS = 60_000


def was_delayed(task_id: uuid.UUID, created_at_ms: int | None) -> bool:
    """Added with a delay: its id holds its due time, later than when it was added. Its add counted
    it under its due minute (``delayed_counts``), so whatever takes it off the queue (its first
    claim, a cancel, a purge) moves it off that minute, not off ``ready``: within the minute stats
    count it delayed, and a -1 from ready hid a ready task until the minute ended."""
    return created_at_ms is not None and ms_of(task_id) > created_at_ms


async def landed_later(
    lookup: Callable[[], Awaitable[bool | None]],
    pauses_s: Iterable[float],
    pause: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> bool | None:
    """Whether a write whose outcome stayed unknown landed after all, asked of ``lookup`` after each
    pause (a store that just failed: back off between reads) until it answers True (it landed:
    the caller counts it now) or False (it certainly did not). ``lookup`` answers None, or raises
    ``Unavailable``, while it cannot tell yet. None at the end: it stayed unknown.

    Off the request's path (``Background``): the request itself was answered ``unavailable``, and
    its retry finds the write done and counts nothing, so this is the only count it gets.
    ``pause`` sleeps between the lookups (``Background.pause``: cut short when the bridge stops)."""
    for pause_s in pauses_s:
        await pause(pause_s)
        try:
            answer = await lookup()
        except Unavailable:
            continue
        if answer is not None:
            return answer
    return None


# Counter partitions one flush writes side by side (each its own updates one after another).
FLUSH_PARTITIONS_AT_ONCE = 16


class QueueCounts:
    def __init__(self) -> None:
        self._moves: dict[tuple[QueueKey, int], list[int]] = defaultdict(lambda: [0, 0])
        self._delays: dict[tuple[QueueKey, int], int] = defaultdict(int)
        # Flushed every second: an outage of minutes wrote a line a second on every bridge.
        self._warn_unflushed = ThrottledWarning(log, every_s=60.0)
        # Updates a cancelled flush had in flight (their outcome unknown: dropped), for the stop's
        # count of uncertain updates.
        self.dropped_by_cancel = 0

    def move(self, q: QueueKey, task_ms: int, *, ready: int = 0, in_flight: int = 0) -> None:
        pending = self._moves[(q, task_ms // DAY_MS)]
        pending[0] += ready
        pending[1] += in_flight

    def delay(self, q: QueueKey, due_ms: int, delta: int) -> None:
        self._delays[(q, due_ms // MINUTE_MS)] += delta

    @property
    def pending(self) -> int:
        return len(self._moves) + len(self._delays)

    async def flush(self, store: TaskStore) -> int:
        """Write the deltas gathered so far. Those that were not applied (Cassandra unreachable)
        are kept for the next flush; one whose write timed out after it was sent may have been
        applied, and an increment sent twice counts twice, so it is dropped (logged, and counted in
        the returned number)."""
        moves, self._moves = self._moves, defaultdict(lambda: [0, 0])
        delays, self._delays = self._delays, defaultdict(int)
        # A queue's counters are one partition per table: once one of its updates is refused (its
        # replicas down while the rest of the cluster serves), its other keys are kept unsent this
        # flush. Sent one by one, a queue with a day of delayed minutes pending sent a thousand
        # refused statements a second from every bridge, and healthy queues' flushes waited.
        refused: set[tuple[str, QueueKey]] = set()
        # By partition (a queue's counts, its delayed counts): sent one after another within one,
        # the partitions side by side (FLUSH_PARTITIONS_AT_ONCE at most). One after another in
        # all, a statement stalled on one queue's replicas held every other queue's counts behind
        # it (a stop's bounded flush wrote none of them; found by re-review, 2026-12-07).
        partitions: dict[tuple[str, QueueKey], list[tuple[Callable[[], Awaitable[None]], Callable[[], None]]]] = (
            defaultdict(list)
        )
        for (q, day), (ready, in_flight) in moves.items():
            if ready or in_flight:
                send = functools.partial(store.add_counts, q, day, ready, in_flight)
                keep = functools.partial(self.move, q, day * DAY_MS, ready=ready, in_flight=in_flight)
                partitions[("counts", q)].append((send, keep))
        for (q, minute), delta in delays.items():
            if delta:
                send = functools.partial(store.add_delayed, q, minute, delta)
                keep = functools.partial(self.delay, q, minute * MINUTE_MS, delta)
                partitions[("delayed", q)].append((send, keep))
        outcomes: list[bool | Exception] = []
        unsent = {id(u): u[1] for updates in partitions.values() for u in updates}
        in_flight_now = 0
        slots = asyncio.Semaphore(FLUSH_PARTITIONS_AT_ONCE)

        async def flush_partition(
            key: tuple[str, QueueKey], updates: list[tuple[Callable[[], Awaitable[None]], Callable[[], None]]]
        ) -> None:
            nonlocal in_flight_now
            async with slots:
                for update in updates:
                    del unsent[id(update)]
                    in_flight_now += 1
                    outcomes.append(await self._flush_one(key, refused, *update))
                    in_flight_now -= 1

        try:
            await asyncio.gather(*(flush_partition(key, updates) for key, updates in partitions.items()))
        except asyncio.CancelledError:
            # Cut short (a stop bounds its last flushes and ends the flusher): the updates not sent
            # yet are kept for the stop's next flush; those in flight are dropped (they may have
            # applied), counted uncertain with those that timed out before. Taken out above and
            # lost, every queue's deltas after a stalled statement went unwritten, with no log and
            # no metric (found by review, 2026-12-07).
            for keep_unsent in unsent.values():
                keep_unsent()
            self.dropped_by_cancel += in_flight_now + sum(1 for outcome in outcomes if outcome is True)
            raise
        dropped = sum(1 for outcome in outcomes if outcome is True)
        failed = next((outcome for outcome in outcomes if isinstance(outcome, Exception)), None)
        if dropped:
            log.warning("%d queue count update(s) timed out and may or may not have applied: not repeated", dropped)
        if failed is not None:
            self._warn_unflushed.warning(
                "queue counts not flushed (kept for the next flush): %s", type(failed).__name__
            )
        return dropped

    @staticmethod
    async def _flush_one(
        key: tuple[str, QueueKey],
        refused: set[tuple[str, QueueKey]],
        send: Callable[[], Awaitable[None]],
        keep: Callable[[], None],
    ) -> bool | Exception:
        """Send one update: True if dropped (it may have applied), the error if refused (kept for
        the next flush), else False (sent, or kept unsent: its partition refused another this flush)."""
        if key in refused:
            keep()
            return False
        try:
            await send()
        except MaybeApplied:
            # Dropped (it may have applied), and its partition's other updates kept unsent this
            # flush: each would wait its timeout too (a re-review: a thousand pending minutes of
            # one queue held the flush 83 minutes, all dropped, no other queue's counts flushed).
            refused.add(key)
            return True
        except Exception as exc:
            keep()
            refused.add(key)
            return exc
        return False


__all__ = ["DAY_MS", "MINUTE_MS", "QueueCounts", "landed_later"]
