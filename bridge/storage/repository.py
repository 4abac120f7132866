"""The Cassandra adapter of the store port (``bridge.domain.store.TaskStore``).

It knows CQL, the schema and the driver: it turns the domain's milliseconds into ``timestamp``
columns and back, gives every row about a task the rest of the task's lifetime as its TTL (the
lifetime its add fixed, ``expires_at``, not this bridge's own TTL: see ``ttl_for``), keeps the
bucket indexes, and resolves lightweight transactions whose outcome was unknown (a timed-out
Paxos round): sent once more where that settles it (``_cas``), then a SERIAL read. It makes no
queue decisions (that is ``bridge.domain``). Driver failures surface as ``bridge.storage.errors``
exceptions, which are ``Unavailable`` to the domain.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bridge.crypto import Sealed
from bridge.domain.counting import MINUTE_MS
from bridge.domain.deadlines import request_deadline_ms
from bridge.domain.records import (
    LANE_FRESH,
    LANE_RECOVERED,
    NO_KEY_MISSING_RUN,
    NO_WORKER,
    UNSHARDED,
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
from bridge.domain.timeline import (
    EXPIRY_BUCKET_MS,
    EXPIRY_SHARDS,
    MIN_TIMEUUID,
    NEAR_DEADLINE_MS,
    OUTBOX_SHARDS,
    RESULT_OWED_MS,
    bucket_of_task,
    expiry_bucket,
    ms_of,
    shard_of,
    timeuuid_from_ms,
)
from bridge.storage.cassandra import Row
from bridge.storage.errors import StorageError, StorageNotSent, StorageUnavailable, UnknownOutcome
from bridge.storage.rows import (
    cas_result,
    expiry_entry,
    lease_of,
    outbox_entry,
    parked_entry,
    payload_of,
    ready_entry,
    sealed_error,
    timeuuid_order,
    to_datetime,
    to_ms,
    uuid_set,
    worker_row,
)
from bridge.storage.session import CqlSession
from bridge.storage.statements import STATEMENTS

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
# A second try at an unknown outcome must end this long before the caller's deadline: the reply's
# way back through the broker, and clocks that differ by up to the skew limit's margin.
RESOLVE_MARGIN_MS = 500
MAX_CASSANDRA_TTL_S = 630_720_000  # 20 years
SERVICE_REGISTRATION_PERIOD_S = 86_400  # how often a bridge writes a queue's ``services`` row again
ALL_EXPIRY_SHARDS = list(range(EXPIRY_SHARDS))
ALL_OUTBOX_SHARDS = list(range(OUTBOX_SHARDS))
OUTBOX_READS_AT_ONCE = 16  # unpublished outbox entries read side by side (each holds a result)
LOOP_CURSOR_TTL_S = 30 * 24 * 3600  # a restart after an outage this long still resumes where it stopped
LOOP_CURSOR_MAX_DAYS = 31
OWED_PARTITION = -1  # the ``day`` of the partition that holds a loop's owed positions (no day's)
BUCKET_INDEX_GRACE_S = 60  # an index row outlives the rows it points at
# An index row's ends are rounded up to the minute: the writes of one bucket by bridges of one
# BRIDGE_TASK_TTL (their entries' lives end within the bucket's ten seconds) name one or two ends,
# a cell each, however many bridges write it. Coarser, a scan with no cursor (from a TTL and an
# hour ago) would meet more rows still alive after their entries' end, and read their buckets.
BUCKET_INDEX_ROUNDING_MS = 60_000
MAX_REMEMBERED_BUCKETS = 100_000
# How often one bridge drops the rows behind a lane's position it wrote (``advance_cursor``).
CURSOR_TRIM_EVERY_MS = 600_000
MARK_HOUR_BUCKETS = 3_600_000 // EXPIRY_BUCKET_MS  # expiry marks: one partition per hour of buckets
# A row about a task whose end of life is not known (a task stored by an older bridge) that must
# outlive a lease (its row, its deadline, its worker's pointer) does by this much at least: more
# than any clock-skew margin (at most 60 s) plus the scheduler's passes over the deadline's bucket.
LEASE_ROW_GRACE_S = 120
# Ends of life read lately (task rows, leases), for the writes that follow a read in this process
# (a cancel, a recovery, a parked task): one entry is a few hundred bytes.
MAX_REMEMBERED_EXPIRIES = 20_000
# A row's TTL read back says its end to within a second or two (whole seconds, two clocks).
ROW_TTL_TOLERANCE_MS = 3_000


# A task row batched with its idempotency record stays under Cassandra's default
# batch_size_warn_threshold (5 KiB) with room for the row's other columns.
BATCHED_PAYLOAD_MAX_BYTES = 4096


@dataclass(frozen=True)
class _IndexWrite:
    """A bucket's index row to write with an entry: the bucket, until when the row lives (ms), and
    the statement's parameters."""

    key: tuple[QueueKey, int, int]
    until_ms: int
    params: tuple[Any, ...]


def _with_index(index: _IndexWrite | None, *writes: tuple[str, tuple[Any, ...]]) -> list[tuple[str, tuple[Any, ...]]]:
    """An entry's writes, its bucket's index row first when it needs one."""
    return [*([] if index is None else [("buckets.insert", index.params)]), *writes]


def _sealed_bytes(payload: Payload) -> int:
    token = payload.token
    return len(payload.value.ciphertext) + (len(token.ciphertext) if token else 0) + len(payload.traceparent or "")


class CassandraTaskStore:
    def __init__(
        self,
        db: CqlSession,
        now_ms: Callable[[], int],
        task_ttl_s: int,
        *,
        read_unsharded: bool = False,
        request_timeout_ms: int | None = None,
        skew_margin_ms: int = 0,
    ) -> None:
        self.db = db
        self.skew_margin_ms = skew_margin_ms  # BRIDGE_CLOCK_SKEW_MARGIN: see ``_backstop``
        self.now_ms = now_ms
        self.task_ttl_s = task_ttl_s
        # How long one more statement may take (the driver's request timeout): a second try at an
        # unknown outcome is sent only if it ends before the caller's deadline (``_in_time``).
        self.request_timeout_ms = request_timeout_ms
        # Buckets this process indexed lately, and until when their index rows live (ms).
        # Oldest first: past MAX_REMEMBERED_BUCKETS the oldest are forgotten, not all (cleared
        # whole, a bridge seeing that many buckets wrote every queue's index row again at once).
        self._indexed: OrderedDict[tuple[QueueKey, int, int], int] = OrderedDict()
        self._marked: set[int] = set()  # expiry buckets this process marked lately
        self._expiries: OrderedDict[uuid.UUID, int] = OrderedDict()  # task -> end of life, read lately
        self._cursor_trims: OrderedDict[tuple[QueueKey, int], int] = (
            OrderedDict()
        )  # lane -> when this process last trimmed it
        # A rolling upgrade from 1.2: also read the unsharded expiry and outbox tables it writes.
        self.read_unsharded = read_unsharded

    # -- setup -------------------------------------------------------------------------------
    async def prepare(self) -> None:
        for name, (cql, idempotent) in STATEMENTS.items():
            await self.db.prepare(name, cql, idempotent=idempotent)

    async def ping(self) -> str:
        rows = await self.db.execute("ping")
        return str(rows[0]["release_version"]) if rows else "?"

    async def server_time_ms(self) -> int:
        """The coordinator's clock: the shared reference every bridge measures its skew against."""
        rows = await self.db.execute("clock.now")
        return int(rows[0]["now_ms"])

    # -- row lifetimes -------------------------------------------------------------------------
    # A task's life is fixed when it is added: the time in its id plus the adding bridge's
    # BRIDGE_TASK_TTL, stored with it (``ready.expires_at``) and carried by its hint. Every row about
    # it lives exactly as long, whichever bridge writes it: during a rolling change of the setting,
    # a bridge on a shorter TTL gave the leases it granted and the completions it wrote its own,
    # shorter life, and a lease vanished mid-lease (a second worker got the task) or a completed
    # task was handed out again once its ``done`` row had expired.

    def ttl_for(self, task_id: uuid.UUID, expires_at_ms: int | None = None, *, outlive_ms: int | None = None) -> int:
        """Seconds left in the task's life: every row about a task expires at the same moment.

        The end is ``expires_at_ms``, else the one this store read lately; not known (a task an
        older bridge stored) it is this bridge's own TTL from the time in the id, as before, and a
        row that must outlive a moment (``outlive_ms``: a lease's deadline) outlives it by
        ``LEASE_ROW_GRACE_S``."""
        end = self._known_end(task_id, expires_at_ms)
        if end is not None:
            return self._seconds_until(end)
        ttl = self._seconds_until(self._own_end(task_id))
        if outlive_ms is not None:
            ttl = max(ttl, self._seconds_until(outlive_ms + LEASE_ROW_GRACE_S * 1000))
        return ttl

    def owed_ttl_for(self, task_id: uuid.UUID) -> int:
        """Seconds a result owed to the engine stays deliverable: the task's life plus
        ``RESULT_OWED_MS`` (its outbox row, and the lease cells its decision wrote)."""
        return int(min(self.ttl_for(task_id) + RESULT_OWED_MS // 1000, MAX_CASSANDRA_TTL_S))

    def _own_end(self, task_id: uuid.UUID) -> int:
        """A task's end of life by this bridge's own TTL: what it gives a task it adds."""
        return ms_of(task_id) + self.task_ttl_s * 1000

    def _seconds_until(self, end_ms: int) -> int:
        left = -((self.now_ms() - end_ms) // 1000)  # whole seconds, rounded up
        # Bounded by Cassandra's largest TTL: an id far in the future (a forged one) must not
        # make a statement fail (a delayed task is due within a TTL, far below it).
        return int(min(max(1, left), MAX_CASSANDRA_TTL_S))

    def _known_end(self, task_id: uuid.UUID, expires_at_ms: int | None = None) -> int | None:
        return expires_at_ms if expires_at_ms is not None else self._expiries.get(task_id)

    def _remember_end(self, task_id: uuid.UUID, expires_at_ms: int | None) -> None:
        if expires_at_ms is None:
            return
        self._expiries[task_id] = int(expires_at_ms)
        self._expiries.move_to_end(task_id)
        if len(self._expiries) > MAX_REMEMBERED_EXPIRIES:
            self._expiries.popitem(last=False)

    async def _lease_insert(
        self,
        task_id: uuid.UUID,
        name: str,
        params: Callable[[int, int], tuple[Any, ...]],
        *,
        expires_at_ms: int | None = None,
        outlive_ms: int | None = None,
    ) -> list[Row]:
        """A new lease (``IF NOT EXISTS``), given the rest of the task's life and recording its end
        (``params(ttl, end)``); a refused one reports the existing lease's."""
        known = self._known_end(task_id, expires_at_ms)
        end = known if known is not None else self._own_end(task_id)
        rows = await self.db.execute(name, params(self.ttl_for(task_id, known, outlive_ms=outlive_ms), end))
        row = rows[0] if rows else {}
        self._remember_end(task_id, end if row.get("[applied]") else row.get("expires_at"))
        return rows

    async def _lease_write(
        self,
        task_id: uuid.UUID,
        name: str,
        params: Callable[[int, int], tuple[Any, ...]],
        *,
        expires_at_ms: int | None = None,
        outlive_ms: int | None = None,
        owed: bool = False,
    ) -> list[Row]:
        """A compare-and-set of a lease, its cells given the rest of the task's life (``owed``: a
        decision whose result may be owed to the engine, given ``RESULT_OWED_MS`` more, as its
        outbox row is: the relay reads the decision's id to know it applied (``decisions``), and
        past the task's end it found none and marked the result published unsent). The epoch is
        not written by these: past the task's end the lease reads as none (``lease_of``), and no
        other request acts on it.

        ``params(ttl, end)``: the statement's parameters for a life ending at ``end``, which the
        condition ``expires_at IN (end, null)`` checks (``statements.SAME_LIFE``). A writer that
        does not know the task's end (an ack reads nothing first) binds its own computation: a
        lease that records none (written by an older bridge) accepts it; one that records another
        refuses it and reports its own, and the write is sent again with that one: one LWT more,
        only where the writing bridge's TTL differs from the task's (a setting changed pod by
        pod) and it has not read the task lately."""
        known = self._known_end(task_id, expires_at_ms)
        end = known if known is not None else self._own_end(task_id)
        extra = RESULT_OWED_MS // 1000 if owed else 0
        ttl = min(self.ttl_for(task_id, known, outlive_ms=outlive_ms) + extra, MAX_CASSANDRA_TTL_S)
        rows = await self.db.execute(name, params(ttl, end))
        row = rows[0] if rows else {}
        recorded = row.get("expires_at")
        if row.get("[applied]") or recorded is None or recorded == end:
            return rows  # applied, or refused by the rest of the condition
        self._remember_end(task_id, recorded)
        return await self.db.execute(
            name, params(min(self.ttl_for(task_id, recorded) + extra, MAX_CASSANDRA_TTL_S), recorded)
        )

    def _bucket_index(
        self,
        q: QueueKey,
        lane: int,
        bucket: int,
        task_id: uuid.UUID,
        *,
        force: bool,
        expires_at_ms: int | None = None,
    ) -> _IndexWrite | None:
        """The write of a bucket's index row that an entry of ``task_id`` needs, None if a row this
        process wrote outlives it. Sent with the entry's own write, in one request (``_store``),
        and remembered once that succeeded (``_remember_index``)."""
        life = self.ttl_for(task_id, expires_at_ms)  # the entry's
        if lane == LANE_RECOVERED:
            # A bucket of the recovered lane takes tasks of any age (those whose leases ran out
            # in its ten seconds): a full TTL from now outlives every one this bridge adds. Given
            # the first entry's remaining life, the row expired under a younger task's entry, and
            # no scan found it. A task added by a bridge with a longer TTL: the rest of its life.
            life = max(life, self.task_ttl_s)
        now = self.now_ms()
        key = (q, lane, bucket)
        # Written once per bucket and process, unless an entry outlives the row written for the
        # earlier ones (their grace covers the entries added later in the same ten seconds).
        if not force and self._indexed.get(key, 0) >= now + life * 1000:
            return None
        rounding = BUCKET_INDEX_ROUNDING_MS
        longest = MAX_CASSANDRA_TTL_S - BUCKET_INDEX_GRACE_S - rounding // 1000
        end = -(-(now + min(life, longest) * 1000) // rounding) * rounding  # rounded up
        ttl = -(-(end - now) // 1000) + BUCKET_INDEX_GRACE_S
        # The row's life is its longest-lived write's (an element of ``ends`` each), so that a
        # bridge on a shorter BRIDGE_TASK_TTL writing last cannot end it under longer-lived tasks.
        return _IndexWrite(key, now + ttl * 1000, (ttl, {end}, q.owner, q.service, lane, bucket))

    def _remember_index(self, index: _IndexWrite | None) -> None:
        if index is None:
            return
        self._indexed[index.key] = max(self._indexed.get(index.key, 0), index.until_ms)
        self._indexed.move_to_end(index.key)
        while len(self._indexed) > MAX_REMEMBERED_BUCKETS:
            self._indexed.popitem(last=False)

    async def _store(self, batch: str, writes: list[tuple[str, tuple[Any, ...]]], *, batchable: bool = True) -> None:
        """An entry's writes (its bucket's index row first, when it needs one) in one request: an
        UNLOGGED batch, not atomic, and no less safe than the index row written first. The
        request fails unless every write applied; one that failed may have left the entry without
        its index row, and is retried (an add's redelivered copy indexes the task again, a
        re-exposure's next pass writes it again). Sent one after the other, an add whose queue
        this bridge had not indexed in the last 10 s paid a round trip more: in a fleet of sidecars
        every bridge takes every queue's adds, so a quiet queue's add nearly always did.
        ``batchable`` False (a value over the batch size warning): the writes at once."""
        if len(writes) == 1:
            await self.db.execute(*writes[0])
        elif batchable:
            await self.db.execute_batch(batch, writes)
        else:
            results = await asyncio.gather(
                *(self.db.execute(name, params) for name, params in writes), return_exceptions=True
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            if not failures:
                return
            # A write that may have landed says so first; all of them refused unsent: nothing was.
            landed = [f for f in failures if not isinstance(f, StorageNotSent)]
            if landed:
                raise landed[0]
            if len(failures) < len(writes):
                # Refused unsent beside writes that landed (the index row or the idempotency record
                # in a partition without a quorum, the task row written): not "nothing stored", or
                # a stored add was neither counted nor hinted.
                raise StorageUnavailable(f"some of the writes landed: {failures[0]}") from failures[0]
            raise failures[0]

    # -- tasks ---------------------------------------------------------------------------------
    async def store_task(
        self, q: QueueKey, task_id: uuid.UUID, payload: Payload, *, message_id: str | None = None
    ) -> None:
        bucket = bucket_of_task(task_id)
        # The task's life, fixed now (by the adding bridge, ``WorkQueue.prepare_add``): stored with
        # it, so that whichever bridge writes about it later gives its rows the same life.
        ends = payload.expires_at_ms if payload.expires_at_ms is not None else self._own_end(task_id)
        self._remember_end(task_id, ends)
        index = self._bucket_index(q, LANE_FRESH, bucket, task_id, force=False, expires_at_ms=ends)
        token = payload.token
        created = None if payload.created_at_ms is None else to_datetime(payload.created_at_ms)
        ttl = self.ttl_for(task_id, ends)
        task = (
            *(q.owner, q.service, bucket, task_id, task_id),
            *(payload.value.key_id, payload.value.nonce, payload.value.ciphertext),
            *(token.nonce if token else None, token.ciphertext if token else None),
            *(payload.traceparent, created, payload.max_deliveries, payload.priority or None, ends),
            ttl,
        )
        writes = _with_index(index)
        if message_id is not None:
            # Not atomic either: a record whose task row is missing reads as an add that died
            # between its writes (see WorkQueue._dedupe).
            writes.append(("idem.record", (q.owner, q.service, message_id, task_id, ttl)))
        writes.append(("ready.insert", task))
        # Cassandra refuses a batch over batch_size_fail_threshold (50 KiB by default) and logs a
        # warning for one over batch_size_warn_threshold (5 KiB): a large value goes as writes at
        # once, as not atomic as the batch and as fast, a request more each.
        batch = "add.recorded" if message_id is not None else "add.indexed"
        await self._store(batch, writes, batchable=_sealed_bytes(payload) <= BATCHED_PAYLOAD_MAX_BYTES)
        self._remember_index(index)

    async def enter_again(self, q: QueueKey, task_id: uuid.UUID, seq: uuid.UUID, payload: Payload) -> None:
        ends = payload.expires_at_ms if payload.expires_at_ms is not None else self._own_end(task_id)
        bucket = bucket_of_task(seq)
        index = self._bucket_index(q, LANE_FRESH, bucket, task_id, force=False, expires_at_ms=ends)
        token = payload.token
        created = None if payload.created_at_ms is None else to_datetime(payload.created_at_ms)
        entry = (
            *(q.owner, q.service, bucket, seq, task_id, token.nonce if token else None, created),
            *(payload.max_deliveries, payload.priority or None, ends, self.ttl_for(task_id, ends)),
        )
        await self._store("ready.enter_again.indexed", _with_index(index, ("ready.enter_again", entry)))
        self._remember_index(index)

    async def task_exists(self, q: QueueKey, task_id: uuid.UUID) -> bool:
        rows = await self.db.execute("ready.payload", (q.owner, q.service, bucket_of_task(task_id), task_id))
        return bool(rows)

    async def task_options(self, q: QueueKey, task_id: uuid.UUID) -> TaskOptions:
        rows = await self.db.execute("ready.options", (q.owner, q.service, bucket_of_task(task_id), task_id))
        if not rows:
            return TaskOptions()
        return TaskOptions(rows[0]["max_deliveries"], rows[0]["priority"] or 0)

    async def task_about(self, q: QueueKey, task_id: uuid.UUID) -> TaskAbout | None:
        rows = await self.db.execute("ready.about", (q.owner, q.service, bucket_of_task(task_id), task_id))
        if not rows or rows[0]["value_nonce"] is None:  # written with the value, in the same cells' life
            return None
        r = rows[0]
        created = None if r["created_at"] is None else to_ms(r["created_at"])
        return TaskAbout(created, r["token_nonce"] is not None, r.get("max_deliveries"), r.get("priority") or 0)

    async def stored_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        # One request per ready bucket (a partition): ``IN`` on the clustering key. Due tasks met by
        # one pass share their due time's bucket, nearly always one.
        by_bucket: dict[int, list[uuid.UUID]] = {}
        for task_id in task_ids:
            by_bucket.setdefault(bucket_of_task(task_id), []).append(task_id)
        found: set[uuid.UUID] = set()
        for bucket, ids in by_bucket.items():
            rows = await self.db.execute("ready.stored_many", (q.owner, q.service, bucket, ids))
            found.update(row["seq"] for row in rows)
        return found

    async def reindex_task(self, q: QueueKey, task_id: uuid.UUID) -> None:
        index = self._bucket_index(q, LANE_FRESH, bucket_of_task(task_id), task_id, force=True)
        if index is not None:  # forced: always one
            await self.db.execute("buckets.insert", index.params)
            self._remember_index(index)

    async def payload(self, q: QueueKey, task_id: uuid.UUID) -> Payload | None:
        rows = await self.db.execute("ready.payload", (q.owner, q.service, bucket_of_task(task_id), task_id))
        if not rows or rows[0]["value_ct"] is None:
            return None
        found = payload_of(rows[0])
        if found.expires_at_ms is None and (left := rows[0].get("value_ttl")) is not None:
            found = replace(found, expires_at_ms=self._end_by_row_ttl(task_id, int(left)))
        self._remember_end(task_id, found.expires_at_ms)  # for what this process writes about it next
        return found

    def _end_by_row_ttl(self, task_id: uuid.UUID, left_s: int) -> int:
        """The end of a task whose row records none (an older bridge stored it), by the row's own
        TTL: to the second, rounded up. This bridge's own computation when it is that one (the same
        TTL setting, nearly always), so that the lease agrees with the other bridges' guesses."""
        seen = self.now_ms() + (left_s + 1) * 1000
        own = self._own_end(task_id)
        return own if abs(seen - own) <= ROW_TTL_TOLERANCE_MS else seen

    async def record_message_id(self, q: QueueKey, message_id: str, task_id: uuid.UUID) -> uuid.UUID | None:
        try:
            rows = await self.db.execute(
                "idem.insert", (q.owner, q.service, message_id, task_id, self.ttl_for(task_id))
            )
        except UnknownOutcome:
            rows = await self.db.execute("idem.get", (q.owner, q.service, message_id), serial_read=True)
            if not rows:
                raise
            found: uuid.UUID = rows[0]["task_id"]
            return None if found == task_id else found
        row = rows[0]
        if row.get("[applied]"):
            return None
        existing: uuid.UUID = row["task_id"]
        return existing

    async def message_id_recorded_at(self, q: QueueKey, message_id: str) -> int | None:
        rows = await self.db.execute("idem.written", (q.owner, q.service, message_id), serial_read=True)
        written = rows[0]["written"] if rows else None
        return None if written is None else int(written) // 1000  # writetime: microseconds

    async def message_id_task(self, q: QueueKey, message_id: str) -> uuid.UUID | None:
        rows = await self.db.execute("idem.get", (q.owner, q.service, message_id))
        found: uuid.UUID | None = rows[0]["task_id"] if rows else None
        return found

    async def replace_message_id(self, q: QueueKey, message_id: str, old: uuid.UUID, new: uuid.UUID) -> bool:
        rows = await self.db.execute("idem.replace", (self.ttl_for(new), new, q.owner, q.service, message_id, old))
        return bool(rows and rows[0].get("[applied]"))

    # -- the ready index -------------------------------------------------------------------------
    async def cursor(self, q: QueueKey, lane: int) -> tuple[int, uuid.UUID] | None:
        rows = await self.db.execute("cursor.get", (q.owner, q.service, lane))
        return (rows[0]["bucket"], rows[0]["seq"]) if rows else None

    async def advance_cursor(self, q: QueueKey, lane: int, bucket: int, seq: uuid.UUID) -> None:
        # A cursor row must outlive every task after it: the full task lifetime from now, and at
        # least a month, the fleet's TTL being whatever: while BRIDGE_TASK_TTL was raised pod by
        # pod, a short-TTL bridge's head row (the rows behind it trimmed) expired after a quiet
        # spell, and scans started from the short TTL ago, past longer-lived tasks' entries.
        ttl = max(self.task_ttl_s, LOOP_CURSOR_TTL_S)
        await self.db.execute("cursor.advance", (q.owner, q.service, lane, bucket, seq, ttl))
        await self._trim_cursor(q, lane, bucket)

    async def _trim_cursor(self, q: QueueKey, lane: int, bucket: int) -> None:
        """Drop the lane's rows before ``bucket`` (every ``CURSOR_TRIM_EVERY_MS``): each advance
        inserts a row, and each bridge of a fleet writes its own, so a busy lane's partition grew
        with the fleet for the tasks' whole TTL (2 million rows a week at 100 bridges). Rows
        behind the position this bridge just wrote are never the greatest again (the position
        never moves back), so deleting them cannot move it; the delete comes after that write
        landed. A range tombstone lies behind the partition's head, which is all a read takes.
        A failed trim waits for the next period: nothing depends on it."""
        key = (q, lane)
        now = self.now_ms()
        last = self._cursor_trims.get(key)
        if last is not None and now - last < CURSOR_TRIM_EVERY_MS:
            return
        self._cursor_trims[key] = now
        self._cursor_trims.move_to_end(key)
        while len(self._cursor_trims) > MAX_REMEMBERED_BUCKETS:
            self._cursor_trims.popitem(last=False)
        try:
            await self.db.execute("cursor.trim", (q.owner, q.service, lane, bucket))
        except StorageError as exc:
            log.debug("scan position rows not trimmed: %s", type(exc).__name__)

    async def buckets_from(self, q: QueueKey, lane: int, bucket: int, limit: int) -> list[int]:
        rows = await self.db.execute("buckets.from", (q.owner, q.service, lane, bucket, limit))
        return [r["bucket"] for r in rows]

    async def scan(self, q: QueueKey, lane: int, bucket: int, after: uuid.UUID | None, limit: int) -> list[ReadyEntry]:
        rows = await self.db.execute("ready.scan", (q.owner, q.service, lane, bucket, after or MIN_TIMEUUID, limit))
        entries = [ready_entry(lane, bucket, r) for r in rows]
        for entry, r in zip(entries, rows, strict=True):
            self._remember_end(entry.task_id, r.get("expires_at"))  # a claim's write-ahead follows
        return entries

    async def mark_claimed(self, q: QueueKey, entry: ReadyEntry, *, expires_at_ms: int | None = None) -> None:
        ttl = self.ttl_for(entry.task_id, expires_at_ms)
        await self.db.execute("ready.mark_claimed", (ttl, q.owner, q.service, entry.lane, entry.bucket, entry.seq))

    async def expose_recovered(
        self, q: QueueKey, bucket: int, seq: uuid.UUID, task_id: uuid.UUID, epoch: int, has_token: bool
    ) -> None:
        # The scheduler read the task's lease just before (``leases_of``): its end of life is known.
        index = self._bucket_index(q, LANE_RECOVERED, bucket, task_id, force=False)
        marker = b"\x01" if has_token else None  # lane-0 rows say "has a token" by a non-null token_nonce
        params = (q.owner, q.service, bucket, seq, task_id, epoch, marker, self.ttl_for(task_id))
        await self._store("ready.insert_recovered.indexed", _with_index(index, ("ready.insert_recovered", params)))
        self._remember_index(index)

    # -- leases (LWT only) ---------------------------------------------------------------------------
    async def lease(self, q: QueueKey, task_id: uuid.UUID, *, serial: bool = True) -> Lease | None:
        rows = await self.db.execute("lease.get", (q.owner, q.service, task_id), serial_read=serial)
        if not rows:
            return None
        self._remember_end(task_id, rows[0].get("expires_at"))
        return lease_of(rows[0])

    async def decisions(self, q: QueueKey, task_id: uuid.UUID) -> frozenset[uuid.UUID]:
        rows = await self.db.execute("lease.decisions", (q.owner, q.service, task_id), serial_read=True)
        if not rows:
            return frozenset()
        row = rows[0]
        found = {row["completion_id"], row.get("park_id")} - {None}
        return frozenset(found) | uuid_set(row.get("park_ids"))

    async def leases_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Lease]:
        if not task_ids:
            return {}
        rows = await self.db.execute("lease.get_many", (q.owner, q.service, list(task_ids)))
        for row in rows:
            self._remember_end(row["task_id"], row.get("expires_at"))
        found = {row["task_id"]: lease_of(row) for row in rows}
        return {task_id: lease for task_id, lease in found.items() if lease is not None}

    async def errors_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Sealed]:
        if not task_ids:
            return {}
        rows = await self.db.execute("lease.errors", (q.owner, q.service, list(task_ids)))
        found = {row["task_id"]: sealed_error(row) for row in rows}
        return {task_id: error for task_id, error in found.items() if error is not None}

    def _in_time(self) -> bool:
        """One more statement would still be answered before the caller's deadline (with a margin
        for the reply's way back): else the unknown outcome goes to the caller as it is."""
        deadline = request_deadline_ms.get()
        if deadline is None or self.request_timeout_ms is None:
            return True
        return deadline - self.now_ms() >= self.request_timeout_ms + RESOLVE_MARGIN_MS

    async def _cas(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        attempt: Callable[[], Awaitable[list[Row]]],
        won: Callable[[Lease], bool],
        *,
        resend: bool = True,
    ) -> CasResult:
        """A compare-and-set of a lease; ``attempt`` sends it (each call the same statement: the same
        parameters and ids). An unknown outcome is settled by sending it once more, then by a SERIAL
        read that ``won`` judges (ours: ``won`` of the lease read). ``resend=False``: by the read
        alone, for a statement whose condition, once false, can turn true again."""
        try:
            return cas_result(await attempt())
        except UnknownOutcome:
            # Not settled by a read alone: a timed-out attempt may not have reached Paxos yet
            # (queued at a stalled coordinator, a GC pause) and commit after any read, which
            # would then have answered "not ours" for a lease that is ours (a result voided, a
            # task leased to a worker told it has none). The same compare-and-set is sent again
            # instead: applied, it is ours. Refused, its condition is false for good (a lease
            # that exists, an epoch that only grows, a lease that stays completed: see "the
            # lifecycle" below for each statement that is settled this way), so a late
            # first copy is refused too, and the SERIAL read after it says whose it is. A second
            # unknown outcome reaches the caller (``MaybeApplied``: answered ``unavailable``), as
            # does the first when a second try would end after the caller stopped listening.
            # Where the condition can hold again (``resend=False``), a refused resend would prove
            # nothing and an applied one could apply the write a second time: the read decides
            # alone, and a first copy landing after it is a known limit (docs/storage.md).
            if not self._in_time():
                raise
            try:
                if resend:
                    again = cas_result(await attempt())
                    if again.applied:
                        return again
                    if not self._in_time():
                        # The read too must end before the caller's deadline: read anyway, an ack
                        # was answered after its caller had given up and retried elsewhere.
                        raise UnknownOutcome("outcome unknown: no time left to read which copy applied")
                current = await self.lease(q, task_id, serial=True)
            except UnknownOutcome:
                raise
            except StorageError as exc:
                # The first copy may still have applied: the caller must hear "unknown" (it looks
                # the lease up later and counts what landed), not "unavailable", which says
                # nothing landed and left a claim or a completion that applied uncounted.
                raise UnknownOutcome(f"outcome unknown, and settling it failed: {exc}") from exc
            if current is not None and won(current):
                return CasResult(applied=True, current=None)
            return CasResult(applied=False, current=current, may_land_late=not resend)

    async def _resolve(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        attempt: Callable[[], Awaitable[list[Row]]],
        check: str,
        token: uuid.UUID,
    ) -> CasResult:
        """A claim's or a completion's compare-and-set: ours if the lease names its id (``check``)."""
        return await self._cas(q, task_id, attempt, lambda current: getattr(current, check) == token)

    async def claim_new(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        worker: str,
        until_ms: int,
        claim_id: uuid.UUID,
        *,
        has_token: bool | None = None,
        expires_at_ms: int | None = None,
    ) -> CasResult:
        until = to_datetime(until_ms)
        head = (q.owner, q.service, task_id, worker, until, claim_id, has_token)
        attempt = functools.partial(
            self._lease_insert,
            task_id,
            "lease.claim_new",
            lambda ttl, end: (*head, end, ttl),
            expires_at_ms=expires_at_ms,
            outlive_ms=until_ms,
        )
        return await self._resolve(q, task_id, attempt, "claim_id", claim_id)

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
        values = (expected_epoch + 1, worker, to_datetime(until_ms), claim_id, has_token)
        key = (q.owner, q.service, task_id, expected_epoch, to_datetime(expired_before_ms))
        attempt = functools.partial(
            self._lease_write,
            task_id,
            "lease.claim_expired",
            lambda ttl, end: (ttl, *values, end, *key, end),
            expires_at_ms=expires_at_ms,
            outlive_ms=until_ms,
        )
        return await self._resolve(q, task_id, attempt, "claim_id", claim_id)

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
        until, key = to_datetime(until_ms), (q.owner, q.service, task_id, epoch, worker)
        attempt: Callable[[], Awaitable[list[Row]]]
        if shorten_from_ms is not None:
            was = to_datetime(shorten_from_ms)
            attempt = functools.partial(
                self._lease_write,
                task_id,
                "lease.shorten",
                lambda ttl, end: (ttl, until, *key, was, end),
                outlive_ms=until_ms,
            )
        else:
            # Only to a deadline at or after the lease's (``lease_until <= ?``): refused, the row
            # reports the later one, and the caller shortens the lease once it has filed its deadline.
            attempt = functools.partial(
                self._lease_write,
                task_id,
                "lease.extend",
                lambda ttl, end: (ttl, until, *key, until, end),
                outlive_ms=until_ms,
            )
        # Resent: "held by this worker at this epoch" stays false once false ("the lifecycle" below).
        # A first copy that applied leaves it true (and its deadline ``until``): the resend writes the
        # same deadline again. A resend of ``lease.extend`` refused by a later deadline is judged by
        # the read: ours only if the lease ends at ours. A later one is a shortening that never
        # applied (or another extend of the worker's since), and the caller, told "refused" with the
        # lease read, shortens it (its deadline filed first): what it answers is what the lease says.
        return await self._cas(q, task_id, attempt, lambda c: c.held_by(worker, epoch) and c.lease_until_ms == until_ms)

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
        key = (q.owner, q.service, task_id, epoch, worker)
        # A completion that may owe the engine a result: its cells (``completion_id``) live as long
        # as that result may (``owed``); the rest of the lease, its epoch with it, ends with the task.
        values = (to_datetime(now_ms), completion_id)
        name = "lease.complete_tokenless" if tokenless else "lease.complete"
        attempt = functools.partial(
            self._lease_write, task_id, name, lambda ttl, end: (ttl, *values, *key, end), owed=not tokenless
        )
        return await self._resolve(q, task_id, attempt, "completion_id", completion_id)

    async def kill(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, now_ms: int, kill_id: uuid.UUID
    ) -> bool:
        now, key = to_datetime(now_ms), (q.owner, q.service, task_id, epoch, worker)
        attempt = functools.partial(
            self._lease_write, task_id, "lease.kill", lambda ttl, end: (ttl, now, kill_id, *key, end), owed=True
        )
        # Settled as a completion is (held by this worker at this epoch stays false once false):
        # an unknown outcome raised, the fetch was answered `unavailable`, the task was never
        # counted out of flight (until its TTL) and no dead letter was counted (found by review).
        return (await self._resolve(q, task_id, attempt, "completion_id", kill_id)).applied

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
        # The count to raise is the caller's read (SERIAL: this epoch's claim may not be on every
        # replica yet). Only this call changes it while the lease is held at this epoch by this
        # worker at the deadline read, which the compare-and-set checks; two racing calls write the
        # same value, and a repeat for the same epoch finds it marked.
        lease, epoch = read, read.epoch
        if not lease.held_by(worker, epoch) or lease.uncounted_epoch == epoch or lease.lease_until_ms is None:
            return False
        # A lookup that failed ends the run: the key may be there (a key server crash-looping, now
        # away, now answering "unknown key" while it loads, parked tasks whose key never left it).
        run = missing or NO_KEY_MISSING_RUN
        values: tuple[Any, ...] = (lease.uncounted + 1, epoch, run.claims, run.since_ms, run.mark)
        key = (q.owner, q.service, task_id, epoch, worker, to_datetime(lease.lease_until_ms))
        name = "lease.uncount"
        if until_ms is not None:
            name, values = "lease.let_go", (*values, to_datetime(until_ms))
        try:
            rows = await self._lease_write(
                task_id, name, lambda ttl, end: (ttl, *values, *key, end), outlive_ms=until_ms
            )
        except UnknownOutcome:
            return False  # not counted is the safe side: the task is delivered later all the same
        return bool(rows and rows[0].get("[applied]"))

    # -- the lifecycle (1.4) -----------------------------------------------------------------------------
    # An unknown outcome is settled by a resend (``_cas``) only where a refused resend proves that the
    # first copy can never apply: where the statement's condition, once false, stays false.
    # * "Held by this worker at this epoch" (extend, release, park_held) stays false: a worker is
    #   named at an epoch only by the claim that opened it (a later claim moves the epoch on, and
    #   epochs never go back), a release or a redrive names nobody, a parked lease goes back to
    #   leased only by a redrive (which clears the name), and the other states are final.
    # * "Leased at this epoch" (cancel, park_expired, cancel_expired) can hold again: a park then a
    #   redrive put the lease back to leased at the SAME epoch (a redrive keeps it), and its deadline
    #   then is the redriving bridge's now less the skew margin, at or before an earlier call's
    #   ``expired_before`` bound if that bridge's clock is behind the caller's. Their conditions
    #   also name the ``base_epoch`` the caller read, which that redrive moves on (to the epoch it
    #   put back; the caller read a lower one for any lease that can be parked at its limit), so a
    #   decision read before a park and a redrive no longer applies after them (a scheduler's park
    #   re-parked the task the operator had just redriven). Still, a lease extended past
    #   ``expired_before`` can run out again (shortened, or given back by a fail) at the same epoch.
    # * "Parked at this epoch" (unpark, cancel of a parked task) can hold again too: a park_expired
    #   of that epoch still on its way parks the redriven lease again (of a bridge before the
    #   ``base_epoch`` condition, during a rolling upgrade).
    # Those are settled by the SERIAL read alone, as before.

    async def release(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, until_ms: int, error: Sealed | None
    ) -> CasResult:
        sealed = (error.key_id, error.nonce, error.ciphertext) if error else (None, None, None)
        values, key = (to_datetime(until_ms), *sealed), (q.owner, q.service, task_id, epoch, worker)
        attempt = functools.partial(
            self._lease_write,
            task_id,
            "lease.release",
            lambda ttl, end: (ttl, *values, *key, end),
            outlive_ms=until_ms,
        )
        # Resent: "held by this worker at this epoch", false for good (above); its own write (the
        # worker cleared) makes it false, so the resend of an applied first copy is refused.
        return await self._cas(
            q, task_id, attempt, lambda c: c.held_by(NO_WORKER, epoch) and c.lease_until_ms == until_ms
        )

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
        # The earlier park's id joins the set too: a bridge before ``park_ids`` wrote only
        # ``park_id``, which this park overwrites; its result, still owed, was then judged never
        # applied by the relay and marked published unsent (test_rolling_upgrade.py).
        listed = {park_id} if earlier_park_id is None else {park_id, earlier_park_id}
        head = (to_datetime(now_ms), reason, park_id, park_id, listed)
        key = (q.owner, q.service, task_id)
        name: str
        tail: tuple[Any, ...]
        if worker is not None:
            sealed = (error.key_id, error.nonce, error.ciphertext) if error else (None, None, None)
            name, tail = "lease.park_held", (*head, *sealed, *key, epoch, worker)
            if until_ms is not None:
                name, tail = "lease.park_unopened", (*tail, to_datetime(until_ms))
        else:
            assert expired_before_ms is not None and base_epoch is not None
            cond = (epoch, to_datetime(expired_before_ms), base_epoch)
            name, tail = "lease.park_expired", (*head, *key, *cond)
        attempt = functools.partial(self._lease_write, task_id, name, lambda ttl, end: (ttl, *tail, end), owed=True)
        # park_held is resent ("held by this worker at this epoch": false for good, above), and
        # park_unopened (the same, at the deadline its claim wrote, which only the holder's renewals
        # move on: later each time, or shorter by a ``timeToRecover`` the worker names). Not
        # park_expired ("leased at this epoch, its deadline passed, never redriven since the read"),
        # which a park and a redrive at this epoch no longer satisfy (the redrive moves
        # ``base_epoch``), but which can still turn true again: a lease extended past the bound, then
        # shortened (``lease.shorten``) or given back by a fail, runs out once more. Settled by the
        # read alone, as before: a first copy landing after it is the known limit.
        resend = worker is not None
        # Ours if the lease still names it, or lists it: an applied park adds its id to park_ids,
        # which stays after a discard or a redrive that moved the lease on before the read.
        return await self._cas(
            q, task_id, attempt, lambda c: c.completion_id == park_id or park_id in c.park_ids, resend=resend
        )

    async def unpark(self, q: QueueKey, task_id: uuid.UUID, epoch: int, until_ms: int) -> CasResult:
        # Time-based: it also goes into ``park_ids`` (a set of timeuuids), where no claim overwrites it.
        claim_id = timeuuid_from_ms(self.now_ms())
        values, key = (epoch, to_datetime(until_ms), claim_id, {claim_id}), (q.owner, q.service, task_id, epoch)
        attempt = functools.partial(
            self._lease_write,
            task_id,
            "lease.unpark",
            lambda ttl, end: (ttl, *values, *key, end),
            outlive_ms=until_ms,
        )
        # By the read alone: "parked at this epoch" can hold again after a redrive (a late
        # park_expired of this epoch: above), and a resend could then undo that park, or be
        # refused while the first copy still lands after it. Ours if the lease names our id in
        # ``claim_id`` or in ``park_ids``: a worker's claim, moments after, overwrites the claim id,
        # not the set. Judged by "unparked at this epoch and claimed since", another redrive's
        # unpark (a retry on another bridge, `redrive all` beside a named one) was taken for ours:
        # the task counted ready twice and both answered redriven (found by review).
        return await self._cas(
            q, task_id, attempt, lambda c: c.claim_id == claim_id or claim_id in c.park_ids, resend=False
        )

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
        done_id = done_id or uuid.uuid4()
        now = to_datetime(self.now_ms())
        key = (q.owner, q.service, task_id)

        def won(current: Lease) -> bool:
            return current.completion_id == done_id

        if state is None:
            # Resent: a lease row, once written, stays for the task's life (none is ever deleted),
            # so an ``IF NOT EXISTS`` refused once is refused for good.
            insert = functools.partial(
                self._lease_insert, task_id, "lease.cancel_new", lambda ttl, end: (*key, now, done_id, end, ttl)
            )
            return await self._cas(q, task_id, insert, won)
        attempt: Callable[[], Awaitable[list[Row]]]
        # Only while the lease's base epoch is the one the caller read: a park and a redrive since
        # leave it leased (or parked) at the same epoch, but redriven.
        assert base_epoch is not None
        if expired_before_ms is not None:
            # The statement names both (purge, its one caller): another pair would be written as
            # this one here and as asked by the in-memory store.
            if state is not LeaseState.LEASED or to is not LeaseState.CANCELLED:
                raise ValueError("an expired lease is only cancelled from leased to cancelled")
            cond = (epoch, to_datetime(expired_before_ms), base_epoch)
            attempt = functools.partial(
                self._lease_write,
                task_id,
                "lease.cancel_expired",
                lambda ttl, end: (ttl, now, done_id, *key, *cond, end),
            )
        else:
            values, cond2 = (str(to), now, done_id), (str(state), epoch, base_epoch)
            attempt = functools.partial(
                self._lease_write, task_id, "lease.cancel", lambda ttl, end: (ttl, *values, *key, *cond2, end)
            )
        # Resent although "leased (or parked) at this epoch" can hold again (above): the target
        # state is final, so the two copies can never both apply, and an applied resend is a
        # cancel the caller asked for. Refused, it proves nothing: the read decides, and a first
        # copy landing after it is the known limit (docs/storage.md).
        return await self._cas(q, task_id, attempt, won)

    async def add_parked(self, q: QueueKey, entry: ParkedEntry) -> None:
        e = entry
        assert e.park_id is not None, "a park's row is keyed by its id"
        at, ttl = to_datetime(e.parked_at_ms), self.ttl_for(e.task_id)
        key = (q.owner, q.service, e.task_id)
        await asyncio.gather(
            self.db.execute("parked.insert", (*key, e.epoch, at, e.reason, e.has_token, e.park_id, ttl)),
            self.db.execute(
                "parks.insert", (*key, e.park_id, e.epoch, at, e.reason, e.has_token, ttl, e.parked_at_ms * 1000)
            ),
        )

    async def remove_park(self, q: QueueKey, task_id: uuid.UUID, park_id: uuid.UUID, parked_at_ms: int | None) -> None:
        # After the row's insert (stamped with its park's time) whatever this bridge's clock says.
        stamp_ms = max(self.now_ms(), (parked_at_ms or 0) + 1)
        await self.db.execute("parks.delete", (stamp_ms * 1000, q.owner, q.service, task_id, park_id))

    async def remove_parked(
        self, q: QueueKey, task_id: uuid.UUID, *, epoch: int | None = None, park_id: uuid.UUID | None = None
    ) -> None:
        if park_id is not None:
            await self.db.execute("parked.delete_if_park", (q.owner, q.service, task_id, park_id))
        elif epoch is not None:
            await self.db.execute("parked.delete_if_epoch", (q.owner, q.service, task_id, epoch))
        else:
            await self.db.execute("parked.delete", (q.owner, q.service, task_id))

    async def parked(
        self, q: QueueKey, limit: int, after: uuid.UUID | None = None, *, in_order: bool = True
    ) -> list[ParkedEntry]:
        params: tuple[Any, ...] = (q.owner, q.service, limit)
        names = ("parked.list", "parks.list")
        if after is not None:
            names, params = ("parked.list_after", "parks.list_after"), (q.owner, q.service, after, limit)
        per_task, per_park = await asyncio.gather(*(self.db.execute(name, params) for name in names))
        rows = [parked_entry(r) for r in per_task] + [parked_entry(r, in_parks=True) for r in per_park]
        if not in_order:
            return rows
        # The first ``limit`` rows of both, in the tables' own order (a stable sort keeps a task's
        # rows of ``parks`` in park order, before its row of ``parked``): each read holds its own
        # first ``limit``, so these are the first of the two together. Sorted by Python's uuid
        # order, a page could end past rows of another task of the same time not yet read. A page
        # can end between a task's rows: the next (``task_id > after``) passes the rest of them,
        # and the listing judges a task at its first row (``Lifecycle._scan_parked``).
        rows.sort(key=lambda e: (timeuuid_order(e.task_id), not e.in_parks))
        return rows[:limit]

    # -- queue counts ------------------------------------------------------------------------------------
    async def add_counts(self, q: QueueKey, day: int, ready: int, in_flight: int) -> None:
        await self.db.execute("counts.add", (ready, in_flight, q.owner, q.service, day))

    async def add_delayed(self, q: QueueKey, minute: int, delta: int) -> None:
        await self.db.execute("delayed.add", (delta, q.owner, q.service, minute))

    async def counts(self, q: QueueKey, since_day: int) -> tuple[int, int]:
        rows = await self.db.execute("counts.get", (q.owner, q.service, since_day))
        return sum(r["ready"] or 0 for r in rows), sum(r["in_flight"] or 0 for r in rows)

    async def delayed(self, q: QueueKey, since_minute: int) -> dict[int, int]:
        rows = await self.db.execute("delayed.get", (q.owner, q.service, since_minute), fetch_size=5000)
        return {r["minute"]: r["delayed"] or 0 for r in rows}

    async def trim_counts(self, q: QueueKey, before_day: int) -> None:
        await asyncio.gather(
            self.db.execute("counts.trim", (q.owner, q.service, before_day)),
            self.db.execute("delayed.trim", (q.owner, q.service, before_day * DAY_MS // MINUTE_MS)),
        )

    async def register_service(self, q: QueueKey) -> None:
        # Registered once a day per bridge (``WorkQueue._register``) and listed while any task
        # of the queue may live: a task added just before the next registration, due up to a
        # TTL later (a delayed task) and living a TTL from then. With the row's TTL equal to the
        # task TTL, a queue holding tasks dropped out of stats, the console and the gauges.
        ttl = min(2 * self.task_ttl_s + SERVICE_REGISTRATION_PERIOD_S, MAX_CASSANDRA_TTL_S)
        await self.db.execute("services.insert", (q.owner, q.service, ttl))

    async def services(self, owner: str, limit: int) -> list[str]:
        rows = await self.db.execute("services.of", (owner, limit), fetch_size=5000)
        return [r["service"] for r in rows]

    async def queues(self, limit: int) -> list[QueueKey]:
        rows = await self.db.execute("services.all", (limit,), fetch_size=5000)
        return [QueueKey(r["owner"], r["service"]) for r in rows]

    async def queue_page(self, after: QueueKey | None, limit: int) -> list[QueueKey]:
        # Token order: the rest of ``after``'s owner (its partition), then the owners after it.
        if after is None:
            rows = await self.db.execute("services.all", (limit,), fetch_size=limit)
        else:
            rows = await self.db.execute(
                "services.rest_of_owner", (after.owner, after.service, limit), fetch_size=limit
            )
            if len(rows) < limit:
                more = limit - len(rows)
                rows = [*rows, *await self.db.execute("services.after_owner", (after.owner, more), fetch_size=more)]
        return [QueueKey(r["owner"], r["service"]) for r in rows]

    async def queues_after_owner(self, owner: str, limit: int) -> list[QueueKey]:
        rows = await self.db.execute("services.after_owner", (owner, limit), fetch_size=limit)
        return [QueueKey(r["owner"], r["service"]) for r in rows]

    # -- worker pointers -------------------------------------------------------------------------------
    async def worker(self, q: QueueKey, worker: str) -> WorkerRow:
        return worker_row(await self.db.execute("worker.get", (q.owner, q.service, worker)))

    async def set_worker(self, q: QueueKey, worker: str, pointer: WorkerPointer, stamp: int) -> None:
        await self.db.execute("worker.set", self._worker_set(q, worker, pointer, stamp))

    def _worker_set(
        self,
        q: QueueKey,
        worker: str,
        pointer: WorkerPointer,
        stamp: int,
        *,
        expires_at_ms: int | None = None,
        outlive_ms: int | None = None,
    ) -> tuple[Any, ...]:
        p = pointer
        ttl = self.ttl_for(p.task_id, expires_at_ms, outlive_ms=outlive_ms)
        params = (ttl, stamp, p.task_id, p.epoch, p.has_token, stamp, p.granted_at_ms)
        return (*params, q.owner, q.service, worker)

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
        # Two partitions (up to five: the marks, a near deadline's second filing), one UNLOGGED
        # batch: the claim waits for both anyway, and one request
        # instead of two saves the bridge a request's CPU (per task, the larger cost) and
        # Cassandra a round of request handling; the coordinator still writes each partition.
        # A bucket not marked yet is marked in the same batch (one round trip, not two in a row):
        # the reply says every write in it was applied, so the mark is stored before the claim
        # exists, as when it was written first.
        # Both live the rest of the task's life; where it is not known yet (the task's row is read
        # beside this batch), at least until the lease's deadline is long past.
        insert = self._expiry_insert(bucket, entry, expires_at_ms)
        later, copy = self._backstop(bucket, entry, expires_at_ms)
        items = [*self._mark_if_new(bucket, insert[-1]), ("expiry.insert", insert), *copy]
        pointing = self._worker_set(
            q, worker, pointer, stamp, expires_at_ms=expires_at_ms, outlive_ms=entry.lease_until_ms
        )
        items.append(("worker.set", pointing))
        await self.db.execute_batch("fetch.write_ahead", items)
        self._remember_mark(bucket, later)

    async def finish_worker(self, q: QueueKey, worker: str, task_id: uuid.UUID, stamp: int) -> None:
        await self.db.execute("worker.finish", (self.ttl_for(task_id), stamp, task_id, q.owner, q.service, worker))

    async def clear_worker(self, q: QueueKey, worker: str, stamp: int) -> None:
        await self.db.execute("worker.clear", (stamp, stamp, q.owner, q.service, worker))

    # -- recovery timer wheel and outbox -----------------------------------------------------------------
    async def watch_expiry(self, bucket: int, entry: ExpiryEntry, *, backstop: bool = True) -> None:
        params = self._expiry_insert(bucket, entry)
        later, copy = self._backstop(bucket, entry) if backstop else (None, [])
        if bucket in self._marked and not copy:
            await self.db.execute("expiry.insert", params)
            return
        # The mark and the deadline it announces in one request: stored together when it succeeds.
        marked = [*self._mark_if_new(bucket, params[-1]), ("expiry.insert", params), *copy]
        await self.db.execute_batch("expiry.watch_marked", marked)
        self._remember_mark(bucket, later)

    def _backstop(
        self, bucket: int, entry: ExpiryEntry, expires_at_ms: int | None = None
    ) -> tuple[int | None, list[tuple[str, tuple[Any, ...]]]]:
        """A deadline filed moments ahead (its bucket ends within ``NEAR_DEADLINE_MS``) may be
        marked after the duty holder last read the marks (once a second) and pass its bucket's
        first pass unseen. Its bridge meets it with a timer (``WorkQueue.soon``); should that
        never run (the bridge stopped or died first), the same deadline is filed once more, in
        the bucket ``NEAR_DEADLINE_MS`` (and the skew margin) from now, whose mark the holder has
        read before that bucket ends: met then, a second or so late, not at the second pass
        (5 s). Met twice, a deadline is idempotent (a lease already taken back or renewed is left
        alone). Returns that bucket and its writes (None and none: not near)."""
        now = self.now_ms()
        # The duty holder's clock may be ahead of this bridge's by up to the skew margin.
        near = NEAR_DEADLINE_MS + self.skew_margin_ms
        later = expiry_bucket(now + near)
        if (bucket + 1) * EXPIRY_BUCKET_MS - now >= near:
            return None, []
        insert = self._expiry_insert(later, entry, expires_at_ms)
        return later, [*self._mark_if_new(later, insert[-1]), ("expiry.insert", insert)]

    def _mark_if_new(self, bucket: int, entry_ttl_s: int) -> list[tuple[str, tuple[Any, ...]]]:
        """The mark of an expiry bucket this process has not marked lately (the scheduler reads
        only marked buckets), to send with the first deadline filed under it (``entry_ttl_s``: that
        deadline row's TTL).

        It lives as long as that row, and this bridge's TTL past the bucket's end. A TTL counted
        from now fell short: a task delayed to near the end of its life is due in a bucket up to a
        TTL (and the skew margin) ahead, and a lease granted by a bridge with a shorter TTL than the
        task's (a rolling change of it) files its deadline beyond that bridge's TTL. The mark
        expired first, the scheduler never read the bucket, and the task was never announced or
        its lease never taken back (``test_hunt_time_boundaries.py``)."""
        if bucket in self._marked:
            return []
        ttl = max(entry_ttl_s, self._seconds_until((bucket + 1) * EXPIRY_BUCKET_MS + self.task_ttl_s * 1000))
        return [("expiry.mark", (bucket // MARK_HOUR_BUCKETS, bucket, ttl))]

    def _remember_mark(self, *buckets: int | None) -> None:
        """Only after the write that carried the marks succeeded (a failed one is sent again)."""
        for bucket in buckets:
            if bucket is not None and bucket not in self._marked:
                if len(self._marked) > MAX_REMEMBERED_BUCKETS:
                    self._marked.clear()
                self._marked.add(bucket)

    def _expiry_insert(self, bucket: int, entry: ExpiryEntry, expires_at_ms: int | None = None) -> tuple[Any, ...]:
        e = entry
        shard = shard_of(e.task_id, EXPIRY_SHARDS)
        params = (bucket, shard, to_datetime(e.lease_until_ms), e.queue.owner, e.queue.service, e.task_id, e.epoch)
        ttl = self.ttl_for(e.task_id, expires_at_ms, outlive_ms=e.lease_until_ms)  # read after its deadline
        return (*params, e.has_token, e.priority or None, ttl)

    async def expiries(self, bucket: int) -> list[ExpiryEntry]:
        reads = [self.db.execute("expiry.bucket", (bucket, ALL_EXPIRY_SHARDS), fetch_size=2000)]
        if self.read_unsharded:
            reads.append(self.db.execute("expiry.unsharded_bucket", (bucket,), fetch_size=2000))
        found = await asyncio.gather(*reads)
        return [expiry_entry(r) for rows in found for r in rows]

    def marked_here(self, bucket: int) -> bool:
        return bucket in self._marked

    async def marked_expiry_buckets(self, first: int, last: int) -> set[int]:
        found: set[int] = set()
        for hour in range(first // MARK_HOUR_BUCKETS, last // MARK_HOUR_BUCKETS + 1):
            rows = await self.db.execute("expiry.marks", (hour, first, last), fetch_size=5000)
            found.update(r["bucket"] for r in rows)
        return found

    async def insert_outbox(self, entry: OutboxEntry) -> None:
        e = entry
        params = (e.bucket, shard_of(e.task_id, OUTBOX_SHARDS), e.queue.owner, e.queue.service, e.task_id)
        sealed = (e.result.key_id, e.result.nonce, e.result.ciphertext)
        await self.db.execute("outbox.insert", (*params, e.completion_id, *sealed, self.owed_ttl_for(e.task_id)))

    async def keep_token(self, entry: OutboxEntry, token: Sealed, traceparent: str | None) -> None:
        e = entry
        if e.shard == UNSHARDED:
            return  # the table of bridges before 1.3 has no room for it: its rows end with the task
        key = (e.bucket, shard_of(e.task_id, OUTBOX_SHARDS), e.queue.owner, e.queue.service, e.task_id)
        sealed = (token.key_id, token.nonce, token.ciphertext, traceparent)
        result = (e.result.key_id, e.result.nonce, e.result.ciphertext)
        await self.db.execute(
            "outbox.keep_token", (self.owed_ttl_for(e.task_id), *sealed, *result, *key, e.completion_id)
        )

    async def mark_published(self, entry: OutboxEntry) -> None:
        e = entry
        key = (e.queue.owner, e.queue.service, e.task_id, e.completion_id)
        if e.shard == UNSHARDED:
            await self.db.execute("outbox.unsharded_mark_published", (self._published_ttl(e.task_id), e.bucket, *key))
            return
        shard = shard_of(e.task_id, OUTBOX_SHARDS)
        await self.db.execute("outbox.mark_published", (self._published_ttl(e.task_id), e.bucket, shard, *key))

    def _published_ttl(self, task_id: uuid.UUID) -> int:
        # Past its row's: a mark that ended before the result it marks (written by a bridge that
        # computed the task's end otherwise) made a result sent long ago read as owed again.
        return int(min(self.owed_ttl_for(task_id) + RESULT_OWED_MS // 1000, MAX_CASSANDRA_TTL_S))

    async def outbox(self, bucket: int) -> list[OutboxEntry]:
        return [entry async for page in self.outbox_pages(bucket) for entry in page]

    async def outbox_pages(self, bucket: int) -> AsyncIterator[list[OutboxEntry]]:
        # The bucket's keys first (a few dozen bytes a row, not each row's result), then the
        # unpublished entries whole, a page of OUTBOX_READS_AT_ONCE side by side: after a normal day
        # there are none; after a broker outage, hundreds, each result up to 1 MiB.
        # (keys read, entry read whole, the keys' parameters, the shard it is read from)
        tables: list[tuple[str, str, tuple[Any, ...], int | None]] = [
            ("outbox.bucket", "outbox.get", (bucket, ALL_OUTBOX_SHARDS), None)
        ]
        if self.read_unsharded:
            tables.append(("outbox.unsharded_bucket", "outbox.unsharded_get", (bucket,), UNSHARDED))
        owed: list[tuple[str, tuple[Any, ...], int | None]] = []
        for keys, entry_read, params, shard in tables:
            for r in await self.db.execute(keys, params, fetch_size=2000):
                if r["published"]:
                    continue
                key = (r["owner"], r["service"], r["task_id"], r["completion_id"])
                where = (bucket, *key) if shard == UNSHARDED else (bucket, shard_of(r["task_id"], OUTBOX_SHARDS), *key)
                owed.append((entry_read, where, shard))
        async for page in self._whole_entries(owed):
            yield page

    async def outbox_pages_of(self, bucket: int, keys: Sequence[OutboxKey]) -> AsyncIterator[list[OutboxEntry]]:
        owed: list[tuple[str, tuple[Any, ...], int | None]] = []
        for k in keys:
            key = (k.queue.owner, k.queue.service, k.task_id, k.completion_id)
            if k.shard == UNSHARDED:
                owed.append(("outbox.unsharded_get", (bucket, *key), UNSHARDED))
            else:
                owed.append(("outbox.get", (bucket, shard_of(k.task_id, OUTBOX_SHARDS), *key), None))
        async for page in self._whole_entries(owed, published_too=True):
            yield page

    async def _whole_entries(
        self, owed: list[tuple[str, tuple[Any, ...], int | None]], *, published_too: bool = False
    ) -> AsyncIterator[list[OutboxEntry]]:
        for start in range(0, len(owed), OUTBOX_READS_AT_ONCE):
            group = owed[start : start + OUTBOX_READS_AT_ONCE]
            wholes = await asyncio.gather(*(self.db.execute(name, params) for name, params, _ in group))
            page = [
                outbox_entry(r, shard)
                for (_, _, shard), whole in zip(group, wholes, strict=True)
                for r in whole
                # A row whose result cells ended (its token's live on, written later by a bridge
                # before 2026-12-07): nothing left to send, as an ended row.
                if r["result_ct"] is not None
            ]
            yield page if published_too else [entry for entry in page if not entry.published]

    # -- loop progress ---------------------------------------------------------------------------------
    async def scheduler_cursor(self, name: str, now_ms: int) -> int | None:
        """The newest day partition holding a position (a month back at most), else the
        pre-partitioned table's."""
        now_day = now_ms // DAY_MS
        for day in range(now_day, now_day - LOOP_CURSOR_MAX_DAYS - 1, -1):
            rows = await self.db.execute("sched.get", (name, day))
            if rows:
                return int(rows[0]["pos"])
        rows = await self.db.execute("sched.legacy_get", (name,))
        return int(rows[0]["pos"]) if rows else None

    async def advance_scheduler_cursor(self, name: str, pos: int, pos_ms: int) -> None:
        """Insert a position (the greatest row wins); its partition is the day it falls in."""
        await self.db.execute("sched.advance", (name, pos_ms // DAY_MS, pos, LOOP_CURSOR_TTL_S))

    # Owed positions are recorded in one partition of their own, each for as long as what it owes
    # lives (a result lives its task's life + 1 day). Recorded under their own day for 30 days, as
    # a position is, those of a fleet whose BRIDGE_TASK_TTL is over 29 days outlived their record:
    # a result nobody could take for a month was forgotten at the next duty handover, and owed
    # for good. (Records of earlier releases, in the day partitions, are still read.)
    async def owed_positions(self, name: str, now_ms: int) -> set[int]:
        found = {int(r["pos"]) for r in await self.db.execute("sched.list", (name, OWED_PARTITION))}
        now_day = now_ms // DAY_MS
        for day in range(now_day, now_day - LOOP_CURSOR_MAX_DAYS - 1, -1):
            found.update(int(r["pos"]) for r in await self.db.execute("sched.list", (name, day)))
        return found

    async def remember_owed(self, name: str, pos: int, pos_ms: int) -> None:
        life = min(max(LOOP_CURSOR_TTL_S, self.task_ttl_s + RESULT_OWED_MS // 1000), MAX_CASSANDRA_TTL_S)
        await self.db.execute("sched.advance", (name, OWED_PARTITION, pos, life))
        # Under its day as well, where a relay of an earlier release looks (a rolling upgrade, a
        # rollback): one write more per bucket that becomes owed, which is rare.
        await self.db.execute("sched.advance", (name, pos_ms // DAY_MS, pos, LOOP_CURSOR_TTL_S))

    async def forget_owed(self, name: str, pos: int, pos_ms: int) -> None:
        await self.db.execute("sched.forget", (name, OWED_PARTITION, pos))
        await self.db.execute("sched.forget", (name, pos_ms // DAY_MS, pos))  # an earlier release's record


__all__ = ["CassandraTaskStore"]
