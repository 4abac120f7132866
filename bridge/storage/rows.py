"""Cassandra rows <-> the domain's records: datetimes to milliseconds, column groups to ``Sealed``."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

from bridge.crypto import Sealed
from bridge.domain.records import (
    CasResult,
    ExpiryEntry,
    Lease,
    LeaseState,
    OutboxEntry,
    ParkedEntry,
    Payload,
    QueueKey,
    ReadyEntry,
    WorkerPointer,
    WorkerRow,
)
from bridge.storage.cassandra import Row


def to_datetime(ms: int) -> datetime:
    """Naive UTC datetime, the form cassandra-driver reads and writes for `timestamp`."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).replace(tzinfo=None)


def to_ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def lease_of(row: Row) -> Lease | None:
    if row.get("state") is None or row.get("epoch") is None:
        return None
    until = row.get("lease_until")
    return Lease(
        state=LeaseState(row["state"]),
        epoch=row["epoch"],
        worker=row.get("worker"),
        lease_until_ms=None if until is None else to_ms(until),
        claim_id=row.get("claim_id"),
        completion_id=row.get("completion_id"),
        has_token=row.get("has_token"),
        base_epoch=row.get("base_epoch") or 0,
        parked_at_ms=None if row.get("parked_at") is None else to_ms(row["parked_at"]),
        park_reason=row.get("park_reason"),
        last_error=sealed_error(row),
        completed_at_ms=None if row.get("completed_at") is None else to_ms(row["completed_at"]),
        uncounted=row.get("uncounted") or 0,
        uncounted_epoch=row.get("uncounted_epoch"),
        key_missing=row.get("key_missing") or 0,
        key_missing_since_ms=row.get("key_missing_since") or 0,
        key_missing_mark=row.get("key_missing_mark"),
        park_id=row.get("park_id"),
        park_ids=uuid_set(row.get("park_ids")),
    )


def uuid_set(value: Iterable[uuid.UUID | str] | None) -> frozenset[uuid.UUID]:
    """A ``set<timeuuid>`` column: None when empty (Cassandra stores no empty collection), and its
    elements text with acsylla (whose adapter turns back only uuid columns, not collections)."""
    return frozenset(v if isinstance(v, uuid.UUID) else uuid.UUID(v) for v in value or ())


def sealed_error(row: Row) -> Sealed | None:
    if row.get("error_ct") is None or row.get("error_key") is None:
        return None
    return Sealed(row["error_key"], row["error_nonce"], row["error_ct"])


def parked_entry(r: Row, *, in_parks: bool = False) -> ParkedEntry:
    at = to_ms(r["parked_at"])
    return ParkedEntry(r["task_id"], r["epoch"], at, r["reason"], bool(r["has_token"]), r.get("park_id"), in_parks)


def timeuuid_order(u: uuid.UUID) -> tuple[int, tuple[int, ...]]:
    """Cassandra's order of ``timeuuid`` clustering keys: by time, then the last eight bytes each
    compared signed (``TimeUUIDType``). Python's own uuid order differs for ids of one time (tasks
    delayed to one instant share it), and rows of two tables merged by it were read past."""
    return (u.time, tuple(b - 256 if b > 127 else b for b in u.bytes[8:]))


def cas_result(rows: list[Row]) -> CasResult:
    row = rows[0] if rows else {}
    applied = bool(row.get("[applied]"))
    return CasResult(applied=applied, current=None if applied else lease_of(row))


def worker_row(rows: list[Row]) -> WorkerRow:
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


def payload_of(r: Row) -> Payload:
    key_id = r["key_id"]
    token = None if r["token_ct"] is None else Sealed(key_id, r["token_nonce"], r["token_ct"])
    created = r["created_at"]
    return Payload(
        value=Sealed(key_id, r["value_nonce"], r["value_ct"]),
        token=token,
        traceparent=r["traceparent"],
        created_at_ms=None if created is None else to_ms(created),
        max_deliveries=r.get("max_deliveries"),
        priority=r.get("priority") or 0,
        expires_at_ms=r.get("expires_at"),  # None in a row an older bridge wrote
    )


def ready_entry(lane: int, bucket: int, r: Row) -> ReadyEntry:
    return ReadyEntry(
        lane=lane,
        bucket=bucket,
        seq=r["seq"],
        task_id=r["task_id"] or r["seq"],
        epoch=r["epoch"],
        has_token=r["token_nonce"] is not None,  # lane 0 marks "has a token" by a non-null token_nonce
        claimed=bool(r["claimed"]),
        created_at_ms=None if (created := r.get("created_at")) is None else to_ms(created),
    )


def expiry_entry(r: Row) -> ExpiryEntry:
    queue = QueueKey(r["owner"], r["service"])
    return ExpiryEntry(
        to_ms(r["lease_until"]), queue, r["task_id"], r["epoch"], bool(r["has_token"]), r.get("priority") or 0
    )


def outbox_entry(r: Row, shard: int | None = None) -> OutboxEntry:
    return OutboxEntry(
        bucket=r["bucket"],
        queue=QueueKey(r["owner"], r["service"]),
        task_id=r["task_id"],
        completion_id=r["completion_id"],
        result=Sealed(r["key_id"], r["result_nonce"], r["result_ct"]),
        published=bool(r["published"]),
        shard=shard,
        token=None if r.get("token_ct") is None else Sealed(r["token_key"], r["token_nonce"], r["token_ct"]),
        traceparent=r.get("traceparent"),
    )
