"""What the parts of the queue (adding, fetching, acking, relaying results, recovery) share."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.domain.clock import Clock
from bridge.domain.counting import QueueCounts
from bridge.domain.errors import ClockOff, Unavailable
from bridge.domain.records import QueueKey
from bridge.domain.sealing import OwnerKeys
from bridge.domain.store import TaskStore
from bridge.observability.throttled import ThrottledWarning

log = logging.getLogger("bridge.queue")


class Metrics(Protocol):
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None: ...


class LeaseGate(Protocol):
    """Says whether this bridge may grant leases now (its clock is within the skew limit)."""

    @property
    def ok(self) -> bool: ...

    def describe(self) -> str: ...

    def error_bound_ms(self) -> float | None:
        """How far this bridge's time may be off the reference now (None: not known)."""
        ...


class NoMetrics:
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        return None


class AlwaysGrant:
    ok = True

    def describe(self) -> str:
        return "no clock check"

    def error_bound_ms(self) -> float | None:
        return 0.0


# A clock known off by more than this (or not known at all) files nothing and places nothing: a
# fail's return, a redrive, a purge's judgement of what is due, an add's id (its place in the
# queue). Within it (a Cassandra merely slow for the whole fleet: milliseconds), served: the
# scheduler's second pass over a bucket comes 5 s after it at the least.
CLOCK_OFF_FOR_FILING_MS = 1_000


def require_clock_for_filing(gate: LeaseGate) -> None:
    """Raise ``ClockOff`` (``unavailable``: retry on another bridge) when this bridge's clock is known off by
    more than :data:`CLOCK_OFF_FOR_FILING_MS`, or not known."""
    if gate.ok:
        return
    bound = gate.error_bound_ms()
    if bound is not None and bound <= CLOCK_OFF_FOR_FILING_MS:
        return
    raise ClockOff(f"this bridge's clock is off now: {gate.describe()}; retry on another bridge")


def clock_slack_ms(gate: LeaseGate) -> int:
    """How far this bridge's clock may be off now, as served within :data:`CLOCK_OFF_FOR_FILING_MS`
    (past it, what needs the clock is refused): 0 while the gate is ok."""
    if gate.ok:
        return 0
    bound = gate.error_bound_ms()
    return 0 if bound is None else int(min(bound, CLOCK_OFF_FOR_FILING_MS))


@dataclass(frozen=True, slots=True)
class Limits:
    max_value_bytes: int
    default_ttr_ms: int
    max_ttr_ms: int
    # A lease is taken back only once its deadline plus this margin has passed on the claiming
    # bridge's clock: skew between bridges within the margin cannot make two workers hold a task
    # at once (docs/storage.md, "Clocks").
    skew_margin_ms: int = 0
    # The tasks' lifetime: a payload carried by a hint is not handed out past it (the stored row
    # would have expired with its TTL; the hint may have waited on the broker that long).
    task_ttl_ms: int | None = None
    # The worker lifecycle (1.4): delivery limits (a task's own ``maxDeliveries`` wins), and the
    # backoff of a ``fail`` that names none: full jitter, uniform in [0, min(cap, base * 2^(n-1))].
    max_deliveries: int = 10
    # {"service": n}, {"owner/service": n}, {"owner": {"service": n}} (see ``delivery_limit``)
    service_max_deliveries: Mapping[str, int | Mapping[str, int]] = field(default_factory=dict)
    retry_base_ms: int = 1_000
    retry_cap_ms: int = 300_000
    redrive_rate: float = 50.0
    # How long claims of a task in a row must have found its key missing before the next such claim
    # parks it (``key_missing``) instead of letting it go again; 0: never (it waits until its TTL).
    key_missing_park_after_ms: int = 7_200_000
    # How long one write to the store may run (the Cassandra request timeout): a redelivered add
    # waits that long for its first delivery's unguarded write (``WorkQueue.first_copy_settled``).
    store_timeout_ms: int = 5_000

    def delivery_limit(self, q: QueueKey, own: int | None) -> int:
        if own is not None:
            return own
        per = self.service_max_deliveries
        # The owner's own map names its service exactly: "reports/daily" is both owner reports's
        # service daily and the service of that name of any owner, and no flat key could tell
        # them apart. Then the flat keys, owner/service first. A flat key that is an owner's map
        # (a service named as an owner) is not a limit.
        owners = per.get(q.owner)
        if isinstance(owners, Mapping) and q.service in owners:
            return owners[q.service]
        for key in (f"{q.owner}/{q.service}", q.service):
            limit = per.get(key)
            if isinstance(limit, int):
                return limit
        return self.max_deliveries

    def backoff_ms(self, deliveries: int) -> int:
        ceiling = min(self.retry_cap_ms, self.retry_base_ms * 2 ** min(max(deliveries - 1, 0), 30))
        return random.randint(0, ceiling)  # nosec B311: spreading retries, not secrecy


class Background:
    """Best-effort work started from a request and not awaited by it (correctness never depends on it)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        # Set as the bridge's stop grace ends with requests still running: those acknowledged
        # early (a redrive, a purge, a discard: the broker delivers them to nobody again) stop at
        # their next task's boundary, never inside a write, and are answered ``unavailable``.
        self._requests_cut = asyncio.Event()
        # One per kind of work (a few fixed names): a cause that lasts (the broker away, every
        # ack's immediate publish failing) wrote a line per request.
        self._warnings: dict[str, ThrottledWarning] = {}

    def spawn(self, coro: Awaitable[Any], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:
                warn = self._warnings.get(what)
                if warn is None:
                    warn = self._warnings[what] = ThrottledWarning(log)
                warn.warning("background %s failed: %s", what, type(exc).__name__)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def cut_requests(self) -> None:
        """The stop's grace ended: long requests end at their next boundary (:meth:`check_cut`)."""
        self._requests_cut.set()

    @property
    def requests_cut(self) -> bool:
        return self._requests_cut.is_set()

    def check_cut(self, what: str, done: int) -> None:
        """Raise ``unavailable`` if the stop cut long requests: ``what`` ends here, between two
        tasks (``done`` of them done), and its caller sends it again (each is idempotent). Run on
        instead, it went on until the store's close failed it mid-way, its reply lost with the
        connection and its caller waiting out its whole timeout (found by review, 2026-12-08)."""
        if self._requests_cut.is_set():
            raise Unavailable(f"the bridge is stopping: the {what} ended after {done} task(s); send it again")

    async def pause_unless_cut(self, seconds: float) -> None:
        """Sleep ``seconds`` (a request's pacing), less once the stop cuts long requests."""
        await _sleep_unless(self._requests_cut, seconds)

    async def pause(self, seconds: float) -> None:
        """Sleep between the steps of background work, cut short once the bridge stops: the
        lookups of an outcome left unknown wait 2, 8 and 30 s for a write held up on its way, and
        a stopping bridge waited its whole shutdown grace (10 s) on one that never landed. Stopping,
        they look at once instead, and what has not landed by then stays uncounted (logged)."""
        if self._stopping.is_set():
            return
        await _sleep_unless(self._stopping, seconds)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the work started so far to finish."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def stop(self, timeout: float) -> None:
        """The bridge stops: let the work finish with its pauses cut short, for at most
        ``timeout``, and cancel what is left."""
        self._stopping.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
        if pending:
            log.warning("%d background tasks still running after %.1fs: cancelled", len(pending), timeout)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)

    def __len__(self) -> int:
        return len(self._tasks)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, less once ``event`` is set. Not ``asyncio.wait_for``: on Python 3.11 it
    swallows a cancel that comes as the event is set."""
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiting}, timeout=seconds)
    finally:
        waiting.cancel()


@dataclass(slots=True)
class QueueContext:
    store: TaskStore
    keys: OwnerKeys
    clock: Clock
    limits: Limits
    metrics: Metrics = field(default_factory=NoMetrics)
    gate: LeaseGate = field(default_factory=AlwaysGrant)
    background: Background = field(default_factory=Background)
    counts: QueueCounts | None = None  # stats counts (1.4); None: not kept (some tests)

    def count(self, q: QueueKey, task_ms: int, *, ready: int = 0, in_flight: int = 0) -> None:
        if self.counts is not None:
            self.counts.move(q, task_ms, ready=ready, in_flight=in_flight)

    def count_delayed(self, q: QueueKey, due_ms: int, delta: int) -> None:
        if self.counts is not None:
            self.counts.delay(q, due_ms, delta)
