"""A bridge's domain (queue, scheduler, clock) on one store, driven step by step: for the behaviour
suite (tests/behaviour, both stores) and the state-machine test (tests/unit, memory store)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bridge.crypto import KeyProvider
from bridge.domain.clock import ManualClock
from bridge.domain.hints import MemoryHints
from bridge.domain.models import AckRequest, AddCommand, Delivery, FetchRequest, parse
from bridge.domain.queue import Limits, ResultMessage, WorkQueue
from bridge.domain.reconcile import Reconciliation
from bridge.domain.scheduler import RecoveryScheduler
from bridge.domain.store import TaskStore

OWNER = "worker-a"
MARGIN_MS = 1_000
TTL_S = 7 * 24 * 3600


GRACE_MS = 3_000


class CountingMetrics:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self.counts[(name, tuple(sorted(labels.items())))] += int(amount)

    def total(self, name: str, **labels: str) -> int:
        want = set(labels.items())
        return sum(n for (k, lab), n in self.counts.items() if k == name and want <= set(lab))


@dataclass
class Sink:
    """Where results go: a list, or failures while ``down`` (a broker outage)."""

    messages: list[ResultMessage] = field(default_factory=list)
    down: bool = False

    async def publish_result(self, message: ResultMessage) -> None:
        if self.down:
            raise ConnectionError("results exchange unreachable")
        self.messages.append(message)


class Harness:
    """A bridge's domain on one store: queue, scheduler and clock, driven step by step."""

    def __init__(
        self, store: TaskStore, keys: KeyProvider, clock: ManualClock, prefix: str, hints: MemoryHints | None = None
    ) -> None:
        self.hints = hints  # shared by every instance, as the broker is
        self.reconciles: list[Reconciliation] = []
        self.metrics = CountingMetrics()
        self.store = store
        self.keys = keys
        self.clock = clock
        self.prefix = prefix
        self.service = f"svc-{uuid.uuid4().hex[:10]}"
        self.sink = Sink()
        self.schedulers: list[RecoveryScheduler] = []
        self.queue, self.scheduler = self.instance(clock)

    def store_requests(self) -> int:
        """What the store was asked so far: calls on the memory store, statements sent on
        Cassandra (both sessions count them by name). A test that counts the store's work counts
        it on both stores: read as ``getattr(store, "operations", 0)`` the Cassandra store was 0
        before and after, and the rule it checked held by construction there."""
        operations = getattr(self.store, "operations", None)
        if operations is not None:
            return int(operations)
        return sum(self.store.db.statements.values())  # type: ignore[attr-defined]

    def instance(self, clock: ManualClock) -> tuple[WorkQueue, RecoveryScheduler]:
        """Another bridge process on the same store (its own clock, dispatcher and caches)."""
        limits = Limits(
            max_value_bytes=64 * 1024,
            default_ttr_ms=60_000,
            max_ttr_ms=3_600_000,
            skew_margin_ms=MARGIN_MS,
            task_ttl_ms=TTL_S * 1000,
        )
        reconcile = Reconciliation(grace_ms=GRACE_MS, interval_ms=5_000) if self.hints is not None else None
        if reconcile is not None:
            self.reconciles.append(reconcile)  # one per bridge, as in a fleet
        queue = WorkQueue(
            self.store,
            self.keys,
            clock,
            limits=limits,
            settle_ms=MARGIN_MS,
            results=self.sink,
            metrics=self.metrics,
            hints=self.hints,
            reconcile=reconcile,
        )
        scheduler = RecoveryScheduler(
            queue, interval_s=0.1, late_ms=5_000, republish_after_ms=5_000, progress_prefix=self.prefix
        )
        self.schedulers.append(scheduler)
        return queue, scheduler

    async def close(self) -> None:
        """Cancel the schedulers' timers (a bridge does at shutdown), and let them end."""
        timers = [t for s in self.schedulers for t in s._timers]
        for s in self.schedulers:
            s.cancel_timers()
        await asyncio.gather(*timers, return_exceptions=True)

    async def add(self, value: Any, *, token: Any = None, message_id: str | None = None, tp: str | None = None) -> str:
        body: dict[str, Any] = {"serviceId": self.service, "value": value}
        if token is not None:
            body["token"] = token
        task_id = await self.queue.add(OWNER, parse(AddCommand, body), message_id=message_id, traceparent=tp)
        # An add takes a millisecond of clock time: ids within one millisecond have no FIFO order.
        self.clock.advance(1)
        return task_id

    async def fetch(
        self,
        worker: str,
        ttr_ms: int | None = None,
        queue: WorkQueue | None = None,
        wait_ms: int = 0,
        *,
        fresh: bool = False,
    ) -> Delivery | None:
        body: dict[str, Any] = {"serviceId": self.service, "workerId": worker, "waitMs": wait_ms, "fresh": fresh}
        if ttr_ms is not None:
            body["timeToRecover"] = ttr_ms
        return await (queue or self.queue).fetch(OWNER, parse(FetchRequest, body))

    async def ack(
        self,
        worker: str,
        delivery: Delivery | None = None,
        *,
        result: Any = "ok",
        error: Any = None,
        queue: WorkQueue | None = None,
        has_token: bool | None = None,
    ) -> bool:
        body: dict[str, Any] = {"serviceId": self.service, "workerId": worker}
        if has_token is not None:
            body["hasToken"] = has_token
        if error is not None:
            body["error"] = error
        else:
            body["result"] = result
        if delivery is not None:
            body["taskId"] = delivery.task_id
            body["epoch"] = delivery.epoch
        return await (queue or self.queue).ack(OWNER, parse(AckRequest, body))

    async def advance(self, ms: int, *, ticks: int = 1) -> None:
        """Let time pass and let the recovery scheduler see it (as its loop would)."""
        self.clock.advance(ms)
        for _ in range(ticks):
            await self.scheduler.tick()
        await self.queue.drain_background(5.0)

    async def fetch_until(self, worker: str, *, step_ms: int = 100, limit_ms: int = 10_000, **kw: Any) -> Delivery:
        """Fetch, advancing the clock by ``step_ms`` between tries: how long it took is ``clock`` time."""
        waited = 0
        while True:
            got = await self.fetch(worker, **kw)
            if got is not None:
                return got
            if waited >= limit_ms:
                raise AssertionError(f"{worker} got nothing within {limit_ms} ms of clock time")
            await self.advance(step_ms)
            waited += step_ms
