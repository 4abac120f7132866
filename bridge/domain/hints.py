"""Hints: which task to claim next, handed out by a broker so that bridges do not race for it.

A hint names a task that may be claimable (a fresh one after its add, a recovered one after its
lease ran out). Each hint goes to one fetch, on whichever bridge (RabbitMQ's competing
consumers), so bridges serving one queue stop reading the same head of the ready index and
trying the same claims. Hints are only hints: the claim is still decided by the lease's
compare-and-set, and a lost hint (a crash between the write and the publish, a broker restart) is
found again by a slow reconciliation scan of the ready index. A fetch that waits (``waitMs``)
waits for a hint, at no cost to the store.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

from bridge.domain.records import LANE_RECOVERED, PRIORITY_MAX, Payload, QueueKey, ReadyEntry
from bridge.domain.timeline import ms_of, ready_bucket

# Sealed bytes of a value a hint may carry: small enough that hint queues stay cheap in the
# broker's memory, large enough for the usual task (a few hundred bytes of JSON).
CARRIED_PAYLOAD_MAX = 8 * 1024


def carried(payload: Payload) -> Payload | None:
    """The payload if a hint may carry it: small, and without a token. A task with a token is read
    from the store at fetch, so that the row its result will be published from (token, trace
    context) is verified before any work is done on it, as it always was."""
    if payload.token is not None or len(payload.value.ciphertext) > CARRIED_PAYLOAD_MAX:
        return None
    return payload


@dataclass(frozen=True, slots=True)
class Hint:
    task_id: uuid.UUID
    lane: int
    seq: uuid.UUID  # the entry's place in the ready index (a fresh task's: its id)
    epoch: int | None  # recovered lane: the epoch of the lease that ran out
    has_token: bool
    # A fresh task's sealed payload, when small (``CARRIED_PAYLOAD_MAX``): the fetch that takes the
    # hint reads nothing but the claim. Only a copy: it must open under the owner's key, bound to
    # owner, service and task id; one that does not is ignored and the stored row decides.
    payload: Payload | None = None
    priority: int = 0  # a fresh task's priority (1.4): higher ones are taken first
    redriven: bool = False  # a recovered task put back by redrive, not claimed since (counts)
    # Only on a hint handed in the process before its task's write was acknowledged
    # (``TaskHints.hand_here``): True once the task is stored, False if its write failed. The
    # fetch that takes it writes ahead meanwhile, and claims only once it is True. Never sent.
    stored: asyncio.Future[bool] | None = field(default=None, compare=False)

    @property
    def recovered(self) -> bool:
        return self.lane == LANE_RECOVERED

    def entry(self) -> ReadyEntry:
        """The ready-index entry this hint stands for."""
        return ReadyEntry(
            self.lane,
            ready_bucket(ms_of(self.seq)),
            self.seq,
            self.task_id,
            self.epoch,
            self.has_token,
            False,
            self.redriven,
        )


class Taken(Protocol):
    """A hint taken from its queue; settled once the claim it led to has been decided."""

    @property
    def hint(self) -> Hint: ...

    async def done(self) -> None:
        """The claim was decided (won, or the task is someone else's or finished): drop the hint."""

    async def retry(self) -> None:
        """The claim could not be tried (a store outage): put the hint back for another fetch."""


class HintsUnavailable(Exception):
    """This queue's hints cannot be taken or waited for now: the broker is away, or the node that
    holds the queue's hint queue is down (a classic queue lives on one node of a cluster). The
    hints published to it meanwhile are lost: its tasks are found by scanning the store."""


class TaskHints(Protocol):
    async def offer(self, q: QueueKey, hint: Hint) -> None:
        """Best effort: a hint that is lost is found again by reconciliation."""

    def hand_here(self, q: QueueKey, hint: Hint) -> bool:
        """Hand the hint to a fetch of this process that waits for the queue, if one does (True);
        nothing is published. A hint with ``stored`` may be handed before its task's write is
        acknowledged: its fetch claims only once the write is, and it is never published before."""

    async def take(self, q: QueueKey, wait_ms: int) -> Taken | None:
        """A hint of this queue: at once if one is there, else within ``wait_ms`` (0: do not wait);
        None when none came (or the bridge is shutting down). :class:`HintsUnavailable` when the
        queue's hints cannot be used at all."""

    async def discard(self, q: QueueKey) -> int:
        """Drop the hints waiting in this queue (a purge: nearly all name tasks it cancels); how
        many. A task whose hint went with them is found by reconciliation."""

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds``, cut short when the hints close (the bridge stops): True then. A
        waiting fetch that polls the store instead of hints (``HintsUnavailable``) sleeps here
        between its polls, so that a stop answers it now, as it answers those waiting for a hint."""


class NoHints:
    """No hints at all: every fetch scans the ready index (the dispatcher), as before 1.2, and
    nothing is published (a single process, tests). A bridge with ``BRIDGE_HINTS=false`` does not
    use this: it takes none but publishes them for the bridges that do (``AmqpHints.takes``)."""

    async def offer(self, q: QueueKey, hint: Hint) -> None:
        return None

    def hand_here(self, q: QueueKey, hint: Hint) -> bool:
        return False

    async def take(self, q: QueueKey, wait_ms: int) -> Taken | None:
        return None

    async def discard(self, q: QueueKey) -> int:
        return 0

    async def pause(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return False


@dataclass
class _MemoryTaken:
    hint: Hint
    owner: MemoryHints
    q: QueueKey

    async def done(self) -> None:
        return None

    async def retry(self) -> None:
        await self.owner.offer(self.q, self.hint)


class MemoryHints:
    """Hints in process memory, for tests (and a model of the broker's: recovered first, then by
    priority, FIFO within one)."""

    def __init__(self) -> None:
        self._queues: dict[QueueKey, list[deque[Hint]]] = {}
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self.closed = False
        self.lost = 0  # hints dropped on purpose by tests (``drop``)
        self.waiting = 0  # takes waiting for a hint right now

    def _lanes(self, q: QueueKey) -> list[deque[Hint]]:
        """Highest first: recovered, then fresh priorities from the highest down."""
        return self._queues.setdefault(q, [deque() for _ in range(PRIORITY_MAX + 2)])

    def drop(self, q: QueueKey) -> int:
        """Lose every hint of a queue (a broker restart): reconciliation must find the tasks."""
        lanes = self._lanes(q)
        n = sum(len(lane) for lane in lanes)
        for lane in lanes:
            lane.clear()
        self.lost += n
        return n

    async def discard(self, q: QueueKey) -> int:
        lanes = self._lanes(q)
        n = sum(len(lane) for lane in lanes)
        for lane in lanes:
            lane.clear()
        return n

    def hand_here(self, q: QueueKey, hint: Hint) -> bool:
        return False  # a model of the broker's queue: every hint goes through it

    async def offer(self, q: QueueKey, hint: Hint) -> None:
        lanes = self._lanes(q)
        lanes[0 if hint.recovered else 1 + PRIORITY_MAX - hint.priority].append(hint)
        self._changed.set()
        self._changed = asyncio.Event()

    async def take(self, q: QueueKey, wait_ms: int) -> Taken | None:
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_ms / 1000
        while not self.closed:
            for lane in self._lanes(q):
                if lane:
                    return _MemoryTaken(lane.popleft(), self, q)
            left = until - loop.time()
            if left <= 0:
                return None
            self.waiting += 1
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                return None
            finally:
                self.waiting -= 1
        return None

    async def pause(self, seconds: float) -> bool:
        return await paused_unless_closed(seconds, self._closing)

    def close(self) -> None:
        self.closed = True
        self._closing.set()
        self._changed.set()


async def paused_unless_closed(seconds: float, closing: asyncio.Event) -> bool:
    """``TaskHints.pause`` on an event set at close: True if it was (now or meanwhile)."""
    if not closing.is_set():
        with suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), timeout=seconds)
    return closing.is_set()


__all__ = ["Hint", "MemoryHints", "NoHints", "Taken", "TaskHints", "paused_unless_closed"]
