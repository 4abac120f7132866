"""The work queue: add, fetch and ack with at-least-once delivery across bridge instances.

``WorkQueue`` is the domain's face to the transport; the rules live in small modules:
``fetching`` (claims and leases), ``acking`` (completions), ``relay`` (results to the engine),
``scheduler`` (recovery of expired leases), all on the store port (``store.TaskStore``). Each
invariant is argued in docs/storage.md and tested against both the real Cassandra and the
in-memory store (tests/behaviour).
"""

from __future__ import annotations

import logging
import uuid

from bridge.crypto import KeyProvider
from bridge.domain.acking import Acker
from bridge.domain.clock import Clock
from bridge.domain.context import AlwaysGrant, Background, LeaseGate, Limits, Metrics, NoMetrics, QueueContext
from bridge.domain.dispatch import Dispatcher
from bridge.domain.errors import Unavailable
from bridge.domain.fetching import Fetcher
from bridge.domain.hints import Hint, NoHints, TaskHints, carried
from bridge.domain.models import AckRequest, AddCommand, Delivery, FetchRequest
from bridge.domain.reconcile import Reconciliation
from bridge.domain.records import LANE_FRESH, OutboxEntry, QueueKey
from bridge.domain.relay import ResultMessage, ResultRelay, ResultSink
from bridge.domain.sealing import OwnerKeys, encode, seal_task
from bridge.domain.store import TaskStore
from bridge.domain.timeline import ms_of, new_task_id

log = logging.getLogger("bridge.queue")

# A freshly recorded message_id whose task is not visible yet is assumed to be mid-write by
# another consumer; only after this long is it treated as a crashed first attempt and replaced.
IDEMPOTENCY_SETTLE_MS = 30_000


class WorkQueue:
    def __init__(
        self,
        store: TaskStore,
        keys: KeyProvider,
        clock: Clock,
        *,
        limits: Limits,
        settle_ms: int,
        results: ResultSink | None = None,
        metrics: Metrics | None = None,
        may_grant_leases: LeaseGate | None = None,
        max_lanes: int = 10_000,
        hints: TaskHints | None = None,
        reconcile: Reconciliation | None = None,
    ) -> None:
        self.ctx = QueueContext(
            store=store,
            keys=OwnerKeys(keys),
            clock=clock,
            limits=limits,
            metrics=metrics or NoMetrics(),
            gate=may_grant_leases or AlwaysGrant(),
            background=Background(),
        )
        self.dispatcher = Dispatcher(store, clock.now_ms, settle_ms, max_lanes)
        self.relay = ResultRelay(self.ctx, results)
        # Without hints every fetch scans the ready index (as before 1.2).
        self.hints: TaskHints = hints or NoHints()
        reconcile = reconcile or Reconciliation.scan_always()
        self._fetcher = Fetcher(self.ctx, self.dispatcher, self.hints, reconcile)
        self._acker = Acker(self.ctx, self.relay)

    # -- what the scheduler and the process use ------------------------------------------------------
    @property
    def store(self) -> TaskStore:
        return self.ctx.store

    @property
    def clock(self) -> Clock:
        return self.ctx.clock

    @property
    def metrics(self) -> Metrics:
        return self.ctx.metrics

    @property
    def skew_margin_ms(self) -> int:
        return self.ctx.limits.skew_margin_ms

    @property
    def results_in_flight(self) -> int:
        return self.relay.publishing

    def completed_here(self, task_id: uuid.UUID, epoch: int) -> bool:
        """This instance completed the task at this epoch lately (a hint: the lease decides)."""
        return self._acker.completed_here(task_id, epoch)

    async def announce(self, q: QueueKey, hint: Hint) -> None:
        """A task may be claimable (re-exposed by recovery): tell the fetches of its queue."""
        await self.hints.offer(q, hint)

    async def publish(self, entry: OutboxEntry) -> None:
        await self.relay.publish(entry)

    async def drain_background(self, timeout: float) -> None:
        await self.ctx.background.drain(timeout)

    # -- the three requests -----------------------------------------------------------------------
    async def add(self, owner: str, cmd: AddCommand, *, message_id: str | None, traceparent: str | None) -> str:
        ctx = self.ctx
        q = QueueKey(owner, cmd.service_id)
        limit = ctx.limits.max_value_bytes
        value_json = encode(cmd.value, "the value", limit)
        token_json = None if cmd.token is None else encode(cmd.token, "the token", limit)
        key = await ctx.keys.current(owner)
        now = ctx.clock.now_ms()
        task_id = new_task_id(now)
        if message_id:
            existing = await self._dedupe(q, message_id, task_id, now)
            if existing is not None:
                return str(existing)
        payload = seal_task(key, q, task_id, value_json, token_json, traceparent, now)
        await ctx.store.store_task(q, task_id, payload)
        # After the write: a hint never names a task that is not stored yet.
        await self.hints.offer(q, Hint(task_id, LANE_FRESH, task_id, None, token_json is not None, carried(payload)))
        ctx.metrics.inc("tasks_added")
        log.debug("task added", extra={"task_id": str(task_id)})
        return str(task_id)

    async def _dedupe(self, q: QueueKey, message_id: str, task_id: uuid.UUID, now: int) -> uuid.UUID | None:
        """The task an earlier copy of this add stored, or None if this copy is to store it."""
        store = self.ctx.store
        existing = await store.record_message_id(q, message_id, task_id)
        if existing is None:
            return None
        if await store.task_exists(q, existing):
            # A redelivery or a retried publish: same task. Index it again in case the first
            # attempt died between its two writes.
            await store.reindex_task(q, existing)
            self.ctx.metrics.inc("adds_deduplicated")
            return existing
        if now - ms_of(existing) < IDEMPOTENCY_SETTLE_MS:
            raise Unavailable("an add with this message_id is still being stored; retry later")
        if not await store.replace_message_id(q, message_id, existing, task_id):
            raise Unavailable("concurrent add with the same message_id; retry later")
        return None

    async def fetch(self, owner: str, req: FetchRequest) -> Delivery | None:
        return await self._fetcher.fetch(owner, req)

    async def ack(self, owner: str, req: AckRequest, *, sent_before_ms: int | None = None) -> bool:
        return await self._acker.ack(owner, req, sent_before_ms=sent_before_ms)


__all__ = ["Limits", "Metrics", "ResultMessage", "ResultSink", "WorkQueue"]
