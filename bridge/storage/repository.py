"""Every Cassandra query of the bridge, prepared once, with typed results.

This module knows CQL and the schema; it makes no queue decisions (that is ``bridge.domain``).
Statement names are listed in ``docs/storage.md`` with their round-trip cost.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.config import Settings
from bridge.storage.cassandra import CassandraSession, Row
from bridge.storage.errors import UnknownOutcome
from bridge.storage.schema import (
    ADDED_COLUMNS,
    EXPIRY_BUCKET_MS,
    LANE_FRESH,
    LANE_RECOVERED,
    OUTBOX_BUCKET_MS,
    READY_BUCKET_MS,
    SCHEMA_VERSION,
    all_cql,
)
from bridge.storage.timeuuid import MIN_TIMEUUID, bucket_of_task

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class QueueKey:
    owner: str
    service: str


@dataclass(frozen=True, slots=True)
class ReadyEntry:
    lane: int
    bucket: int
    seq: uuid.UUID
    task_id: uuid.UUID
    epoch: int | None  # lane 0: the epoch of the expired lease
    has_token: bool
    claimed: bool


@dataclass(frozen=True, slots=True)
class Payload:
    key_id: str
    value_nonce: bytes
    value_ct: bytes
    token_nonce: bytes | None
    token_ct: bytes | None
    traceparent: str | None
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class Lease:
    state: str
    epoch: int
    worker: str | None
    lease_until: datetime | None  # absent from an LWT's "not applied" row unless it was in the condition
    claim_id: uuid.UUID | None
    completion_id: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class WorkerPointer:
    task_id: uuid.UUID
    epoch: int
    has_token: bool
    done: bool = False  # the worker acked this task; kept so that a retried ack is answered true
    granted_at_ms: int | None = None  # when the bridge wrote it (its clock), just before the claim


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """The ``workers`` row as read: the pointer (None once cleared) and the row's write stamp."""

    pointer: WorkerPointer | None
    stamp: int | None  # microseconds: the next write of this row must use a greater timestamp


@dataclass(frozen=True, slots=True)
class CasResult:
    applied: bool
    current: Lease | None  # the row as the LWT saw it, when not applied


@dataclass(frozen=True, slots=True)
class ExpiryEntry:
    lease_until: datetime
    queue: QueueKey
    task_id: uuid.UUID
    epoch: int
    has_token: bool


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    bucket: int
    queue: QueueKey
    task_id: uuid.UUID
    completion_id: uuid.UUID
    key_id: str
    result_nonce: bytes
    result_ct: bytes
    published: bool


_LEASE_COLS = "state, epoch, worker, lease_until, claim_id, completion_id"

_STATEMENTS: dict[str, tuple[str, bool]] = {
    # name: (cql, idempotent). LWTs are not idempotent: their outcome is resolved by reading.
    "ready.insert": (
        "INSERT INTO {ks}.ready (owner, service, lane, bucket, seq, task_id, key_id, value_nonce, value_ct, "
        "token_nonce, token_ct, traceparent, created_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "USING TTL ?",
        True,
    ),
    "ready.insert_recovered": (
        "INSERT INTO {ks}.ready (owner, service, lane, bucket, seq, task_id, epoch, token_nonce) "
        "VALUES (?, ?, 0, ?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "ready.scan": (
        "SELECT seq, task_id, epoch, token_nonce, claimed FROM {ks}.ready "
        "WHERE owner = ? AND service = ? AND lane = ? AND bucket = ? AND seq > ? LIMIT ?",
        True,
    ),
    "ready.payload": (
        "SELECT key_id, value_nonce, value_ct, token_nonce, token_ct, traceparent, created_at FROM {ks}.ready "
        "WHERE owner = ? AND service = ? AND lane = 1 AND bucket = ? AND seq = ?",
        True,
    ),
    "ready.mark_claimed": (
        "UPDATE {ks}.ready USING TTL ? SET claimed = true "
        "WHERE owner = ? AND service = ? AND lane = ? AND bucket = ? AND seq = ?",
        True,
    ),
    "buckets.insert": (
        "INSERT INTO {ks}.ready_buckets (owner, service, lane, bucket) VALUES (?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "buckets.from": (
        "SELECT bucket FROM {ks}.ready_buckets WHERE owner = ? AND service = ? AND lane = ? AND bucket >= ? LIMIT ?",
        True,
    ),
    "cursor.get": (
        "SELECT bucket, seq FROM {ks}.cursors WHERE owner = ? AND service = ? AND lane = ? LIMIT 1",
        True,
    ),
    "cursor.advance": (
        "INSERT INTO {ks}.cursors (owner, service, lane, bucket, seq) VALUES (?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "lease.get": (
        f"SELECT {_LEASE_COLS} FROM {{ks}}.leases WHERE owner = ? AND service = ? AND task_id = ?",  # nosec B608
        True,
    ),
    "lease.claim_new": (
        "INSERT INTO {ks}.leases (owner, service, task_id, state, epoch, worker, lease_until, claim_id) "
        "VALUES (?, ?, ?, 'leased', 1, ?, ?, ?) IF NOT EXISTS USING TTL ?",
        False,
    ),
    "lease.claim_expired": (
        "UPDATE {ks}.leases USING TTL ? SET epoch = ?, worker = ?, lease_until = ?, claim_id = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? IF state = 'leased' AND epoch = ? AND lease_until <= ?",
        False,
    ),
    # The holder may extend even past its deadline as long as nobody re-claimed the task (the
    # epoch is unchanged): it was never anyone else's in between.
    "lease.extend": (
        "UPDATE {ks}.leases USING TTL ? SET lease_until = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ?",
        False,
    ),
    "lease.kill": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'dead', completed_at = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? IF state = 'leased' AND epoch = ? AND worker = ?",
        False,
    ),
    "lease.complete": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'done', completed_at = ?, completion_id = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? IF state = 'leased' AND epoch = ? AND worker = ?",
        False,
    ),
    # The worker pointer decides what a fetch re-sends and what a legacy ack completes, so it must
    # not be lost to last-write-wins between hosts whose clocks differ: every write carries an
    # explicit timestamp greater than the stamp it read (see ``next_stamp``), and it is never
    # deleted (a tombstone's stamp could not be read back), only nulled.
    "worker.get": (
        "SELECT task_id, epoch, has_token, done_task, stamp, granted_at FROM {ks}.workers "
        "WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "worker.set": (
        "UPDATE {ks}.workers USING TTL ? AND TIMESTAMP ? SET task_id = ?, epoch = ?, has_token = ?, "
        "stamp = ?, granted_at = ? WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "worker.finish": (
        "UPDATE {ks}.workers USING TTL ? AND TIMESTAMP ? SET done_task = ? "
        "WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "worker.clear": (
        "UPDATE {ks}.workers USING TIMESTAMP ? SET task_id = null, epoch = null, has_token = null, "
        "granted_at = null, stamp = ? WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "clock.now": ("SELECT toUnixTimestamp(now()) AS now_ms FROM system.local", True),
    "expiry.insert": (
        "INSERT INTO {ks}.expiries (bucket, lease_until, owner, service, task_id, epoch, has_token) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "expiry.bucket": (
        "SELECT lease_until, owner, service, task_id, epoch, has_token FROM {ks}.expiries WHERE bucket = ?",
        True,
    ),
    "outbox.insert": (
        "INSERT INTO {ks}.outbox (bucket, owner, service, task_id, completion_id, key_id, result_nonce, "
        "result_ct, published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, false) USING TTL ?",
        True,
    ),
    "outbox.mark_published": (
        "UPDATE {ks}.outbox USING TTL ? SET published = true "
        "WHERE bucket = ? AND owner = ? AND service = ? AND task_id = ? AND completion_id = ?",
        True,
    ),
    "outbox.bucket": (
        "SELECT bucket, owner, service, task_id, completion_id, key_id, result_nonce, result_ct, published "
        "FROM {ks}.outbox WHERE bucket = ?",
        True,
    ),
    "sched.get": ("SELECT pos FROM {ks}.scheduler_progress WHERE name = ? AND day = ? LIMIT 1", True),
    "sched.advance": ("INSERT INTO {ks}.scheduler_progress (name, day, pos) VALUES (?, ?, ?) USING TTL ?", True),
    "sched.legacy_get": ("SELECT pos FROM {ks}.scheduler_cursors WHERE name = ? LIMIT 1", True),
    "idem.insert": (
        "INSERT INTO {ks}.idempotency (owner, service, message_id, task_id) VALUES (?, ?, ?, ?) "
        "IF NOT EXISTS USING TTL ?",
        False,
    ),
    "idem.replace": (
        "UPDATE {ks}.idempotency USING TTL ? SET task_id = ? "
        "WHERE owner = ? AND service = ? AND message_id = ? IF task_id = ?",
        False,
    ),
    "idem.get": (
        "SELECT task_id FROM {ks}.idempotency WHERE owner = ? AND service = ? AND message_id = ?",
        True,
    ),
    "ping": ("SELECT release_version FROM system.local", True),
}


def _lease(row: Row) -> Lease | None:
    if row.get("state") is None or row.get("epoch") is None:
        return None
    return Lease(
        state=row["state"],
        epoch=row["epoch"],
        worker=row.get("worker"),
        lease_until=row.get("lease_until"),
        claim_id=row.get("claim_id"),
        completion_id=row.get("completion_id"),
    )


def _cas(rows: list[Row]) -> CasResult:
    row = rows[0] if rows else {}
    applied = bool(row.get("[applied]"))
    return CasResult(applied=applied, current=None if applied else _lease(row))


class TaskRepository:
    def __init__(self, db: CassandraSession) -> None:
        self.db = db

    # -- setup -----------------------------------------------------------------------------
    async def create_schema(self, settings: Settings) -> None:
        for cql in all_cql(settings.cassandra_keyspace, settings.cassandra_replication, settings.task_ttl_seconds):
            await self.db.execute_raw(cql)
        for table, column, cql_type in ADDED_COLUMNS:
            # Only constants of this package (ADDED_COLUMNS) and the keyspace name, which the
            # settings restrict to [A-Za-z][A-Za-z0-9_]*: nothing a caller controls.
            rows = await self.db.execute_raw(
                "SELECT column_name FROM system_schema.columns WHERE keyspace_name = '{ks}' "  # nosec B608
                f"AND table_name = '{table}' AND column_name = '{column}'"
            )
            if not rows:
                await self.db.execute_raw(f"ALTER TABLE {{ks}}.{table} ADD {column} {cql_type}")  # nosec B608
        await self.db.execute_raw(
            "INSERT INTO {ks}.schema_meta (name, version, ready_bucket_ms, expiry_bucket_ms, outbox_bucket_ms) "  # nosec B608
            f"VALUES ('queue-bridge', {SCHEMA_VERSION}, {READY_BUCKET_MS}, {EXPIRY_BUCKET_MS}, "
            f"{OUTBOX_BUCKET_MS}) IF NOT EXISTS"
        )

    async def prepare(self) -> None:
        for name, (cql, idempotent) in _STATEMENTS.items():
            await self.db.prepare(name, cql, idempotent=idempotent)

    async def ping(self) -> str:
        rows = await self.db.execute("ping")
        return str(rows[0]["release_version"]) if rows else "?"

    async def server_time_ms(self) -> int:
        """The coordinator's clock: the shared reference every bridge measures its skew against."""
        rows = await self.db.execute("clock.now")
        return int(rows[0]["now_ms"])

    # -- add -------------------------------------------------------------------------------
    async def insert_task(self, q: QueueKey, task_id: uuid.UUID, payload: Payload, ttl: int) -> None:
        await self.db.execute(
            "ready.insert",
            (
                q.owner,
                q.service,
                bucket_of_task(task_id),
                task_id,
                task_id,
                payload.key_id,
                payload.value_nonce,
                payload.value_ct,
                payload.token_nonce,
                payload.token_ct,
                payload.traceparent,
                payload.created_at,
                ttl,
            ),
        )

    async def register_bucket(self, q: QueueKey, lane: int, bucket: int, ttl: int) -> None:
        await self.db.execute("buckets.insert", (q.owner, q.service, lane, bucket, ttl))

    async def task_exists(self, q: QueueKey, task_id: uuid.UUID) -> bool:
        rows = await self.db.execute("ready.payload", (q.owner, q.service, bucket_of_task(task_id), task_id))
        return bool(rows)

    async def claim_message_id(self, q: QueueKey, message_id: str, task_id: uuid.UUID, ttl: int) -> uuid.UUID | None:
        """Record message_id -> task_id. Returns None when we won, else the task id already recorded."""
        try:
            rows = await self.db.execute("idem.insert", (q.owner, q.service, message_id, task_id, ttl))
        except UnknownOutcome:
            rows = await self.db.execute("idem.get", (q.owner, q.service, message_id), serial_read=True)
            if rows and rows[0]["task_id"] == task_id:
                return None
            if rows:
                existing: uuid.UUID = rows[0]["task_id"]
                return existing
            raise
        row = rows[0]
        if row.get("[applied]"):
            return None
        existing_id: uuid.UUID = row["task_id"]
        return existing_id

    async def replace_message_id(self, q: QueueKey, message_id: str, old: uuid.UUID, new: uuid.UUID, ttl: int) -> bool:
        rows = await self.db.execute("idem.replace", (ttl, new, q.owner, q.service, message_id, old))
        return bool(rows and rows[0].get("[applied]"))

    # -- scanning ----------------------------------------------------------------------------
    async def cursor(self, q: QueueKey, lane: int) -> tuple[int, uuid.UUID] | None:
        rows = await self.db.execute("cursor.get", (q.owner, q.service, lane))
        return (rows[0]["bucket"], rows[0]["seq"]) if rows else None

    async def advance_cursor(self, q: QueueKey, lane: int, bucket: int, seq: uuid.UUID, ttl: int) -> None:
        await self.db.execute("cursor.advance", (q.owner, q.service, lane, bucket, seq, ttl))

    async def buckets_from(self, q: QueueKey, lane: int, bucket: int, limit: int) -> list[int]:
        rows = await self.db.execute("buckets.from", (q.owner, q.service, lane, bucket, limit))
        return [r["bucket"] for r in rows]

    async def scan(self, q: QueueKey, lane: int, bucket: int, after: uuid.UUID | None, limit: int) -> list[ReadyEntry]:
        rows = await self.db.execute("ready.scan", (q.owner, q.service, lane, bucket, after or MIN_TIMEUUID, limit))
        return [
            ReadyEntry(
                lane=lane,
                bucket=bucket,
                seq=r["seq"],
                task_id=r["task_id"] or r["seq"],
                epoch=r["epoch"],
                has_token=r["token_nonce"] is not None,
                claimed=bool(r["claimed"]),
            )
            for r in rows
        ]

    async def payload(self, q: QueueKey, task_id: uuid.UUID) -> Payload | None:
        rows = await self.db.execute("ready.payload", (q.owner, q.service, bucket_of_task(task_id), task_id))
        if not rows or rows[0]["value_ct"] is None:
            return None
        r = rows[0]
        return Payload(
            key_id=r["key_id"],
            value_nonce=r["value_nonce"],
            value_ct=r["value_ct"],
            token_nonce=r["token_nonce"],
            token_ct=r["token_ct"],
            traceparent=r["traceparent"],
            created_at=r["created_at"],
        )

    async def mark_claimed(self, q: QueueKey, entry: ReadyEntry, ttl: int) -> None:
        await self.db.execute("ready.mark_claimed", (ttl, q.owner, q.service, entry.lane, entry.bucket, entry.seq))

    async def insert_recovered(
        self,
        q: QueueKey,
        bucket: int,
        seq: uuid.UUID,
        task_id: uuid.UUID,
        epoch: int,
        has_token: bool,
        ttl: int,
    ) -> None:
        marker = b"\x01" if has_token else None
        await self.db.execute("ready.insert_recovered", (q.owner, q.service, bucket, seq, task_id, epoch, marker, ttl))

    # -- leases (LWT only) -------------------------------------------------------------------
    async def lease(self, q: QueueKey, task_id: uuid.UUID, *, serial: bool = True) -> Lease | None:
        rows = await self.db.execute("lease.get", (q.owner, q.service, task_id), serial_read=serial)
        return _lease(rows[0]) if rows else None

    async def _resolve(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        name: str,
        params: tuple[Any, ...],
        check: str,
        token: uuid.UUID,
    ) -> CasResult:
        try:
            return _cas(await self.db.execute(name, params))
        except UnknownOutcome:
            # The Paxos round may or may not have committed: a SERIAL read finishes any in-flight
            # round and tells us whether OUR attempt (identified by its random token) won.
            current = await self.lease(q, task_id, serial=True)
            if current is not None and getattr(current, check) == token:
                return CasResult(applied=True, current=None)
            return CasResult(applied=False, current=current)

    async def claim_new(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        worker: str,
        lease_until: datetime,
        claim_id: uuid.UUID,
        ttl: int,
    ) -> CasResult:
        return await self._resolve(
            q,
            task_id,
            "lease.claim_new",
            (q.owner, q.service, task_id, worker, lease_until, claim_id, ttl),
            "claim_id",
            claim_id,
        )

    async def claim_expired(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        expected_epoch: int,
        worker: str,
        lease_until: datetime,
        now: datetime,
        claim_id: uuid.UUID,
        ttl: int,
    ) -> CasResult:
        return await self._resolve(
            q,
            task_id,
            "lease.claim_expired",
            (
                ttl,
                expected_epoch + 1,
                worker,
                lease_until,
                claim_id,
                q.owner,
                q.service,
                task_id,
                expected_epoch,
                now,
            ),
            "claim_id",
            claim_id,
        )

    async def extend(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        worker: str,
        lease_until: datetime,
        ttl: int,
    ) -> CasResult:
        try:
            return _cas(
                await self.db.execute("lease.extend", (ttl, lease_until, q.owner, q.service, task_id, epoch, worker))
            )
        except UnknownOutcome:
            current = await self.lease(q, task_id, serial=True)
            ok = (
                current is not None
                and current.state == "leased"
                and current.epoch == epoch
                and current.worker == worker
                and current.lease_until is not None
                and current.lease_until >= lease_until.replace(tzinfo=None)
            )
            return CasResult(applied=ok, current=None if ok else current)

    async def complete(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        worker: str,
        now: datetime,
        completion_id: uuid.UUID,
        ttl: int,
    ) -> CasResult:
        return await self._resolve(
            q,
            task_id,
            "lease.complete",
            (ttl, now, completion_id, q.owner, q.service, task_id, epoch, worker),
            "completion_id",
            completion_id,
        )

    async def kill(self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, now: datetime, ttl: int) -> bool:
        """Dead-letter a task that can never be delivered (its ciphertext failed authentication)."""
        rows = await self.db.execute("lease.kill", (ttl, now, q.owner, q.service, task_id, epoch, worker))
        return bool(rows and rows[0].get("[applied]"))

    # -- worker pointers -----------------------------------------------------------------------
    async def worker(self, q: QueueKey, worker: str) -> WorkerRow:
        rows = await self.db.execute("worker.get", (q.owner, q.service, worker))
        if not rows:
            return WorkerRow(None, None)
        r = rows[0]
        if r["task_id"] is None or r["epoch"] is None:
            return WorkerRow(None, r["stamp"])
        pointer = WorkerPointer(
            task_id=r["task_id"],
            epoch=r["epoch"],
            has_token=bool(r["has_token"]),
            done=r["done_task"] is not None and r["done_task"] == r["task_id"],
            granted_at_ms=r["granted_at"],
        )
        return WorkerRow(pointer, r["stamp"])

    async def set_worker(self, q: QueueKey, worker: str, ptr: WorkerPointer, stamp: int, ttl: int) -> None:
        await self.db.execute(
            "worker.set",
            (ttl, stamp, ptr.task_id, ptr.epoch, ptr.has_token, stamp, ptr.granted_at_ms, q.owner, q.service, worker),
        )

    async def finish_worker(self, q: QueueKey, worker: str, task_id: uuid.UUID, stamp: int, ttl: int) -> None:
        await self.db.execute("worker.finish", (ttl, stamp, task_id, q.owner, q.service, worker))

    async def clear_worker(self, q: QueueKey, worker: str, stamp: int) -> None:
        await self.db.execute("worker.clear", (stamp, stamp, q.owner, q.service, worker))

    # -- expiries ------------------------------------------------------------------------------
    async def insert_expiry(self, bucket: int, e: ExpiryEntry, ttl: int) -> None:
        await self.db.execute(
            "expiry.insert",
            (bucket, e.lease_until, e.queue.owner, e.queue.service, e.task_id, e.epoch, e.has_token, ttl),
        )

    async def expiries(self, bucket: int) -> list[ExpiryEntry]:
        rows = await self.db.execute("expiry.bucket", (bucket,), fetch_size=2000)
        return [
            ExpiryEntry(
                lease_until=r["lease_until"],
                queue=QueueKey(r["owner"], r["service"]),
                task_id=r["task_id"],
                epoch=r["epoch"],
                has_token=bool(r["has_token"]),
            )
            for r in rows
        ]

    # -- outbox --------------------------------------------------------------------------------
    async def insert_outbox(self, e: OutboxEntry, ttl: int) -> None:
        await self.db.execute(
            "outbox.insert",
            (
                e.bucket,
                e.queue.owner,
                e.queue.service,
                e.task_id,
                e.completion_id,
                e.key_id,
                e.result_nonce,
                e.result_ct,
                ttl,
            ),
        )

    async def mark_published(self, e: OutboxEntry, ttl: int) -> None:
        await self.db.execute(
            "outbox.mark_published",
            (ttl, e.bucket, e.queue.owner, e.queue.service, e.task_id, e.completion_id),
        )

    async def outbox(self, bucket: int) -> list[OutboxEntry]:
        rows = await self.db.execute("outbox.bucket", (bucket,), fetch_size=2000)
        return [
            OutboxEntry(
                bucket=r["bucket"],
                queue=QueueKey(r["owner"], r["service"]),
                task_id=r["task_id"],
                completion_id=r["completion_id"],
                key_id=r["key_id"],
                result_nonce=r["result_nonce"],
                result_ct=r["result_ct"],
                published=bool(r["published"]),
            )
            for r in rows
        ]

    # -- scheduler cursors -----------------------------------------------------------------------
    async def scheduler_cursor(self, name: str, now_day: int, max_days: int) -> int | None:
        """The greatest persisted position of a scheduler loop: the newest day partition that has
        one (at most ``max_days`` back from ``now_day``), else the pre-partitioned table's."""
        for day in range(now_day, now_day - max_days - 1, -1):
            rows = await self.db.execute("sched.get", (name, day))
            if rows:
                return int(rows[0]["pos"])
        rows = await self.db.execute("sched.legacy_get", (name,))
        return int(rows[0]["pos"]) if rows else None

    async def advance_scheduler_cursor(self, name: str, pos: int, pos_ms: int, ttl: int) -> None:
        """Insert a position (the greatest row wins); its partition is the day it falls in."""
        await self.db.execute("sched.advance", (name, pos_ms // DAY_MS, pos, ttl))


__all__ = [
    "LANE_FRESH",
    "LANE_RECOVERED",
    "CasResult",
    "ExpiryEntry",
    "Lease",
    "OutboxEntry",
    "Payload",
    "QueueKey",
    "ReadyEntry",
    "TaskRepository",
    "WorkerPointer",
    "WorkerRow",
]
