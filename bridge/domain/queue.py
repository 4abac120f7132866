"""The work queue: add, fetch and ack with at-least-once delivery across bridge instances.

Invariants (each is argued in docs/storage.md and tested against a real Cassandra):
- A task is claimed only by a lightweight transaction on its own ``leases`` partition; every
  claim increments ``epoch`` (the fencing token), and ack/extend are conditional on it, so a worker
  that lost its lease can never complete or extend the task.
- The lease deadline is written to ``expiries`` *before* the claim, so a crash between the claim
  and the reply never strands a task: the recovery scheduler will find it.
- A completion's result is written to ``outbox`` *before* the completing transaction, and
  published after it; the scheduler re-publishes what a crash left pending.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.crypto import (
    KeyProvider,
    KeyUnavailable,
    OwnerKey,
    Sealed,
    TamperedCiphertext,
    UnknownKey,
    open_sealed,
    seal,
)
from bridge.crypto import UnknownOwner as NoKeysForOwner
from bridge.domain import jsonvalue
from bridge.domain.clock import Clock, next_stamp
from bridge.domain.dispatch import Dispatcher
from bridge.domain.errors import (
    BadRequest,
    IntegrityError,
    KeyMissing,
    PayloadTooLarge,
    Unavailable,
    UnknownOwner,
)
from bridge.domain.models import AckRequest, AddCommand, Delivery, FetchRequest
from bridge.storage.errors import StorageUnavailable, UnknownOutcome
from bridge.storage.repository import (
    ExpiryEntry,
    OutboxEntry,
    Payload,
    QueueKey,
    ReadyEntry,
    TaskRepository,
    WorkerPointer,
    WorkerRow,
)
from bridge.storage.schema import EXPIRY_BUCKET_MS, LANE_FRESH, LANE_RECOVERED
from bridge.storage.timeuuid import (
    bucket_of_task,
    expiry_bucket,
    ms_of,
    new_task_id,
    outbox_bucket,
    to_datetime,
    to_ms,
)

log = logging.getLogger("bridge.queue")

MAX_CLAIM_ATTEMPTS = 8
# A freshly recorded message_id whose task row is not visible yet is assumed to be mid-write by
# another consumer; only after this long is it treated as a crashed first attempt and replaced.
IDEMPOTENCY_SETTLE_MS = 30_000
RECENTLY_COMPLETED_MAX = 200_000


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


class ResultSink(Protocol):
    async def publish_result(self, message: ResultMessage) -> None:
        """Publish durably (persistent + publisher confirm); raise if not confirmed."""


class Metrics(Protocol):
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None: ...


class LeaseGate(Protocol):
    """Says whether this bridge may grant leases now (its clock is within the skew limit)."""

    @property
    def ok(self) -> bool: ...

    def describe(self) -> str: ...


class _NoMetrics:
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        return None


def _encode(value: Any, what: str, limit: int) -> bytes:
    """Serialize a caller's value once, exactly, within the size limit (the caller's errors are
    ``bad_request`` / ``payload_too_large``, never ``internal``)."""
    try:
        data = jsonvalue.dumps(value)
    except jsonvalue.JsonError as exc:
        raise BadRequest(f"{what} {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes as JSON; the limit is {limit}")
    return data


def _value_binding(token: object | None, traceparent: str) -> tuple[str, str]:
    return ("token" if token is not None else "no-token", traceparent)


def _open_bound(
    key: OwnerKey, sealed: Sealed, *, service: str, task_id: str, field: str, bind: tuple[str, ...]
) -> bytes:
    """Open a sealed field bound to its row's clear facts; tasks sealed before 1.1 bound nothing.

    Falling back to the unbound form cannot be abused: a ciphertext sealed with a binding never
    opens without it, so only a task sealed by an older bridge (gone by its TTL) opens unbound."""
    try:
        return open_sealed(key, sealed, service=service, task_id=task_id, field=field, bind=bind)
    except TamperedCiphertext:
        return open_sealed(key, sealed, service=service, task_id=task_id, field=field)


def _split_outcome(outcome_json: bytes) -> tuple[str, bytes]:
    """``{"result":X}`` / ``{"error":X}`` as written by :func:`_encode` -> (kind, X) without parsing X."""
    for kind in ("result", "error"):
        prefix = b'{"' + kind.encode() + b'":'
        if outcome_json.startswith(prefix) and outcome_json.endswith(b"}"):
            return kind, outcome_json[len(prefix) : -1]
    parsed = jsonvalue.loads(outcome_json)  # written by another encoder: parse it (exactly)
    kind = "error" if "error" in parsed else "result"
    return kind, jsonvalue.dumps(parsed[kind])


class WorkQueue:
    def __init__(
        self,
        repo: TaskRepository,
        keys: KeyProvider,
        clock: Clock,
        *,
        task_ttl_s: int,
        max_value_bytes: int,
        default_ttr_ms: int,
        max_ttr_ms: int,
        settle_ms: int,
        results: ResultSink | None = None,
        metrics: Metrics | None = None,
        skew_margin_ms: int = 0,
        may_grant_leases: LeaseGate | None = None,
        max_lanes: int = 10_000,
    ) -> None:
        self.repo = repo
        self.keys = keys
        self.clock = clock
        self.task_ttl_s = task_ttl_s
        self.max_value_bytes = max_value_bytes
        self.default_ttr_ms = default_ttr_ms
        self.max_ttr_ms = max_ttr_ms
        self.results = results
        self.metrics: Metrics = metrics or _NoMetrics()
        # A lease is taken back only once its deadline plus this margin has passed on the
        # claiming bridge's clock: skew between bridges within the margin cannot make two
        # workers hold a task at once (docs/storage.md, "Clocks").
        self.skew_margin_ms = skew_margin_ms
        self.may_grant_leases = may_grant_leases
        self.dispatcher = Dispatcher(repo, clock.now_ms, settle_ms, task_ttl_s, max_lanes)
        self._registered: set[tuple[QueueKey, int, int]] = set()
        self.publishing = 0  # results being published right now (for the results_pending gauge)
        # (task, epoch) pairs this instance completed lately: the recovery scheduler skips their
        # deadlines without reading the lease. A hint only; bounded, oldest forgotten first.
        self.recently_completed: dict[tuple[uuid.UUID, int], None] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- helpers -----------------------------------------------------------------------------
    def ttl_for(self, task_id: uuid.UUID) -> int:
        """Seconds left in the task's life: every row about a task expires at the same moment."""
        left = self.task_ttl_s - (self.clock.now_ms() - ms_of(task_id)) // 1000
        return int(max(1, left))

    def _spawn(self, coro: Awaitable[Any], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:  # background work is best effort; correctness never depends on it
                log.warning("background %s failed: %s", what, type(exc).__name__)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain_background(self, timeout: float) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    async def _current_key(self, owner: str) -> OwnerKey:
        try:
            return await self.keys.current_key(owner)
        except NoKeysForOwner:
            raise UnknownOwner(f"no encryption key is configured for owner {owner!r}") from None
        except KeyUnavailable as exc:
            raise Unavailable(f"key provider unavailable: {exc}") from None

    async def _key_by_id(self, owner: str, key_id: str) -> OwnerKey:
        try:
            return await self.keys.key_by_id(owner, key_id)
        except (NoKeysForOwner, UnknownKey):
            # An outage (a key server restarting, a key-ring edit that dropped a key still in use),
            # not corruption: the task stays, and is delivered once the key is back.
            raise KeyMissing(
                f"the key {key_id!r} that sealed this task is not available; the task stays queued and is "
                "delivered when the key is back (check the key-ring or key server)"
            ) from None
        except KeyUnavailable as exc:
            raise Unavailable(f"key provider unavailable: {exc}") from None

    async def _register_bucket(self, q: QueueKey, lane: int, bucket: int, ttl: int) -> None:
        key = (q, lane, bucket)
        if key in self._registered:
            return
        await self.repo.register_bucket(q, lane, bucket, ttl + 60)
        if len(self._registered) > 100_000:
            self._registered.clear()
        self._registered.add(key)

    # -- add ---------------------------------------------------------------------------------
    async def add(self, owner: str, cmd: AddCommand, *, message_id: str | None, traceparent: str | None) -> str:
        q = QueueKey(owner, cmd.service_id)
        value_json = _encode(cmd.value, "the value", self.max_value_bytes)
        token_json = None if cmd.token is None else _encode(cmd.token, "the token", self.max_value_bytes)
        key = await self._current_key(owner)
        now = self.clock.now_ms()
        task_id = new_task_id(now)
        ttl = self.task_ttl_s
        try:
            if message_id:
                existing = await self.repo.claim_message_id(q, message_id, task_id, ttl)
                if existing is not None:
                    if await self.repo.task_exists(q, existing):
                        # A redelivery or a retried publish: same task. Re-register its bucket in
                        # case the first attempt died between its two writes.
                        await self.repo.register_bucket(q, LANE_FRESH, bucket_of_task(existing), self.ttl_for(existing))
                        self.metrics.inc("adds_deduplicated")
                        return str(existing)
                    if now - ms_of(existing) < IDEMPOTENCY_SETTLE_MS:
                        raise Unavailable("an add with this message_id is still being stored; retry later")
                    if not await self.repo.replace_message_id(q, message_id, existing, task_id, ttl):
                        raise Unavailable("concurrent add with the same message_id; retry later")
            payload = self._seal_task(key, q, task_id, value_json, token_json, traceparent, now)
            await self._register_bucket(q, LANE_FRESH, bucket_of_task(task_id), ttl)
            await self.repo.insert_task(q, task_id, payload, ttl)
        except (StorageUnavailable, UnknownOutcome) as exc:
            raise Unavailable(f"storage unavailable: {exc}") from None
        self.metrics.inc("tasks_added")
        log.debug("task added", extra={"task_id": str(task_id)})
        return str(task_id)

    def _seal_task(
        self,
        key: OwnerKey,
        q: QueueKey,
        task_id: uuid.UUID,
        value_json: bytes,
        token_json: bytes | None,
        traceparent: str | None,
        now: int,
    ) -> Payload:
        tid = str(task_id)
        # The trace context and whether there is a token are stored in clear beside the ciphertexts:
        # bound into them, so that rewriting or nulling them is detected (issue 13.8).
        trace = traceparent or ""
        bind = _value_binding(token_json, trace)
        value = seal(key, value_json, service=q.service, task_id=tid, field="value", bind=bind)
        token = (
            seal(key, token_json, service=q.service, task_id=tid, field="token", bind=(trace,))
            if token_json is not None
            else None
        )
        return Payload(
            key_id=key.key_id,
            value_nonce=value.nonce,
            value_ct=value.ciphertext,
            token_nonce=token.nonce if token else None,
            token_ct=token.ciphertext if token else None,
            traceparent=traceparent,
            created_at=to_datetime(now),
        )

    # -- fetch -------------------------------------------------------------------------------
    async def fetch(self, owner: str, req: FetchRequest) -> Delivery | None:
        q = QueueKey(owner, req.service_id)
        ttr = min(req.time_to_recover or self.default_ttr_ms, self.max_ttr_ms)
        gate = self.may_grant_leases
        if gate is not None and not gate.ok:
            self.metrics.inc("leases_refused", reason="clock_skew")
            raise Unavailable(f"this bridge does not grant leases now: {gate.describe()}; retry on another bridge")
        try:
            row = await self.repo.worker(q, req.worker_id)
            held = row.pointer
            stamp = row.stamp
            if held is not None and not held.done:
                delivery = await self._resend(q, req.worker_id, held, ttr, stamp)
                if delivery is not None:
                    return delivery
            stale = held is not None and not held.done
            return await self._claim_next(q, req.worker_id, ttr, stamp, stale_pointer=stale)
        except (StorageUnavailable, UnknownOutcome) as exc:
            raise Unavailable(f"storage unavailable: {exc}") from None

    async def _resend(
        self, q: QueueKey, worker: str, held: WorkerPointer, ttr: int, stamp: int | None
    ) -> Delivery | None:
        """The worker has not acked its task: give it the same task again, with a fresh lease.

        The extension is conditional on the epoch only, not on the deadline: if nobody re-claimed
        the task since the lease ran out, it was nobody else's in between."""
        until = self.clock.now_ms() + ttr
        ttl = self.ttl_for(held.task_id)
        res = await self.repo.extend(q, held.task_id, held.epoch, worker, to_datetime(until), ttl)
        if not res.applied:
            return None
        # The scheduler will meet the old deadline, see the later one, and re-arm itself.
        self.metrics.inc("tasks_redelivered", kind="resend")
        return await self._deliver(q, worker, held.task_id, held.epoch, until, stamp=stamp)

    async def _claim_next(
        self, q: QueueKey, worker: str, ttr: int, stamp: int | None, *, stale_pointer: bool
    ) -> Delivery | None:
        spread = False
        attempted = False
        for _ in range(MAX_CLAIM_ATTEMPTS):
            entry = await self.dispatcher.next_candidate(q, LANE_RECOVERED, spread=spread)
            if entry is None:
                entry = await self.dispatcher.next_candidate(q, LANE_FRESH, spread=spread)
            if entry is None:
                break
            attempted = True
            try:
                delivery, stamp = await self._try_claim(q, worker, entry, ttr, self.clock.now_ms(), stamp)
            except BaseException:
                self.dispatcher.release(q, entry)
                raise
            # Claimed by us, or it was not claimable (another worker or instance got it first).
            self.dispatcher.taken(q, entry, lost_race=delivery is None)
            if delivery is not None:
                self._spawn(self.repo.mark_claimed(q, entry, self.ttl_for(entry.task_id)), "mark claimed")
                return delivery
            spread = True  # lost a race: another worker or instance reads the same head
        if stale_pointer or attempted:
            # Our write-ahead pointer names a task we did not get: drop it.
            await self.repo.clear_worker(q, worker, next_stamp(self.clock.now_ms(), stamp))
        return None

    async def _try_claim(
        self, q: QueueKey, worker: str, entry: ReadyEntry, ttr: int, now: int, stamp: int | None
    ) -> tuple[Delivery | None, int]:
        """Claim one candidate. Returns the delivery (None if someone else holds the task) and the
        stamp of the pointer write, which the next write of the pointer must exceed."""
        task_id = entry.task_id
        ttl = self.ttl_for(task_id)
        recovered = entry.lane == LANE_RECOVERED
        epoch = (entry.epoch or 0) + 1 if recovered else 1
        until = now + ttr
        claim_id = uuid.uuid4()
        expiry = ExpiryEntry(to_datetime(until), q, task_id, epoch, entry.has_token)
        stamp = next_stamp(now, stamp)
        pointer = WorkerPointer(task_id, epoch, entry.has_token, granted_at_ms=now)
        # Write-ahead: the deadline and the worker's pointer exist before the claim can.
        await asyncio.gather(
            # Filed under the time it may be taken back: its deadline plus the skew margin.
            self.repo.insert_expiry(expiry_bucket(until + self.skew_margin_ms), expiry, ttl),
            self.repo.set_worker(q, worker, pointer, stamp, ttl),
        )
        if recovered:
            assert entry.epoch is not None
            # Only a lease whose deadline passed more than the skew margin ago on OUR clock.
            expired_before = to_datetime(now - self.skew_margin_ms)
            claim = self.repo.claim_expired(
                q, task_id, entry.epoch, worker, to_datetime(until), expired_before, claim_id, ttl
            )
        else:
            claim = self.repo.claim_new(q, task_id, worker, to_datetime(until), claim_id, ttl)
        # The payload is read while the claim runs: one round trip less when we win (most of the time).
        res, payload = await asyncio.gather(claim, self.repo.payload(q, task_id))
        if not res.applied:
            cur = res.current
            if (
                recovered
                and cur is not None
                and cur.state == "leased"
                and cur.epoch == entry.epoch
                and cur.lease_until is not None
                and to_ms(cur.lease_until) > now - self.skew_margin_ms
            ):
                # Not ours to take yet: the holder extended its lease after the scheduler re-exposed
                # the task, or the scheduler's clock is ahead of ours and the deadline + margin has
                # not passed here. Watch it again at a bucket still to come on our clock (the
                # original bucket is already behind the scheduler), or the task would be stranded.
                rearm = max(to_ms(cur.lease_until) + self.skew_margin_ms, now + EXPIRY_BUCKET_MS)
                await self.repo.insert_expiry(
                    expiry_bucket(rearm),
                    ExpiryEntry(cur.lease_until, q, task_id, cur.epoch, entry.has_token),
                    ttl,
                )
            self.metrics.inc("claim_conflicts")
            return None, stamp
        self.metrics.inc("tasks_delivered" if not recovered or epoch == 1 else "tasks_redelivered", kind="claim")
        log.debug("task claimed", extra={"task_id": str(task_id), "epoch": epoch, "lease_ms": ttr})
        return await self._deliver(q, worker, task_id, epoch, until, payload, stamp=stamp), stamp

    async def _deliver(
        self,
        q: QueueKey,
        worker: str,
        task_id: uuid.UUID,
        epoch: int,
        until: int,
        payload: Payload | None = None,
        *,
        stamp: int | None,
    ) -> Delivery:
        if payload is None:
            payload = await self.repo.payload(q, task_id)
        if payload is None:
            # Expired between claim and read (TTL): nothing to hand out.
            raise Unavailable("the task expired while being fetched; fetch again")
        try:
            key = await self._key_by_id(q.owner, payload.key_id)
        except KeyMissing:
            # Let the worker move on to other tasks; this lease runs out and the task is offered
            # again later (by then, perhaps, with its key back).
            await self.repo.clear_worker(q, worker, next_stamp(self.clock.now_ms(), stamp))
            self.metrics.inc("deliveries_failed", reason="key_missing")
            log.error("task not delivered: its key is missing", extra={"task_id": str(task_id), "epoch": epoch})
            raise
        try:
            sealed = Sealed(payload.key_id, payload.value_nonce, payload.value_ct)
            try:
                bind = _value_binding(payload.token_ct, payload.traceparent or "")
                plain = _open_bound(key, sealed, service=q.service, task_id=str(task_id), field="value", bind=bind)
            except TamperedCiphertext:
                raise IntegrityError(f"task {task_id} failed authentication and was dead-lettered") from None
        except IntegrityError as exc:
            # It can never be delivered: dead-letter it (kept until its TTL for inspection) so the
            # worker, and the queue, move on instead of being handed the same broken task forever.
            log.error("task dead-lettered: %s", exc.message, extra={"task_id": str(task_id), "epoch": epoch})
            now = self.clock.now_ms()
            await self.repo.kill(q, task_id, epoch, worker, to_datetime(now), self.ttl_for(task_id))
            # No clear of the pointer: a dead task is never resent (the extension fails), and the
            # worker's next fetch replaces the pointer.
            self.metrics.inc("tasks_dead_lettered", reason="integrity")
            raise
        return Delivery(
            task_id=str(task_id),
            value_json=plain,  # JSON already: spliced into the reply, never parsed again
            deliveries=epoch,
            epoch=epoch,
            lease_expires_at_ms=until,
            traceparent=payload.traceparent,
        )

    # -- ack ---------------------------------------------------------------------------------
    async def ack(self, owner: str, req: AckRequest, *, sent_before_ms: int | None = None) -> bool:
        """Complete a task. With ``taskId`` exactly that task (at that epoch, if given), else the
        task the worker holds, unless the request was sent before that lease was granted
        (``sent_before_ms``: an upper bound of the send time, from the AMQP timestamp)."""
        q = QueueKey(owner, req.service_id)
        outcome_json = _encode(req.outcome, "the outcome", self.max_value_bytes)
        try:
            row = await self.repo.worker(q, req.worker_id)
            if req.task_id is not None:
                target = await self._named_target(q, req, row.pointer)
            else:
                target = self._held_target(q, req, row.pointer, sent_before_ms)
            if target is None:
                return False
            if target.done:
                # The task is complete: a repeated ack (a retry after a lost reply) gets the same
                # answer, and nothing is completed or published twice.
                return await self._completed_by(q, target.task_id, target.epoch, req.worker_id)
            return await self._complete(q, req, target, row, outcome_json)
        except (StorageUnavailable, UnknownOutcome) as exc:
            raise Unavailable(f"storage unavailable: {exc}") from None

    async def _named_target(self, q: QueueKey, req: AckRequest, held: WorkerPointer | None) -> WorkerPointer | None:
        task_id = req.task_id
        assert task_id is not None
        if held is not None and held.task_id == task_id and req.epoch in (None, held.epoch):
            return held
        # The pointer names another task (the worker moved on, or this is a late copy of an ack):
        # the lease row of the named task decides. Never complete the task the pointer names.
        lease = await self.repo.lease(q, task_id, serial=False)
        if lease is None or lease.worker != req.worker_id or req.epoch not in (None, lease.epoch):
            return None
        if lease.state == "done":
            return WorkerPointer(task_id, lease.epoch, False, done=True)
        if lease.state != "leased":
            return None
        payload = await self.repo.payload(q, task_id)
        return WorkerPointer(task_id, lease.epoch, payload is not None and payload.token_ct is not None)

    def _held_target(
        self, q: QueueKey, req: AckRequest, held: WorkerPointer | None, sent_before_ms: int | None
    ) -> WorkerPointer | None:
        self.metrics.inc("acks_without_task_id")
        if held is None:
            return None
        granted = held.granted_at_ms
        if not held.done and sent_before_ms is not None and granted is not None and sent_before_ms <= granted:
            # Sent before the worker was handed its current task: a late copy of an earlier ack.
            self.metrics.inc("acks_refused", reason="older_than_lease")
            log.warning(
                "ack older than the worker's lease refused", extra={"task_id": str(held.task_id), "epoch": held.epoch}
            )
            return None
        return held

    async def _completed_by(self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str) -> bool:
        cur = await self.repo.lease(q, task_id, serial=False)
        return cur is not None and cur.state == "done" and cur.epoch == epoch and cur.worker == worker

    async def _complete(
        self, q: QueueKey, req: AckRequest, target: WorkerPointer, row: WorkerRow, outcome_json: bytes
    ) -> bool:
        now = self.clock.now_ms()
        ttl = self.ttl_for(target.task_id)
        completion_id = uuid.uuid4()
        intent: OutboxEntry | None = None
        if target.has_token:
            key = await self._current_key(q.owner)
            sealed = seal(key, outcome_json, service=q.service, task_id=str(target.task_id), field="result")
            intent = OutboxEntry(
                outbox_bucket(now),
                q,
                target.task_id,
                completion_id,
                sealed.key_id,
                sealed.nonce,
                sealed.ciphertext,
                False,
            )
            await self.repo.insert_outbox(intent, ttl)
        res = await self.repo.complete(
            q, target.task_id, target.epoch, req.worker_id, to_datetime(now), completion_id, ttl
        )
        held = row.pointer
        points_here = held is not None and held.task_id == target.task_id
        stamp = next_stamp(now, row.stamp)
        if not res.applied:
            if intent is not None:
                await self.repo.mark_published(intent, ttl)  # void: this completion did not happen
            cur = res.current
            again = (
                cur is not None and cur.state == "done" and cur.epoch == target.epoch and cur.worker == req.worker_id
            )
            # A retried ack of a completion that already happened is still a success.
            if points_here:
                if again:
                    await self.repo.finish_worker(q, req.worker_id, target.task_id, stamp, ttl)
                else:
                    await self.repo.clear_worker(q, req.worker_id, stamp)
            return again
        if points_here:
            # Not awaited: until it lands, a retried ack still finds the completion through the LWT.
            self._spawn(self.repo.finish_worker(q, req.worker_id, target.task_id, stamp, ttl), "mark worker done")
        self.recently_completed[(target.task_id, target.epoch)] = None
        if len(self.recently_completed) > RECENTLY_COMPLETED_MAX:
            del self.recently_completed[next(iter(self.recently_completed))]
        self.metrics.inc("tasks_completed", outcome="error" if "error" in req.outcome else "result")
        log.debug("task completed", extra={"task_id": str(target.task_id), "epoch": target.epoch})
        if intent is not None:
            self._spawn(self.publish(intent), "publish result")
        return True

    # -- results -----------------------------------------------------------------------------
    async def publish(self, entry: OutboxEntry) -> None:
        """Publish one completion's result to the engine, then mark the outbox entry done."""
        if self.results is None:
            return
        self.publishing += 1
        try:
            await self._publish(entry)
        finally:
            self.publishing -= 1

    async def _publish(self, entry: OutboxEntry) -> None:
        assert self.results is not None
        q = entry.queue
        payload = await self.repo.payload(q, entry.task_id)
        if payload is None or payload.token_ct is None or payload.token_nonce is None:
            await self.repo.mark_published(entry, self.ttl_for(entry.task_id))
            return
        tid = str(entry.task_id)
        token_key = await self._key_by_id(q.owner, payload.key_id)
        result_key = token_key if entry.key_id == payload.key_id else await self._key_by_id(q.owner, entry.key_id)
        try:
            token_json = _open_bound(
                token_key,
                Sealed(payload.key_id, payload.token_nonce, payload.token_ct),
                service=q.service,
                task_id=tid,
                field="token",
                bind=(payload.traceparent or "",),
            )
            outcome_json = open_sealed(
                result_key,
                Sealed(entry.key_id, entry.result_nonce, entry.result_ct),
                service=q.service,
                task_id=tid,
                field="result",
            )
        except TamperedCiphertext:
            log.error("result of task %s failed authentication: not published", tid)
            await self.repo.mark_published(entry, self.ttl_for(entry.task_id))
            self.metrics.inc("results_dropped", reason="integrity")
            return
        kind, value_json = _split_outcome(outcome_json)
        await self.results.publish_result(
            ResultMessage(
                q.owner, q.service, tid, str(entry.completion_id), token_json, kind, value_json, payload.traceparent
            )
        )
        await self.repo.mark_published(entry, self.ttl_for(entry.task_id))
        self.metrics.inc("results_published")
