"""Results back to the engine: open a completion's sealed result and its task's token, publish, mark done."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bridge.crypto import Sealed, TamperedCiphertext
from bridge.domain import jsonvalue
from bridge.domain.context import QueueContext
from bridge.domain.errors import Unavailable
from bridge.domain.records import Lease, OutboxEntry
from bridge.domain.sealing import open_outcome, open_token, split_outcome
from bridge.domain.timeline import OUTBOX_BUCKET_MS, ms_of
from bridge.errors import ErrorCode

if TYPE_CHECKING:
    from bridge.domain.store import TaskStore

log = logging.getLogger("bridge.queue")

TAMPERED = "the task's stored result failed authentication"


@dataclass(frozen=True, slots=True)
class ResultMessage:
    owner: str
    service: str
    task_id: str
    completion_id: str
    token_json: bytes  # the token as added, JSON
    kind: str  # "result" or "error"
    value_json: bytes  # the result or error as acked, JSON
    traceparent: str | None
    # When the completing ack (or the park) was decided, from the stored completion: the same in
    # every re-publication. None when the stored data does not say (see ``completed_at_ms``).
    completed_at_ms: int | None = None


def completed_at_ms(completion_id: uuid.UUID) -> int | None:
    """The time a completion was decided, if its id carries it: a time-based (version 1) id minted
    at that moment; None for a random (version 4) one, which says nothing about time."""
    return ms_of(completion_id) if completion_id.version == 1 else None


def names_entry(lease: Lease | None, entry: OutboxEntry) -> bool:
    """The lease names this outbox entry's decision (its completion, or its park: the engine's
    delivery_limit error): the entry's result is owed to the engine. Otherwise the decision
    never applied (or the task expired) and there is nothing to send.

    Decided by the id alone, whatever the state: a decision's id is written only by the
    compare-and-set that decides it, and a redrive (back to ``leased``) keeps the park's. Asked
    for ``done`` or ``parked`` too, a park redriven before its result went out was marked published
    unsent, and the engine never heard of it. A park's id is also kept in ``park_id``, which a
    discard or a later completion does not overwrite: by ``completion_id`` alone, a park discarded
    (or redriven and acked) before its result went out was taken for one that never applied. And
    in ``park_ids`` with every other park of the task: ``park_id`` names the last park only, so a
    park redriven and parked again before its result went out was taken for one that never
    applied. ``park_id`` is still asked for leases parked by bridges that write it alone."""
    if lease is None:
        return False
    return entry.completion_id in (lease.completion_id, lease.park_id) or entry.completion_id in lease.park_ids


# How long after its result was written a decision (a completion, a park) may still land on the
# lease: its compare-and-set can be on its way that long after its bridge gave up on it (a stalled
# coordinator, a link retransmitting; the driver closes a connection that read nothing for
# BRIDGE_CASSANDRA_IDLE_TIMEOUT, 30 s, at most 2 minutes (cassandra-driver: up to the interval
# more), and a coordinator drops client requests queued past its own timeout).
DECISION_IN_FLIGHT_MS = 300_000


def may_still_land(lease: Lease | None, entry: OutboxEntry, now_ms: int) -> bool:
    """The lease does not name the entry's decision, but may still take it: the task is leased
    (the decision's compare-and-set asks for that) and the decision may still be on its way.
    Voided now, a completion that then landed (its bridge answered ``unavailable``, and the worker
    gave up or was answered ``true`` by its retry) left the engine without its result for good.
    The lease's epoch is not compared: the entry does not carry it, and a lease claimed again
    after the entry only keeps it owed until the horizon (a few reads, at the relay's backoff)."""
    if lease is None or not lease.is_leased:
        return False
    written = completed_at_ms(entry.completion_id)
    if written is None:  # a random id (older bridges): the end of its bucket, the latest it could be
        written = (entry.bucket + 1) * OUTBOX_BUCKET_MS
    return now_ms - written < DECISION_IN_FLIGHT_MS


async def _keep_token(store: TaskStore, entry: OutboxEntry, token: Sealed, traceparent: str | None) -> None:
    try:
        await store.keep_token(entry, token, traceparent)
    except Exception as exc:  # the publish's own failure is the one to report; the next one tries again
        log.warning("token of task %s not copied beside its owed result: %s", entry.task_id, type(exc).__name__)


async def decided_by_itself(ctx: QueueContext, entry: OutboxEntry) -> bool:
    """A compare-and-set written ahead as ``entry`` and refused may have been refused by its own
    first copy (sent twice: a driver re-sending it after its connection died); the lease says."""
    return names_entry(await ctx.store.lease(entry.queue, entry.task_id, serial=False), entry)


class ResultSink(Protocol):
    async def publish_result(self, message: ResultMessage) -> None:
        """Publish durably (persistent + publisher confirm); raise if not confirmed."""


# Results published at once, beside the requests that decided them, at most: past it, a result
# stays owed and the relay publishes it (after ``BRIDGE_RESULT_REPUBLISH_AFTER``). A broker that
# blocks publishing (a memory or disk alarm) confirms nothing, and every ack meanwhile (the HTTP
# gateway's are not bounded by a prefetch window) held a task and its decrypted result for as
# long as the alarm lasted.
MAX_PUBLISHING = 1_000

# A result the broker confirmed whose mark Cassandra did not take (this bridge cut off from it for
# a moment) is marked again after these pauses (doubling), until the relay's sweep would re-publish
# it: given up at once, a blip of a second on one bridge sent the engine every result that bridge
# had just published a second time (the fault drill "a bridge cut off from Cassandra"). Only on
# that rare path: one write per pause and result.
MARK_RETRY_FIRST_S = 0.2
MARK_RETRY_MAX_S = 2.0


class PublishedUnmarked(Exception):
    """The broker confirmed the result, Cassandra did not take its outbox mark: published, though
    the outbox still says owed. The relay's next try of it only marks it (``ResultRelay.mark``)."""


class ResultRelay:
    def __init__(self, ctx: QueueContext, sink: ResultSink | None, max_publishing: int = MAX_PUBLISHING) -> None:
        self.ctx = ctx
        self.sink = sink
        self.max_publishing = max_publishing
        self.publishing = 0  # results being published right now (for the results_pending gauge)
        # How long after its bucket ends the relay's sweep re-publishes a result still unmarked (the
        # scheduler sets it from BRIDGE_RESULT_REPUBLISH_AFTER): a mark is tried again until then.
        self.republish_after_ms = 10_000

    async def publish_soon(self, entry: OutboxEntry) -> None:
        """The publish beside the request that decided the result; with ``max_publishing``
        results on their way already, left owed for the relay's sweep instead."""
        if self.publishing >= self.max_publishing:
            self.ctx.metrics.inc("results_left_to_relay")
            return
        await self.publish(entry, keep_marking=True)

    async def publish(self, entry: OutboxEntry, *, keep_marking: bool = False) -> None:
        """Publish one completion's result to the engine, then mark the outbox entry done. Raises
        :class:`PublishedUnmarked` when the mark failed (``keep_marking``: tried again first, until
        the relay's sweep would read the entry's bucket; the sweep itself tries once, and its next
        try only marks)."""
        if self.sink is None:
            return
        self.publishing += 1
        try:
            await self._publish(self.sink, entry, keep_marking)
        finally:
            self.publishing -= 1

    async def mark(self, entry: OutboxEntry) -> None:
        """Mark a result published whose mark failed after its publish (:class:`PublishedUnmarked`)."""
        await self.ctx.store.mark_published(entry)

    async def _mark_published(self, entry: OutboxEntry, keep_marking: bool) -> None:
        # The sweep reads a bucket once its end is ``republish_after`` old (``RecoveryScheduler``).
        give_up_ms = (entry.bucket + 1) * OUTBOX_BUCKET_MS + self.republish_after_ms if keep_marking else 0
        pause = MARK_RETRY_FIRST_S
        while True:
            try:
                await self.ctx.store.mark_published(entry)
                return
            except Unavailable as exc:
                # Not past a stop either: its pauses end at once then, and the relay's sweep (of
                # another bridge, soon) re-publishes what is left.
                if self.ctx.background.stopping or self.ctx.clock.now_ms() + pause * 1000 > give_up_ms:
                    raise PublishedUnmarked(f"result of task {entry.task_id} published, not marked: {exc}") from exc
            await self.ctx.background.pause(pause)
            pause = min(pause * 2, MARK_RETRY_MAX_S)

    async def _publish(self, sink: ResultSink, entry: OutboxEntry, keep_marking: bool) -> None:
        store, q = self.ctx.store, entry.queue
        token, traceparent, copied = entry.token, entry.traceparent, entry.token is not None
        if token is None:
            payload = await store.payload(q, entry.task_id)
            if payload is None:
                # The task's row (its token) ended before the result went out and no copy was kept
                # (a bridge before RESULT_OWED_MS, or no publish failed before the end): said, not
                # silent. A task without a token (None below) owes nothing. Said and counted once
                # marked: before, a mark that failed counted it again at every retry of the relay.
                await store.mark_published(entry)
                log.error("result of task %s not published: its task ended, and its token with it", entry.task_id)
                self.ctx.metrics.inc("results_dropped", reason="expired")
                return
            token, traceparent = payload.token, payload.traceparent
        if token is None:
            await store.mark_published(entry)
            return
        try:
            token_key = await self.ctx.keys.by_id(q.owner, token.key_id)
            result_key_id = entry.result.key_id
            result_key = (
                token_key if result_key_id == token.key_id else await self.ctx.keys.by_id(q.owner, result_key_id)
            )
        except Exception:
            if not copied:
                # Owed while its key is missing or its key server away: the token is kept too, as
                # for a failed publish (it is sealed, no key is needed to copy it). Not kept, a
                # result acked late in its task's life was dropped as expired once the task ended,
                # though the key came back within the day a result is owed beyond it.
                await _keep_token(store, entry, token, traceparent)
            raise
        try:
            token_json = open_token(token_key, q, entry.task_id, token, traceparent)
        except TamperedCiphertext:
            # Nothing can go to the engine without its token.
            log.error("token of task %s failed authentication: its result not published", entry.task_id)
            await store.mark_published(entry)
            self.ctx.metrics.inc("results_dropped", reason="integrity")
            return
        try:
            outcome_json = open_outcome(result_key, q, entry.task_id, entry.result)
        except TamperedCiphertext:
            # The engine is told that much: dropped, its workflow waited for ever for this task.
            log.error("result of task %s failed authentication: integrity_error sent instead", entry.task_id)
            outcome_json = jsonvalue.dumps({"error": {"code": ErrorCode.INTEGRITY_ERROR.value, "message": TAMPERED}})
        kind, value_json = split_outcome(outcome_json)
        tid, cid = str(entry.task_id), str(entry.completion_id)
        done_ms = completed_at_ms(entry.completion_id)
        message = ResultMessage(q.owner, q.service, tid, cid, token_json, kind, value_json, traceparent, done_ms)
        try:
            await sink.publish_result(message)
        except Exception:
            if not copied:
                # Owed for longer than the send: the token is kept beside the result, which may be
                # owed past the task's end (one write per result, on this rare path only).
                await _keep_token(store, entry, token, traceparent)
            raise
        self.ctx.metrics.inc("results_published")  # published, whatever its mark does
        await self._mark_published(entry, keep_marking)
