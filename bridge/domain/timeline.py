"""Time in the queue: task ids that sort by time, and the time slots of the queue's indexes.

A task id is a version-1 (time) UUID: stores sort them by their timestamp, so the id is also the
task's place in its queue, and the slot of a task is derived from its id alone.

The slot widths are the granularity of the queue's timelines: the ready index is read slot by
slot, lease deadlines are kept in a timer wheel of ``EXPIRY_BUCKET_MS`` slots, completions awaiting
publication in ``OUTBOX_BUCKET_MS`` slots. They are part of the stored layout (a store records them
and changing one needs a migration), but what a slot *means* is a queue rule, so they live here.
"""

from __future__ import annotations

import hashlib
import random
import uuid
import zlib

READY_BUCKET_MS = 10_000
EXPIRY_BUCKET_MS = 250
OUTBOX_BUCKET_MS = 10_000
# The duty holder reads the expiry marks once this often (``RecoveryScheduler``), two seconds
# ahead: a bucket's first pass knows of every deadline whose mark was stored at least this long
# and a bucket before the bucket ended.
MARKS_REFRESH_MS = 1_000
# A deadline filed closer than this to its bucket's end (moments ahead: a short lease, backoff,
# delay or re-arm) may pass its bucket's first pass unseen; its bridge meets it with a timer, and
# it is filed once more this far ahead (a backstop: a refresh, a bucket, and a write's time), met
# by that bucket's first pass should the timer never run (the bridge stopped or died).
NEAR_DEADLINE_MS = 1_500
# How long past its task's end a result still owed to the engine can be sent: its outbox row and
# the decision on the lease (the completion, the park) live that much longer than the task, and
# its token is copied into the outbox row once a publish of it fails (the task's own row, which
# holds the token, ends with the task). Without it a result decided near the task's end, during
# a broker outage or with no queue bound, was dropped unsent once the task's rows expired.
RESULT_OWED_MS = 86_400_000

# 100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch.
_UUID_EPOCH_OFFSET = 0x01B21DD213814000

MIN_TIMEUUID = uuid.UUID("00000000-0000-1000-8080-808080808080")  # Cassandra's minTimeuuid(0) shape


def timeuuid_from_ms(ms: int, *, node: int | None = None, clock_seq: int | None = None) -> uuid.UUID:
    ticks = ms * 10_000 + _UUID_EPOCH_OFFSET
    if node is None:
        # Uniqueness, not secrecy; multicast bit set.
        node = random.getrandbits(48) | 0x010000000000  # nosec B311
    if clock_seq is None:
        # Uniqueness, not secrecy.
        clock_seq = random.getrandbits(14)  # nosec B311
    time_low = ticks & 0xFFFFFFFF
    time_mid = (ticks >> 32) & 0xFFFF
    time_hi_version = ((ticks >> 48) & 0x0FFF) | 0x1000
    clock_seq_low = clock_seq & 0xFF
    clock_seq_hi_variant = ((clock_seq >> 8) & 0x3F) | 0x80
    return uuid.UUID(
        fields=(
            time_low,
            time_mid,
            time_hi_version,
            clock_seq_hi_variant,
            clock_seq_low,
            node & 0xFFFFFFFFFFFF,
        )
    )


def new_task_id(now_ms: int) -> uuid.UUID:
    return timeuuid_from_ms(now_ms)


def deterministic_timeuuid(ms: int, *parts: object) -> uuid.UUID:
    """The same inputs give the same id: lets every bridge instance write the same row, idempotently."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "big")
    return timeuuid_from_ms(ms, node=(value & 0xFFFFFFFFFFFF) | 0x010000000000, clock_seq=(value >> 48) & 0x3FFF)


def ms_of(task_id: uuid.UUID) -> int:
    return (task_id.time - _UUID_EPOCH_OFFSET) // 10_000


def bucket_of_task(task_id: uuid.UUID) -> int:
    return ms_of(task_id) // READY_BUCKET_MS


def ready_bucket(ms: int) -> int:
    return ms // READY_BUCKET_MS


def expiry_bucket(ms: int) -> int:
    return ms // EXPIRY_BUCKET_MS


def outbox_bucket(ms: int) -> int:
    return ms // OUTBOX_BUCKET_MS


# Deadlines and owed results are spread over this many partitions per time bucket, so that no
# partition (no replica set of the cluster) takes every claim or completion of a time window.
EXPIRY_SHARDS = 8
OUTBOX_SHARDS = 8


def shard_of(task_id: uuid.UUID, shards: int) -> int:
    """The shard of a task's deadline or result: a checksum of its id (the low bits of a time UUID
    are the same for every id of one process, and its time is in whole milliseconds)."""
    return zlib.crc32(task_id.bytes) % shards
