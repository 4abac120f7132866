"""ack: complete exactly the task a worker was handed, once, and owe its result to the engine.

A completion's result is written to the outbox *before* the completing compare-and-set, and
published after it; the result relay re-publishes what a crash left pending.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict

from bridge.domain.clock import next_stamp
from bridge.domain.context import QueueContext
from bridge.domain.counting import landed_later
from bridge.domain.errors import MaybeApplied
from bridge.domain.models import AckRequest
from bridge.domain.records import CasResult, OutboxEntry, QueueKey, WorkerPointer, WorkerRow
from bridge.domain.relay import ResultRelay, decided_by_itself
from bridge.domain.sealing import encode, seal_outcome
from bridge.domain.timeline import ms_of, outbox_bucket, timeuuid_from_ms

log = logging.getLogger("bridge.queue")

# A hint only (a miss costs the scheduler one lease read at the deadline): 50,000 pairs, about 13 MB,
# cover 1,000 s of a bridge's acks at 50 a second, many times the default 60 s lease (200,000 held
# 52 MB in every bridge of the fleet).
RECENTLY_COMPLETED_MAX = 50_000
# When a completion's outcome is unknown, its lease is read again after these pauses (seconds).
UNCERTAIN_COMPLETION_LOOKUPS_S = (0.5, 2.0, 8.0)


class Acker:
    def __init__(self, ctx: QueueContext, relay: ResultRelay) -> None:
        self.ctx = ctx
        self.relay = relay
        # (task, epoch) pairs this instance completed lately: the recovery scheduler skips their
        # deadlines without reading the lease. A hint only; bounded, oldest forgotten first.
        self._recently_completed: OrderedDict[tuple[uuid.UUID, int], None] = OrderedDict()

    def completed_here(self, task_id: uuid.UUID, epoch: int) -> bool:
        return (task_id, epoch) in self._recently_completed

    async def ack(self, owner: str, req: AckRequest, *, sent_before_ms: int | None = None) -> bool:
        """Complete a task. With ``taskId`` exactly that task (at that epoch, if given), else the
        task the worker holds, unless the request was sent before that lease was granted
        (``sent_before_ms``: an upper bound of the send time, from the AMQP timestamp)."""
        q = QueueKey(owner, req.service_id)
        await self.ctx.keys.current(owner)  # unknown_owner, as add and fetch answer (cached, mostly)
        outcome_json = encode(req.outcome, "the outcome", self.ctx.limits.max_value_bytes)
        if req.task_id is not None and req.epoch is not None and req.has_token is False:
            done = await self._complete_tokenless(q, req, req.task_id, req.epoch)
            if done is not None:
                return done
        row = await self.ctx.store.worker(q, req.worker_id)
        if req.task_id is not None:
            target = await self._named_target(q, req, row.pointer)
        else:
            target = self._held_target(req, row.pointer, sent_before_ms)
        if target is None:
            return False
        if target.done:
            # The task is complete: a repeated ack (a retry after a lost reply) gets the same
            # answer, and nothing is completed or published twice.
            lease = await self.ctx.store.lease(q, target.task_id, serial=False)
            return lease is not None and lease.completed_by(req.worker_id, target.epoch)
        return await self._complete(q, req, target, row, outcome_json)

    async def _complete_tokenless(self, q: QueueKey, req: AckRequest, task_id: uuid.UUID, epoch: int) -> bool | None:
        """One compare-and-set, nothing read first: the lease itself says the task has no token (no
        result to write ahead). None when the lease does not say so (a task with a token, a lease
        written before 1.3): the general path decides.

        The worker's pointer is left naming the task: a fetch that says it holds nothing (``fresh``)
        never reads it, and one that reads it finds the lease done and moves on."""
        ctx = self.ctx
        res = await self._compare_and_set(q, req, task_id, epoch, ctx.clock.now_ms(), uuid.uuid4(), tokenless=True)
        if res.applied:
            ctx.metrics.inc("acks_named_fast")
            self._completed(q, task_id, epoch, req)
            return True
        cur = res.current
        if cur is not None and cur.held_by(req.worker_id, epoch):
            return None  # it has a token, or its lease does not say: write the result ahead first
        # A retried ack of a completion that already happened is still a success.
        return cur is not None and cur.completed_by(req.worker_id, epoch)

    async def _compare_and_set(
        self,
        q: QueueKey,
        req: AckRequest,
        task_id: uuid.UUID,
        epoch: int,
        now: int,
        completion_id: uuid.UUID,
        *,
        tokenless: bool = False,
    ) -> CasResult:
        """The completing LWT. When Cassandra cannot say whether it applied (the write timed out,
        and so did the read that resolves it), the worker is answered ``unavailable`` and retries;
        its retry then finds the task completed by this very worker and epoch and counts nothing.
        So the outcome is looked up again later, off the request's path, and the completion
        counted (in flight -1, tasks_completed) if this attempt's own completion id is the one
        that landed: a retry that applied instead has its own id and counts itself."""
        store = self.ctx.store
        try:
            return await store.complete(q, task_id, epoch, req.worker_id, now, completion_id, tokenless=tokenless)
        except MaybeApplied:
            resolve = self._count_if_landed(q, req, task_id, epoch, completion_id)
            self.ctx.background.spawn(resolve, "count an uncertain completion")
            raise

    async def _count_if_landed(
        self, q: QueueKey, req: AckRequest, task_id: uuid.UUID, epoch: int, completion_id: uuid.UUID
    ) -> None:
        async def ours() -> bool | None:
            lease = await self.ctx.store.lease(q, task_id, serial=True)
            if lease is None:
                return False  # gone (its TTL): nothing can land on it
            if lease.completion_id == completion_id and lease.completed_by(req.worker_id, epoch):
                return True
            # Still leased to this worker at this epoch: no answer yet, the completion may still be
            # on its way and apply later (read as "did not land", it was never counted).
            return None if lease.held_by(req.worker_id, epoch) else False

        landed = await landed_later(ours, UNCERTAIN_COMPLETION_LOOKUPS_S, self.ctx.background.pause)
        if landed:
            self._completed(q, task_id, epoch, req)
        elif landed is None:
            log.warning("completion of task %s left uncounted: its outcome stayed unknown", task_id)

    def _completed(self, q: QueueKey, task_id: uuid.UUID, epoch: int, req: AckRequest) -> None:
        self.ctx.count(q, ms_of(task_id), in_flight=-1)
        self._recently_completed[(task_id, epoch)] = None
        if len(self._recently_completed) > RECENTLY_COMPLETED_MAX:
            self._recently_completed.popitem(last=False)
        self.ctx.metrics.inc("tasks_completed", outcome="error" if "error" in req.outcome else "result")
        log.debug("task completed", extra={"task_id": str(task_id), "epoch": epoch})

    async def _named_target(self, q: QueueKey, req: AckRequest, held: WorkerPointer | None) -> WorkerPointer | None:
        task_id = req.task_id
        assert task_id is not None
        if held is not None and held.task_id == task_id and req.epoch in (None, held.epoch):
            return held
        # The pointer names another task (the worker moved on, or this is a late copy of an ack):
        # the lease of the named task decides. Never complete the task the pointer names.
        lease = await self.ctx.store.lease(q, task_id, serial=False)
        if lease is None or lease.worker != req.worker_id or req.epoch not in (None, lease.epoch):
            return None
        if lease.is_done:
            return WorkerPointer(task_id, lease.epoch, False, done=True)
        if not lease.is_leased:
            return None
        payload = await self.ctx.store.payload(q, task_id)
        return WorkerPointer(task_id, lease.epoch, payload is not None and payload.token is not None)

    def _held_target(
        self, req: AckRequest, held: WorkerPointer | None, sent_before_ms: int | None
    ) -> WorkerPointer | None:
        self.ctx.metrics.inc("acks_without_task_id")
        if held is None:
            return None
        if req.epoch is not None and req.epoch != held.epoch:
            # The contract: with an epoch, an ack from an earlier lease of the task is false, with
            # or without its taskId (the worker may hold the same task again, at a later epoch).
            self.ctx.metrics.inc("acks_refused", reason="epoch")
            return None
        granted = held.granted_at_ms
        margin = self.ctx.limits.skew_margin_ms
        if not held.done and sent_before_ms is not None and granted is not None and sent_before_ms + margin <= granted:
            # Sent before the worker was handed its current task: a late copy of an earlier ack.
            # ``granted`` is on the clock of the bridge that granted the lease, ``sent_before_ms``
            # on this one's (the gateway's receipt) or the client's (the AMQP timestamp): only a
            # send that came earlier by more than the skew margin is known to be earlier (compared
            # bare, an ack through a bridge behind the granting one was refused, its task done twice).
            self.ctx.metrics.inc("acks_refused", reason="older_than_lease")
            log.warning(
                "ack older than the worker's lease refused", extra={"task_id": str(held.task_id), "epoch": held.epoch}
            )
            return None
        return held

    async def _complete(
        self, q: QueueKey, req: AckRequest, target: WorkerPointer, row: WorkerRow, outcome_json: bytes
    ) -> bool:
        ctx = self.ctx
        now = ctx.clock.now_ms()
        # Time-based: the result's completedAt is read from it, the same in every re-publication.
        completion_id = timeuuid_from_ms(now)
        intent: OutboxEntry | None = None
        if target.has_token:
            key = await ctx.keys.current(q.owner)
            sealed = seal_outcome(key, q, target.task_id, outcome_json)
            # Filed under the bucket it is written in, not the one the ack began in: the key lookup
            # may take up to the key server's timeout, and a write filed behind both of the
            # relay's reads of its bucket was never read (an engine never told, its publish lost).
            bucket = outbox_bucket(ctx.clock.now_ms())
            intent = OutboxEntry(bucket, q, target.task_id, completion_id, sealed, False)
            await ctx.store.insert_outbox(intent)
        res = await self._compare_and_set(q, req, target.task_id, target.epoch, now, completion_id)
        points_here = row.pointer is not None and row.pointer.task_id == target.task_id
        stamp = next_stamp(now, row.stamp)
        # Refused because this worker already completed it: maybe by this very attempt's first copy.
        again = res.current is not None and res.current.completed_by(req.worker_id, target.epoch)
        if not res.applied and again and intent is not None and await decided_by_itself(ctx, intent):
            res = CasResult(applied=True, current=None)
        if not res.applied:
            if intent is not None:
                await ctx.store.mark_published(intent)  # void: this completion did not happen
            # A retried ack of a completion that already happened is still a success.
            if points_here and again:
                await ctx.store.finish_worker(q, req.worker_id, target.task_id, stamp)
            elif points_here:
                # Just after the pointer read: a later pointer write (another fetch) survives, also
                # one that read the same row (a claim's write-ahead is stamped 2 past what it read:
                # ``pointer_stamp``; at + 1 it tied with this clear, and the tombstone won the tie).
                await ctx.store.clear_worker(q, req.worker_id, row.stamp + 1 if row.stamp is not None else stamp)
            return again
        if points_here:
            # Not awaited: until it lands, a retried ack still finds the completion through the LWT.
            ctx.background.spawn(ctx.store.finish_worker(q, req.worker_id, target.task_id, stamp), "mark worker done")
        self._completed(q, target.task_id, target.epoch, req)
        if intent is not None:
            ctx.background.spawn(self.relay.publish_soon(intent), "publish result")
        return True
