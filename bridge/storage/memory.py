"""An in-memory adapter of the store port, for tests of the queue's rules (never for production).

It keeps the semantics the queue relies on, as Cassandra provides them:
- compare-and-set on a lease is atomic (checked and applied with no await in between), and a
  failed one reports only the columns Cassandra reports (those named in its condition, or the
  whole row for ``IF NOT EXISTS``);
- worker rows are written cell by cell with last-write-wins on the write stamp;
- cursors keep the greatest position; ready entries of a bucket come back in time-UUID order;
- rows about a task vanish when the task's TTL ends (on the injected clock).

Every operation first yields to the event loop, like a round trip would, so concurrent fetches
and acks interleave as they do against a real server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bridge.crypto import Sealed
from bridge.domain.counting import DAY_MS, MINUTE_MS
from bridge.domain.records import (
    LANE_FRESH,
    LANE_RECOVERED,
    NO_KEY_MISSING_RUN,
    NO_WORKER,
    CasResult,
    ExpiryEntry,
    KeyMissingRun,
    Lease,
    LeaseState,
    OutboxEntry,
    OutboxKey,
    ParkedEntry,
    Payload,
    QueueKey,
    ReadyEntry,
    TaskAbout,
    TaskOptions,
    WorkerPointer,
    WorkerRow,
)
from bridge.domain.timeline import RESULT_OWED_MS, bucket_of_task, ms_of, timeuuid_from_ms
from bridge.storage.rows import timeuuid_order

OUTBOX_PAGE = 16  # results a page of outbox_pages holds (as the Cassandra adapter reads them)


def _order(seq: uuid.UUID) -> tuple[int, bytes]:
    return (seq.time, seq.bytes)


@dataclass
class _Ready:
    task_id: uuid.UUID
    epoch: int | None
    has_token: bool
    payload: Payload | None
    claimed: bool = False


@dataclass
class _Worker:
    cells: dict[str, tuple[int, Any]] = field(default_factory=dict)  # column -> (write stamp, value)

    def write(self, at: int, /, **values: Any) -> None:
        for column, value in values.items():
            old = self.cells.get(column)
            if old is None or at >= old[0]:
                self.cells[column] = (at, value)

    def get(self, column: str) -> Any:
        cell = self.cells.get(column)
        return None if cell is None else cell[1]


class MemoryTaskStore:
    def __init__(self, now_ms: Callable[[], int], task_ttl_s: int = 7 * 24 * 3600) -> None:
        self.now_ms = now_ms
        self.task_ttl_s = task_ttl_s
        self.ready: dict[tuple[QueueKey, int, int], dict[uuid.UUID, _Ready]] = {}
        self.leases: dict[tuple[QueueKey, uuid.UUID], Lease] = {}
        self.workers: dict[tuple[QueueKey, str], _Worker] = {}
        self.cursors: dict[tuple[QueueKey, int], tuple[int, uuid.UUID]] = {}
        self.message_ids: dict[tuple[QueueKey, str], uuid.UUID] = {}
        self.message_ids_written: dict[tuple[QueueKey, str], int] = {}
        self.expiry_wheel: dict[int, dict[tuple[int, str, str, uuid.UUID, int], ExpiryEntry]] = {}
        self.outbox_rows: dict[int, dict[tuple[str, str, uuid.UUID, uuid.UUID], OutboxEntry]] = {}
        self.loop_cursors: dict[str, int] = {}
        self.owed: dict[str, set[int]] = {}  # positions loops recorded as still owing work
        self.parked_rows: dict[QueueKey, dict[uuid.UUID, ParkedEntry]] = {}  # `parked`: one row per task
        self.park_rows: dict[QueueKey, dict[tuple[uuid.UUID, uuid.UUID], ParkedEntry]] = {}  # `parks`: per park
        self.count_rows: dict[tuple[QueueKey, int], tuple[int, int]] = {}
        self.delayed_rows: dict[tuple[QueueKey, int], int] = {}
        self.service_rows: set[QueueKey] = set()
        self.operations = 0  # calls made: what a test can count instead of round trips
        self.task_ends: dict[uuid.UUID, int] = {}  # when each task's life ends (its add fixed it)

    async def _io(self) -> None:
        self.operations += 1
        await asyncio.sleep(0)

    def alive(self, task_id: uuid.UUID) -> bool:
        """Every row about a task lives as long as the task: until the end its add fixed (else, a
        task stored without one, this store's TTL from the time in its id)."""
        return self.now_ms() < self._end(task_id)

    def _end(self, task_id: uuid.UUID) -> int:
        ends = self.task_ends.get(task_id)
        return ends if ends is not None else ms_of(task_id) + self.task_ttl_s * 1000

    def owed_alive(self, task_id: uuid.UUID) -> bool:
        """A result owed to the engine, and the decision that owes it, outlive the task by
        ``RESULT_OWED_MS`` (as the Cassandra adapter writes them)."""
        return self.now_ms() < self._end(task_id) + RESULT_OWED_MS

    # -- tasks -------------------------------------------------------------------------------
    async def store_task(
        self, q: QueueKey, task_id: uuid.UUID, payload: Payload, *, message_id: str | None = None
    ) -> None:
        await self._io()
        if message_id is not None:
            self.message_ids[(q, message_id)] = task_id
            self.message_ids_written[(q, message_id)] = self.now_ms()
        row = _Ready(task_id, None, payload.token is not None, payload)
        if payload.expires_at_ms is not None:
            self.task_ends[task_id] = payload.expires_at_ms
        self.ready.setdefault((q, LANE_FRESH, bucket_of_task(task_id)), {})[task_id] = row

    async def enter_again(self, q: QueueKey, task_id: uuid.UUID, seq: uuid.UUID, payload: Payload) -> None:
        await self._io()
        row = _Ready(task_id, None, payload.token is not None, payload)
        self.ready.setdefault((q, LANE_FRESH, bucket_of_task(seq)), {})[seq] = row

    async def task_exists(self, q: QueueKey, task_id: uuid.UUID) -> bool:
        return await self.payload(q, task_id) is not None

    async def reindex_task(self, q: QueueKey, task_id: uuid.UUID) -> None:
        await self._io()  # buckets are indexed by the rows themselves here

    async def payload(self, q: QueueKey, task_id: uuid.UUID) -> Payload | None:
        await self._io()
        return self._payload_now(q, task_id)

    def _payload_now(self, q: QueueKey, task_id: uuid.UUID) -> Payload | None:
        row = self.ready.get((q, LANE_FRESH, bucket_of_task(task_id)), {}).get(task_id)
        return row.payload if row is not None and self.alive(task_id) else None

    async def record_message_id(self, q: QueueKey, message_id: str, task_id: uuid.UUID) -> uuid.UUID | None:
        await self._io()
        existing = self.message_ids.setdefault((q, message_id), task_id)
        if existing == task_id:
            self.message_ids_written[(q, message_id)] = self.now_ms()
        return None if existing == task_id else existing

    async def message_id_recorded_at(self, q: QueueKey, message_id: str) -> int | None:
        await self._io()
        return self.message_ids_written.get((q, message_id))

    async def message_id_task(self, q: QueueKey, message_id: str) -> uuid.UUID | None:
        await self._io()
        return self.message_ids.get((q, message_id))

    async def replace_message_id(self, q: QueueKey, message_id: str, old: uuid.UUID, new: uuid.UUID) -> bool:
        await self._io()
        if self.message_ids.get((q, message_id)) != old:
            return False
        self.message_ids[(q, message_id)] = new
        self.message_ids_written[(q, message_id)] = self.now_ms()
        return True

    # -- the ready index ---------------------------------------------------------------------
    async def cursor(self, q: QueueKey, lane: int) -> tuple[int, uuid.UUID] | None:
        await self._io()
        return self.cursors.get((q, lane))

    async def advance_cursor(self, q: QueueKey, lane: int, bucket: int, seq: uuid.UUID) -> None:
        await self._io()
        old = self.cursors.get((q, lane))
        if old is None or (bucket, _order(seq)) > (old[0], _order(old[1])):
            self.cursors[(q, lane)] = (bucket, seq)

    async def buckets_from(self, q: QueueKey, lane: int, bucket: int, limit: int) -> list[int]:
        await self._io()
        found = sorted(b for (qq, ln, b), rows in self.ready.items() if qq == q and ln == lane and b >= bucket and rows)
        return found[:limit]

    async def scan(self, q: QueueKey, lane: int, bucket: int, after: uuid.UUID | None, limit: int) -> list[ReadyEntry]:
        await self._io()
        rows = self.ready.get((q, lane, bucket), {})
        seqs = sorted((s for s in rows if self.alive(rows[s].task_id)), key=_order)
        if after is not None:
            seqs = [s for s in seqs if _order(s) > _order(after)]
        entries = []
        for s in seqs[:limit]:
            row = rows[s]
            created = None if row.payload is None else row.payload.created_at_ms
            entries.append(
                ReadyEntry(lane, bucket, s, row.task_id, row.epoch, row.has_token, row.claimed, created_at_ms=created)
            )
        return entries

    async def mark_claimed(self, q: QueueKey, entry: ReadyEntry, *, expires_at_ms: int | None = None) -> None:
        await self._io()
        row = self.ready.get((q, entry.lane, entry.bucket), {}).get(entry.seq)
        if row is not None:
            row.claimed = True

    async def expose_recovered(
        self, q: QueueKey, bucket: int, seq: uuid.UUID, task_id: uuid.UUID, epoch: int, has_token: bool
    ) -> None:
        await self._io()
        rows = self.ready.setdefault((q, LANE_RECOVERED, bucket), {})
        if seq not in rows:  # an upsert of the same values: a later one changes nothing
            rows[seq] = _Ready(task_id, epoch, has_token, None)

    # -- leases ------------------------------------------------------------------------------
    def _lease(self, q: QueueKey, task_id: uuid.UUID) -> Lease | None:
        lease = self.leases.get((q, task_id))
        return lease if lease is not None and self.alive(task_id) else None

    async def decisions(self, q: QueueKey, task_id: uuid.UUID) -> frozenset[uuid.UUID]:
        # The ids of a decision that may owe a result outlive the task (RESULT_OWED_MS).
        await self._io()
        lease = self.leases.get((q, task_id))
        if lease is None or not self.owed_alive(task_id):
            return frozenset()
        return frozenset(i for i in (lease.completion_id, lease.park_id) if i is not None) | lease.park_ids

    async def lease(self, q: QueueKey, task_id: uuid.UUID, *, serial: bool = True) -> Lease | None:
        await self._io()
        return self._lease(q, task_id)

    async def leases_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Lease]:
        await self._io()
        found = {task_id: self._lease(q, task_id) for task_id in task_ids}
        # As Cassandra's ``lease.get_many``: without the last errors (``errors_of``).
        return {task_id: replace(lease, last_error=None) for task_id, lease in found.items() if lease is not None}

    async def errors_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Sealed]:
        await self._io()
        found = {task_id: self._lease(q, task_id) for task_id in task_ids}
        return {
            task_id: lease.last_error
            for task_id, lease in found.items()
            if lease is not None and lease.last_error is not None
        }

    @staticmethod
    def _refused(
        cur: Lease | None,
        *,
        with_until: bool = False,
        with_worker: bool = False,
        with_token: bool = False,
        with_base: bool = False,
    ) -> CasResult:
        """What Cassandra reports of a failed conditional update: the columns of its condition."""
        if cur is None:
            return CasResult(False, None)
        seen = Lease(
            cur.state,
            cur.epoch,
            cur.worker if with_worker else None,
            cur.lease_until_ms if with_until else None,
            None,
            None,
            cur.has_token if with_token else None,
            base_epoch=cur.base_epoch if with_base else 0,
        )
        return CasResult(False, seen)

    async def claim_new(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        worker: str,
        until_ms: int,
        claim_id: uuid.UUID,
        *,
        has_token: bool | None = None,
        expires_at_ms: int | None = None,  # every row here ends with its task's life (``alive``)
    ) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        if cur is not None:
            return CasResult(False, cur)  # IF NOT EXISTS reports the whole row
        self.leases[(q, task_id)] = Lease(LeaseState.LEASED, 1, worker, until_ms, claim_id, None, has_token)
        return CasResult(True, None)

    async def claim_expired(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        expected_epoch: int,
        worker: str,
        until_ms: int,
        expired_before_ms: int,
        claim_id: uuid.UUID,
        *,
        has_token: bool | None = None,
        expires_at_ms: int | None = None,
    ) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        if (
            cur is None
            or not cur.is_leased
            or cur.epoch != expected_epoch
            or cur.lease_until_ms is None
            or cur.lease_until_ms > expired_before_ms
        ):
            return self._refused(cur, with_until=True)
        self.leases[(q, task_id)] = replace(
            cur,
            epoch=expected_epoch + 1,
            worker=worker,
            lease_until_ms=until_ms,
            claim_id=claim_id,
            has_token=has_token,
        )
        return CasResult(True, None)

    async def extend(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        worker: str,
        until_ms: int,
        *,
        shorten_from_ms: int | None = None,
    ) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        if cur is None or not cur.held_by(worker, epoch):
            return self._refused(cur, with_worker=True, with_until=True)
        if shorten_from_ms is not None:
            if cur.lease_until_ms != shorten_from_ms:
                return self._refused(cur, with_worker=True, with_until=True)  # moved since it was read
        elif cur.lease_until_ms is None or cur.lease_until_ms > until_ms:
            return self._refused(cur, with_worker=True, with_until=True)  # an earlier deadline
        self.leases[(q, task_id)] = replace(cur, lease_until_ms=until_ms)
        return CasResult(True, None)

    async def complete(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        worker: str,
        now_ms: int,
        completion_id: uuid.UUID,
        *,
        tokenless: bool = False,
    ) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        if cur is None or not cur.held_by(worker, epoch) or (tokenless and cur.has_token is not False):
            return self._refused(cur, with_worker=True, with_token=tokenless)
        self.leases[(q, task_id)] = replace(
            cur, state=LeaseState.DONE, completion_id=completion_id, completed_at_ms=now_ms
        )
        return CasResult(True, None)

    async def kill(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, now_ms: int, kill_id: uuid.UUID
    ) -> bool:
        await self._io()
        cur = self._lease(q, task_id)
        if cur is None or not cur.held_by(worker, epoch):
            return False
        self.leases[(q, task_id)] = replace(cur, state=LeaseState.DEAD, completion_id=kill_id, completed_at_ms=now_ms)
        return True

    async def uncount(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        read: Lease,
        worker: str,
        *,
        until_ms: int | None = None,
        missing: KeyMissingRun | None = None,
    ) -> bool:
        await self._io()
        cur, epoch = self._lease(q, task_id), read.epoch
        if cur is None or not cur.held_by(worker, epoch) or cur.uncounted_epoch == epoch:
            return False
        if cur.lease_until_ms != read.lease_until_ms:
            return False  # ``lease_until = ?``: resent to its worker by another copy since the read
        # As Cassandra's: the counts the caller read, plus one (only the holder writes them).
        run = missing or NO_KEY_MISSING_RUN
        cur = replace(
            cur,
            uncounted=read.uncounted + 1,
            uncounted_epoch=epoch,
            key_missing=run.claims,
            key_missing_since_ms=run.since_ms,
            key_missing_mark=run.mark,
        )
        cur = replace(cur, worker=NO_WORKER)  # held by nobody: never resent to its worker
        if until_ms is not None:
            cur = replace(cur, lease_until_ms=until_ms)
        self.leases[(q, task_id)] = cur
        return True

    # -- the lifecycle (1.4) -------------------------------------------------------------------
    async def task_options(self, q: QueueKey, task_id: uuid.UUID) -> TaskOptions:
        payload = await self.payload(q, task_id)
        if payload is None:
            return TaskOptions()
        return TaskOptions(payload.max_deliveries, payload.priority)

    async def task_about(self, q: QueueKey, task_id: uuid.UUID) -> TaskAbout | None:
        p = await self.payload(q, task_id)
        if p is None:
            return None
        return TaskAbout(p.created_at_ms, p.token is not None, p.max_deliveries, p.priority)

    async def stored_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        await self._io()
        return {t for t in task_ids if self._payload_now(q, t) is not None}

    async def release(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, until_ms: int, error: Sealed | None
    ) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        if cur is None or not cur.held_by(worker, epoch):
            return self._refused(cur, with_worker=True)
        self.leases[(q, task_id)] = replace(cur, worker=NO_WORKER, lease_until_ms=until_ms, last_error=error)
        return CasResult(True, None)

    async def park(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        now_ms: int,
        reason: str,
        park_id: uuid.UUID,
        *,
        worker: str | None = None,
        expired_before_ms: int | None = None,
        base_epoch: int | None = None,
        error: Sealed | None = None,
        earlier_park_id: uuid.UUID | None = None,
        until_ms: int | None = None,
    ) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        if cur is None or not cur.is_leased or cur.epoch != epoch:
            return self._refused(cur, with_worker=True, with_until=True, with_base=worker is None)
        if worker is not None and cur.worker != worker:
            return self._refused(cur, with_worker=True)
        if worker is not None and until_ms is not None and cur.lease_until_ms != until_ms:
            return self._refused(cur, with_worker=True, with_until=True)
        if worker is None:
            assert base_epoch is not None
            if (
                cur.lease_until_ms is None
                or cur.lease_until_ms > (expired_before_ms or 0)
                or cur.base_epoch != base_epoch
            ):
                return self._refused(cur, with_until=True, with_base=True)
        error = error if worker is not None else cur.last_error
        self.leases[(q, task_id)] = replace(
            cur,
            state=LeaseState.PARKED,
            parked_at_ms=now_ms,
            park_reason=reason,
            completion_id=park_id,
            park_id=park_id,
            park_ids=cur.park_ids | {park_id} | ({earlier_park_id} if earlier_park_id else set()),
            last_error=error,
        )
        return CasResult(True, None)

    async def unpark(self, q: QueueKey, task_id: uuid.UUID, epoch: int, until_ms: int) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        if cur is None or cur.state is not LeaseState.PARKED or cur.epoch != epoch:
            return self._refused(cur)
        unpark_id = timeuuid_from_ms(self.now_ms())  # as Cassandra's: listed in park_ids
        self.leases[(q, task_id)] = replace(
            cur,
            state=LeaseState.LEASED,
            base_epoch=epoch,
            uncounted=0,
            key_missing=0,
            worker=NO_WORKER,
            lease_until_ms=until_ms,
            claim_id=unpark_id,
            park_ids=cur.park_ids | {unpark_id},
        )
        return CasResult(True, None)

    async def cancel(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        state: LeaseState | None,
        epoch: int,
        *,
        expired_before_ms: int | None = None,
        to: LeaseState = LeaseState.CANCELLED,
        base_epoch: int | None = None,
        done_id: uuid.UUID | None = None,
    ) -> CasResult:
        await self._io()
        cur = self._lease(q, task_id)
        done_id = done_id or uuid.uuid4()
        if state is None:
            if cur is not None:
                return CasResult(False, cur)
            self.leases[(q, task_id)] = Lease(to, 0, None, None, None, done_id, completed_at_ms=self.now_ms())
            return CasResult(True, None)
        assert base_epoch is not None
        if cur is None or cur.state is not state or cur.epoch != epoch or cur.base_epoch != base_epoch:
            return self._refused(cur, with_until=expired_before_ms is not None, with_base=True)
        if expired_before_ms is not None and (cur.lease_until_ms is None or cur.lease_until_ms > expired_before_ms):
            return self._refused(cur, with_until=True, with_base=True)
        self.leases[(q, task_id)] = replace(cur, state=to, completion_id=done_id, completed_at_ms=self.now_ms())
        return CasResult(True, None)

    async def add_parked(self, q: QueueKey, entry: ParkedEntry) -> None:
        await self._io()
        assert entry.park_id is not None, "a park's row is keyed by its id"
        self.parked_rows.setdefault(q, {})[entry.task_id] = replace(entry, in_parks=False)
        self.park_rows.setdefault(q, {})[(entry.task_id, entry.park_id)] = replace(entry, in_parks=True)

    async def remove_park(self, q: QueueKey, task_id: uuid.UUID, park_id: uuid.UUID, parked_at_ms: int | None) -> None:
        await self._io()
        self.park_rows.get(q, {}).pop((task_id, park_id), None)

    async def remove_parked(
        self, q: QueueKey, task_id: uuid.UUID, *, epoch: int | None = None, park_id: uuid.UUID | None = None
    ) -> None:
        await self._io()
        rows = self.parked_rows.get(q, {})
        row = rows.get(task_id)
        if row is None:
            return
        if park_id is not None:
            if row.park_id == park_id:  # ``IF park_id = ?``: a row without one (an older bridge's) stays
                del rows[task_id]
        elif epoch is None or row.epoch == epoch:
            del rows[task_id]

    async def parked(
        self, q: QueueKey, limit: int, after: uuid.UUID | None = None, *, in_order: bool = True
    ) -> list[ParkedEntry]:
        await self._io()
        per_task = [e for e in self.parked_rows.get(q, {}).values() if self.alive(e.task_id)]
        per_park = [e for e in self.park_rows.get(q, {}).values() if self.alive(e.task_id)]
        if after is not None:
            per_task = [e for e in per_task if timeuuid_order(e.task_id) > timeuuid_order(after)]
            per_park = [e for e in per_park if timeuuid_order(e.task_id) > timeuuid_order(after)]
        # In Cassandra's order, as the Cassandra store merges its two reads: by task, its rows of
        # ``parks`` (in park order) before its row of ``parked``.
        per_task.sort(key=lambda e: timeuuid_order(e.task_id))
        per_park.sort(key=lambda e: (timeuuid_order(e.task_id), timeuuid_order(e.park_id or e.task_id)))
        if not in_order:
            return per_task[:limit] + per_park[:limit]
        return sorted(per_park + per_task, key=lambda e: (timeuuid_order(e.task_id), not e.in_parks))[:limit]

    async def add_counts(self, q: QueueKey, day: int, ready: int, in_flight: int) -> None:
        await self._io()
        r, f = self.count_rows.get((q, day), (0, 0))
        self.count_rows[(q, day)] = (r + ready, f + in_flight)

    async def add_delayed(self, q: QueueKey, minute: int, delta: int) -> None:
        await self._io()
        self.delayed_rows[(q, minute)] = self.delayed_rows.get((q, minute), 0) + delta

    async def counts(self, q: QueueKey, since_day: int) -> tuple[int, int]:
        await self._io()
        rows = [v for (k, day), v in self.count_rows.items() if k == q and day >= since_day]
        return sum(r for r, _ in rows), sum(f for _, f in rows)

    async def delayed(self, q: QueueKey, since_minute: int) -> dict[int, int]:
        await self._io()
        return {minute: v for (k, minute), v in self.delayed_rows.items() if k == q and minute >= since_minute}

    async def trim_counts(self, q: QueueKey, before_day: int) -> None:
        await self._io()
        before_minute = before_day * DAY_MS // MINUTE_MS
        for k, day in [key for key in self.count_rows if key[0] == q and key[1] < before_day]:
            del self.count_rows[(k, day)]
        for k, minute in [key for key in self.delayed_rows if key[0] == q and key[1] < before_minute]:
            del self.delayed_rows[(k, minute)]

    async def register_service(self, q: QueueKey) -> None:
        await self._io()
        self.service_rows.add(q)

    async def services(self, owner: str, limit: int) -> list[str]:
        await self._io()
        return sorted(q.service for q in self.service_rows if q.owner == owner)[:limit]

    async def queues(self, limit: int) -> list[QueueKey]:
        await self._io()
        return sorted(self.service_rows, key=lambda q: (q.owner, q.service))[:limit]

    async def queue_page(self, after: QueueKey | None, limit: int) -> list[QueueKey]:
        await self._io()
        ordered = sorted(self.service_rows, key=lambda q: (q.owner, q.service))
        if after is not None:
            ordered = [q for q in ordered if (q.owner, q.service) > (after.owner, after.service)]
        return ordered[:limit]

    async def queues_after_owner(self, owner: str, limit: int) -> list[QueueKey]:
        await self._io()
        return sorted((q for q in self.service_rows if q.owner > owner), key=lambda q: (q.owner, q.service))[:limit]

    # -- worker pointers -----------------------------------------------------------------------
    async def worker(self, q: QueueKey, worker: str) -> WorkerRow:
        await self._io()
        row = self.workers.get((q, worker))
        if row is None:
            return WorkerRow(None, None)
        task_id, epoch = row.get("task_id"), row.get("epoch")
        if task_id is None or epoch is None or not self.alive(task_id):
            return WorkerRow(None, row.get("stamp"))
        done = row.get("done_task") == task_id
        pointer = WorkerPointer(task_id, epoch, bool(row.get("has_token")), done, row.get("granted_at"))
        return WorkerRow(pointer, row.get("stamp"))

    async def set_worker(self, q: QueueKey, worker: str, pointer: WorkerPointer, stamp: int) -> None:
        await self._io()
        p = pointer
        self.workers.setdefault((q, worker), _Worker()).write(
            stamp, task_id=p.task_id, epoch=p.epoch, has_token=p.has_token, stamp=stamp, granted_at=p.granted_at_ms
        )

    async def write_ahead(
        self,
        q: QueueKey,
        worker: str,
        pointer: WorkerPointer,
        stamp: int,
        bucket: int,
        entry: ExpiryEntry,
        *,
        expires_at_ms: int | None = None,
    ) -> None:
        await self.watch_expiry(bucket, entry)
        await self.set_worker(q, worker, pointer, stamp)

    async def finish_worker(self, q: QueueKey, worker: str, task_id: uuid.UUID, stamp: int) -> None:
        await self._io()
        self.workers.setdefault((q, worker), _Worker()).write(stamp, done_task=task_id)

    async def clear_worker(self, q: QueueKey, worker: str, stamp: int) -> None:
        await self._io()
        self.workers.setdefault((q, worker), _Worker()).write(
            stamp, task_id=None, epoch=None, has_token=None, granted_at=None, stamp=stamp
        )

    # -- recovery timer wheel and outbox ---------------------------------------------------------
    async def watch_expiry(self, bucket: int, entry: ExpiryEntry, *, backstop: bool = True) -> None:
        # No second filing: this store is one process's, whose marks its scheduler knows (``marked_here``).
        await self._io()
        e = entry
        key = (e.lease_until_ms, e.queue.owner, e.queue.service, e.task_id, e.epoch)
        self.expiry_wheel.setdefault(bucket, {})[key] = e

    def marked_here(self, bucket: int) -> bool:
        return bucket in self.expiry_wheel  # one process: every mark is this one's

    async def marked_expiry_buckets(self, first: int, last: int) -> set[int]:
        await self._io()
        return {b for b in self.expiry_wheel if first <= b <= last}

    async def expiries(self, bucket: int) -> list[ExpiryEntry]:
        await self._io()
        rows = self.expiry_wheel.get(bucket, {})
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2], _order(k[3]), k[4])) if self.alive(k[3])]

    async def insert_outbox(self, entry: OutboxEntry) -> None:
        await self._io()
        e = entry
        self.outbox_rows.setdefault(e.bucket, {})[(e.queue.owner, e.queue.service, e.task_id, e.completion_id)] = e

    async def mark_published(self, entry: OutboxEntry) -> None:
        await self._io()
        e = entry
        rows = self.outbox_rows.get(e.bucket, {})
        key = (e.queue.owner, e.queue.service, e.task_id, e.completion_id)
        if key in rows:
            rows[key] = replace(rows[key], published=True)

    async def keep_token(self, entry: OutboxEntry, token: Sealed, traceparent: str | None) -> None:
        await self._io()
        e = entry
        rows = self.outbox_rows.get(e.bucket, {})
        key = (e.queue.owner, e.queue.service, e.task_id, e.completion_id)
        if key in rows:
            rows[key] = replace(rows[key], token=token, traceparent=traceparent)

    async def outbox(self, bucket: int) -> list[OutboxEntry]:
        await self._io()
        rows = self.outbox_rows.get(bucket, {}).values()
        return [e for e in rows if self.owed_alive(e.task_id) and not e.published]

    async def outbox_pages(self, bucket: int) -> AsyncIterator[list[OutboxEntry]]:
        found = await self.outbox(bucket)
        for start in range(0, len(found), OUTBOX_PAGE):
            yield found[start : start + OUTBOX_PAGE]

    async def outbox_pages_of(self, bucket: int, keys: Sequence[OutboxKey]) -> AsyncIterator[list[OutboxEntry]]:
        await self._io()
        wanted = {(k.queue, k.task_id, k.completion_id) for k in keys}
        found = [
            e
            for e in self.outbox_rows.get(bucket, {}).values()
            if (e.queue, e.task_id, e.completion_id) in wanted and self.owed_alive(e.task_id)
        ]
        for start in range(0, len(found), OUTBOX_PAGE):
            yield found[start : start + OUTBOX_PAGE]

    # -- loop progress ---------------------------------------------------------------------------
    async def scheduler_cursor(self, name: str, now_ms: int) -> int | None:
        await self._io()
        return self.loop_cursors.get(name)

    async def advance_scheduler_cursor(self, name: str, pos: int, pos_ms: int) -> None:
        await self._io()
        self.loop_cursors[name] = max(pos, self.loop_cursors.get(name, pos))

    async def owed_positions(self, name: str, now_ms: int) -> set[int]:
        await self._io()
        return set(self.owed.get(name, ()))

    async def remember_owed(self, name: str, pos: int, pos_ms: int) -> None:
        await self._io()
        self.owed.setdefault(name, set()).add(pos)

    async def forget_owed(self, name: str, pos: int, pos_ms: int) -> None:
        await self._io()
        self.owed.get(name, set()).discard(pos)


if TYPE_CHECKING:  # typed to the same port as the Cassandra adapter (mypy checks the assignment)
    from bridge.domain.store import TaskStore

    _conforms: TaskStore = MemoryTaskStore(lambda: 0)

__all__ = ["MemoryTaskStore"]
