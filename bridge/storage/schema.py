"""The Cassandra schema, as CQL. ``docs/storage.md`` explains every table and why it is shaped so.

Layout rules that every statement in ``statements.py`` follows:
- ``ready`` rows are written once (plain INSERT) and never deleted: consuming a task never creates a
  tombstone on the hot read path. Partitions are time buckets, so they stay bounded.
- ``leases`` holds all mutable task state, one partition per task, and is written ONLY with
  lightweight transactions (Paxos), so claims of different tasks never contend.
- Everything carries a TTL so that a task, its lease, its pointers and its outbox entry all vanish
  together when the task's lifetime ends: the one its add fixed (``expires_at``), not the writing
  bridge's own BRIDGE_TASK_TTL.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from bridge.config import ConfigError
from bridge.domain.timeline import EXPIRY_BUCKET_MS, OUTBOX_BUCKET_MS, READY_BUCKET_MS
from bridge.storage.errors import InvalidQuery, SchemaMissing, StorageUnavailable

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.storage.session import CqlSession

log = logging.getLogger("bridge.schema")

SCHEMA_VERSION = 1
SCHEMA_SETTLE_S = 30.0  # how long a bridge waits for columns another bridge is adding
SCHEMA_RETRY_S = 0.1  # first wait before preparing again what a node does not serve yet (doubling to 2 s)
LAYOUT_NAME = "queue-bridge"  # the schema_meta row of the layout
# Tables whose reads pass over their tombstones from a partition's start: `parked` and `parks` (a
# row deleted at each redrive, discard or cancel of a parked task) and `cursors` (rows that expire). Cassandra
# keeps a tombstone gc_grace_seconds (10 days by default): after a mass redrive of some 100,000
# parked tasks every stats request and parked listing of that queue failed for as long. A day is
# enough for repairs here, and a row brought back by a replica that missed its delete is harmless
# (a parked row is checked against its lease and dropped; a cursor row is an older position).
# The tables whose rows only expire (written with a TTL, never deleted: no DELETE in
# statements.py, tests/unit/test_storage_grace.py) get it too. An expired cell is a tombstone kept
# for the grace as well, and TimeWindowCompactionStrategy drops a window's SSTable only once all of
# it is past the grace: each window stayed on disk for the TTL plus 10 days, and a `ready_buckets`
# read from a lane's start passed over 10 days of expired rows. Nothing can come back from a
# replica there: no delete shadows anything, and a cell that expired expires on every replica.
SHORT_GC_GRACE_S = 86_400
# Set only over Cassandra's own default: an operator's deliberate value (repairs that run less
# often than daily need a longer grace) is left alone.
CASSANDRA_DEFAULTS: dict[str, int] = {"gc_grace_seconds": 864_000}
TABLE_OPTIONS: dict[str, dict[str, int]] = {
    "parked": {"gc_grace_seconds": SHORT_GC_GRACE_S},
    "parks": {"gc_grace_seconds": SHORT_GC_GRACE_S},
    "cursors": {"gc_grace_seconds": SHORT_GC_GRACE_S},
    # The relay's owed buckets, one partition read whole at every takeover: a record deleted as its
    # bucket settles (a bucket a day, each day, for a service whose results nobody takes) kept ten
    # days of tombstones there, past tombstone_failure_threshold; a record brought back by a
    # replica that missed its delete only has that bucket read once more.
    "scheduler_progress": {"gc_grace_seconds": SHORT_GC_GRACE_S},
    # Rows that only expire (see SHORT_GC_GRACE_S).
    **{
        table: {"gc_grace_seconds": SHORT_GC_GRACE_S}
        for table in (
            *("ready", "ready_buckets", "expiry_shards", "expiries", "expiry_marks", "outbox_shards", "outbox"),
            # Read from an owner's partition start (stats of all services) and across the table
            # (housekeeping): an owner with short-lived serviceIds had 10 days of expired rows
            # ahead of its live ones, and READ_TOO_MANY_TOMBSTONES failed both reads.
            "services",
        )
    },
}


class SchemaNotReady(StorageUnavailable):
    """The keyspace lacks tables or columns (or its layout record), and this bridge does not create
    them (``BRIDGE_SCHEMA_MODE=verify``): it waits for ``queue-bridge schema`` as it waits for a
    Cassandra that cannot be reached, under ``BRIDGE_START_TIMEOUT``."""


class LayoutMismatch(ConfigError):
    """The keyspace was made by a release of another layout (its time buckets are of other widths):
    this bridge would read and write other partitions than the fleet's. Never retried: exit 2."""


# The time-bucket widths are the domain's slots (bridge.domain.timeline); recorded in schema_meta
# because they are part of the data layout: changing one needs a migration.


def keyspace_cql(keyspace: str, replication: str) -> str:
    return f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication} AND durable_writes = true"


def table_cql(keyspace: str, ttl_seconds: int) -> list[str]:
    twcs = (
        "compaction = {'class': 'TimeWindowCompactionStrategy', "
        "'compaction_window_unit': 'HOURS', 'compaction_window_size': 6}"
    )
    ttl = f"default_time_to_live = {ttl_seconds}"
    short_grace = f"gc_grace_seconds = {SHORT_GC_GRACE_S}"
    ks = keyspace
    return [
        # Fresh tasks (lane 1, payload here) and re-exposed ones (lane 0, pointing at lane 1).
        f"""CREATE TABLE IF NOT EXISTS {ks}.ready (
            owner text, service text, lane tinyint, bucket bigint, seq timeuuid,
            task_id timeuuid, epoch int,
            key_id text, value_nonce blob, value_ct blob, token_nonce blob, token_ct blob,
            traceparent text, created_at timestamp,
            claimed boolean,
            PRIMARY KEY ((owner, service, lane, bucket), seq)
        ) WITH {twcs} AND {ttl} AND {short_grace}""",
        # Which buckets of a lane hold entries, so a scan jumps over empty time.
        f"""CREATE TABLE IF NOT EXISTS {ks}.ready_buckets (
            owner text, service text, lane tinyint, bucket bigint,
            PRIMARY KEY ((owner, service, lane), bucket)
        ) WITH {ttl} AND {short_grace}""",
        # Monotonic cursor: each advance inserts a row, the effective cursor is the greatest one,
        # so concurrent writers can never move it backwards (no read-modify-write, no LWT).
        f"""CREATE TABLE IF NOT EXISTS {ks}.cursors (
            owner text, service text, lane tinyint, bucket bigint, seq timeuuid,
            PRIMARY KEY ((owner, service, lane), bucket, seq)
        ) WITH CLUSTERING ORDER BY (bucket DESC, seq DESC) AND {ttl} AND {short_grace}""",
        # Mutable task state. One partition per task; written only by LWT. `epoch` is the fencing
        # token (+1 on every claim); `claim_id` resolves an LWT whose outcome was unknown.
        f"""CREATE TABLE IF NOT EXISTS {ks}.leases (
            owner text, service text, task_id timeuuid,
            state text, epoch int, worker text, lease_until timestamp,
            claim_id uuid, completed_at timestamp, completion_id uuid, has_token boolean,
            PRIMARY KEY ((owner, service, task_id))
        ) WITH {ttl}""",
        # What each worker holds: a hint, always verified by the LWT on `leases`. `done_task` is
        # the task the worker acked last (naming the task, not a flag, so that a late write of it
        # can never mark a newer task done).
        f"""CREATE TABLE IF NOT EXISTS {ks}.workers (
            owner text, service text, worker text,
            task_id timeuuid, epoch int, has_token boolean, done_task timeuuid,
            stamp bigint, granted_at bigint,
            PRIMARY KEY ((owner, service, worker))
        ) WITH {ttl}""",
        # Lease deadlines, written BEFORE the claim so a crash can never strand a leased task.
        f"""CREATE TABLE IF NOT EXISTS {ks}.expiries (
            bucket bigint, lease_until timestamp, owner text, service text, task_id timeuuid, epoch int,
            has_token boolean,
            PRIMARY KEY ((bucket), lease_until, owner, service, task_id, epoch)
        ) WITH {twcs} AND {ttl} AND {short_grace}""",
        # Which expiry buckets hold (or held) deadlines, an hour of buckets per partition: the
        # recovery scheduler reads a bucket only if it is marked, so an idle fleet reads one small
        # partition a second instead of every 250 ms bucket twice. Written before the deadline.
        f"""CREATE TABLE IF NOT EXISTS {ks}.expiry_marks (
            hour bigint, bucket bigint,
            PRIMARY KEY ((hour), bucket)
        ) WITH {ttl} AND {short_grace}""",
        # 1.3: the same, spread over EXPIRY_SHARDS partitions per bucket (no single partition, and
        # so no single replica set, takes every claim of a 250 ms window); read with one request
        # per bucket (IN over the shards); `expiry_marks` above marks its buckets. The unsharded
        # `expiries` is only read, during a rolling upgrade from 1.2.
        f"""CREATE TABLE IF NOT EXISTS {ks}.expiry_shards (
            bucket bigint, shard tinyint, lease_until timestamp, owner text, service text,
            task_id timeuuid, epoch int, has_token boolean,
            PRIMARY KEY ((bucket, shard), lease_until, owner, service, task_id, epoch)
        ) WITH {twcs} AND {ttl} AND {short_grace}""",
        # Results to publish to the engine, written BEFORE the completing LWT (transactional outbox).
        f"""CREATE TABLE IF NOT EXISTS {ks}.outbox (
            bucket bigint, owner text, service text, task_id timeuuid, completion_id uuid,
            key_id text, result_nonce blob, result_ct blob,
            published boolean,
            PRIMARY KEY ((bucket), owner, service, task_id, completion_id)
        ) WITH {twcs} AND {ttl} AND {short_grace}""",
        # 1.3: the outbox spread over OUTBOX_SHARDS partitions per 10 s bucket.
        f"""CREATE TABLE IF NOT EXISTS {ks}.outbox_shards (
            bucket bigint, shard tinyint, owner text, service text, task_id timeuuid, completion_id uuid,
            key_id text, result_nonce blob, result_ct blob,
            published boolean,
            PRIMARY KEY ((bucket, shard), owner, service, task_id, completion_id)
        ) WITH {twcs} AND {ttl} AND {short_grace}""",
        # Progress of the scheduler loops (same monotonic-max trick as `cursors`).
        f"""CREATE TABLE IF NOT EXISTS {ks}.scheduler_cursors (
            name text, pos bigint,
            PRIMARY KEY ((name), pos)
        ) WITH CLUSTERING ORDER BY (pos DESC) AND {ttl}""",
        # Progress of the scheduler loops, partitioned by the day the position falls in, so no
        # partition grows beyond one day of rows (the unpartitioned `scheduler_cursors` above grew
        # by ~4 rows/s per bridge for 30 days; it is only read once, to migrate).
        f"""CREATE TABLE IF NOT EXISTS {ks}.scheduler_progress (
            name text, day bigint, pos bigint,
            PRIMARY KEY ((name, day), pos)
        ) WITH CLUSTERING ORDER BY (pos DESC) AND {ttl} AND {short_grace}""",
        # 1.4: the parked tasks of a queue (few: a parked task is an incident), written before the
        # parking LWT; a row whose lease is no longer parked is stale and filtered when read.
        f"""CREATE TABLE IF NOT EXISTS {ks}.parked (
            owner text, service text, task_id timeuuid, epoch int, parked_at timestamp, reason text,
            has_token boolean,
            PRIMARY KEY ((owner, service), task_id)
        ) WITH {ttl} AND {short_grace}""",
        # The parked tasks of a queue again, one row per park (its id in the key): a park's row is
        # written by its bridge and deleted by its key, stamped after the insert (USING TIMESTAMP),
        # so no other park's row or write can shadow it, whatever the bridges' clocks. In `parked`
        # the parks of a task share one row, written plainly and taken back by compare-and-sets,
        # ordered by their stamps (bridge clocks, Paxos ballots), not by when they happened: two
        # parks of one task on bridges whose clocks differed left the parked task listed nowhere.
        # Bridges write both (`parked` for bridges before this table) and list both.
        f"""CREATE TABLE IF NOT EXISTS {ks}.parks (
            owner text, service text, task_id timeuuid, park_id timeuuid, epoch int, parked_at timestamp,
            reason text, has_token boolean,
            PRIMARY KEY ((owner, service), task_id, park_id)
        ) WITH {ttl} AND {short_grace}""",
        # 1.4: queue counts for stats, as counters of deltas that bridges flush about once a second.
        # A row per day of the tasks' ids: rows older than the task TTL are not read (their tasks
        # expired, counted or not), so a count never drifts for longer than a TTL and a day. Counter tables
        # take no TTL.
        f"""CREATE TABLE IF NOT EXISTS {ks}.queue_counts (
            owner text, service text, day bigint, ready counter, in_flight counter,
            PRIMARY KEY ((owner, service), day)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.delayed_counts (
            owner text, service text, minute bigint, delayed counter,
            PRIMARY KEY ((owner, service), minute)
        )""",
        # 1.4: the service queues each owner has used (stats without a serviceId lists them).
        f"""CREATE TABLE IF NOT EXISTS {ks}.services (
            owner text, service text,
            PRIMARY KEY ((owner), service)
        ) WITH {ttl} AND {short_grace}""",
        # add with a message_id: the first writer wins (LWT), later copies map to the same task.
        f"""CREATE TABLE IF NOT EXISTS {ks}.idempotency (
            owner text, service text, message_id text, task_id timeuuid,
            PRIMARY KEY ((owner, service, message_id))
        ) WITH {ttl}""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.schema_meta (
            name text PRIMARY KEY, version int, ready_bucket_ms int, expiry_bucket_ms int,
            outbox_bucket_ms int
        )""",
    ]


# Columns added after a table was first released: (table, column, CQL type). `create_schema` adds
# the missing ones with ALTER TABLE, so upgrading a running cluster needs no manual step.
ADDED_COLUMNS: list[tuple[str, str, str]] = [
    ("workers", "done_task", "timeuuid"),
    # Write stamp of the pointer (microseconds, Lamport-ordered) and when it was granted (ms).
    ("workers", "stamp", "bigint"),
    ("workers", "granted_at", "bigint"),
    # Whether the leased task carries a token (1.3): a named ack completes in one round trip.
    ("leases", "has_token", "boolean"),
    # 1.4: the worker lifecycle (delivery limits, parking, the last error of a fail).
    ("ready", "max_deliveries", "int"),
    ("ready", "priority", "int"),
    ("expiry_shards", "priority", "int"),
    ("leases", "base_epoch", "int"),
    ("leases", "parked_at", "timestamp"),
    ("leases", "park_reason", "text"),
    ("leases", "error_key", "text"),
    ("leases", "error_nonce", "blob"),
    ("leases", "error_ct", "blob"),
    # Claims since the last redrive that found the task's key missing (not counted as deliveries).
    ("leases", "uncounted", "int"),
    ("leases", "uncounted_epoch", "int"),
    # Of those, the claims in a row that found its key missing (not a key lookup that failed), since
    # when (ms), and the run's mark (``KeyMissingRun``): a task whose key is gone for good is parked
    # once they have gone on for BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS.
    ("leases", "key_missing", "int"),
    ("leases", "key_missing_since", "bigint"),
    ("leases", "key_missing_mark", "int"),
    # The last park's id, which a discard or a later completion does not overwrite: its result
    # (the engine's delivery_limit error) stays owed until the relay has sent it.
    ("leases", "park_id", "timeuuid"),
    # Every park's id (each park adds its own; nothing removes one): `park_id` names the last park
    # only, so a park whose result was still owed when the task was redriven and parked again was
    # taken for one that never applied, and its result was marked published unsent.
    ("leases", "park_ids", "set<timeuuid>"),
    # When the task's life ends (ms since the epoch, compared exactly in lease conditions), as its
    # add fixed it (the time in its id plus the adding bridge's BRIDGE_TASK_TTL): claims copy it
    # into the lease, and every row about the task lives until then, whatever the TTL of the bridge
    # writing it (a setting changed pod by pod).
    ("ready", "expires_at", "bigint"),
    ("leases", "expires_at", "bigint"),
    # The park that wrote a parked-index row (its `park_id`): a park refused by its compare-and-set
    # takes back only the row that names it. By epoch, it deleted the row of a later park at the
    # same epoch (the worker's `fail` after a late extend refused the scheduler's park): a parked
    # task missing from listings, stats and `redrive all`. Null in rows of earlier releases.
    ("parked", "park_id", "timeuuid"),
    # A copy of the task's sealed token and trace context, written once a publish of the result
    # failed: the result can be owed past the task's end (RESULT_OWED_MS), the task's row not.
    ("outbox_shards", "token_key", "text"),
    ("outbox_shards", "token_nonce", "blob"),
    ("outbox_shards", "token_ct", "blob"),
    ("outbox_shards", "traceparent", "text"),
    # The ends (ms, rounded up to the minute) of the writes keeping a bucket's index row: one cell
    # each, so the row lives as long as its longest-lived write, not its last one.
    ("ready_buckets", "ends", "set<bigint>"),
]


def all_cql(keyspace: str, replication: str, ttl_seconds: int) -> list[str]:
    return [keyspace_cql(keyspace, replication), *table_cql(keyspace, ttl_seconds)]


def printed_cql(keyspace: str, replication: str, ttl_seconds: int) -> list[str]:
    """What ``create_schema`` applies, as CQL for a DBA (``queue-bridge schema --print``): the
    CREATE statements, then the columns added by later releases that they do not hold (printed
    without them, a keyspace made from it lacked columns every statement uses), then the layout
    record."""
    creates = table_cql(keyspace, ttl_seconds)
    alters = [
        f"ALTER TABLE {keyspace}.{table} ADD {column} {cql_type}"
        for table, column, cql_type in ADDED_COLUMNS
        if not any(re.search(rf"TABLE IF NOT EXISTS {keyspace}\.{table} \(.*\b{column} ", c, re.S) for c in creates)
    ]
    # The options as comments: `queue-bridge schema` sets one only where the table still has
    # Cassandra's default, and printed plain, a DBA applying them reset a grace raised for weekly
    # repairs to a day (found by review).
    options = [
        "-- only where the table still has Cassandra's default (gc_grace_seconds = 864000):\n-- " + cql
        for cql in options_cql(keyspace)
    ]
    return [keyspace_cql(keyspace, replication), *creates, *alters, *options, layout_cql(keyspace)]


def layout_cql(keyspace: str) -> str:
    """The layout this release writes (bucket sizes): a bridge of another layout refuses to start."""
    return (
        f"INSERT INTO {keyspace}.schema_meta (name, version, ready_bucket_ms, expiry_bucket_ms, outbox_bucket_ms) "  # nosec B608
        f"VALUES ('queue-bridge', {SCHEMA_VERSION}, {READY_BUCKET_MS}, {EXPIRY_BUCKET_MS}, "
        f"{OUTBOX_BUCKET_MS}) IF NOT EXISTS"
    )


def uuid_columns() -> frozenset[str]:
    """Names of the uuid and timeuuid columns of every table. A driver that returns them as text
    (acsylla) turns them back into :class:`uuid.UUID` by name: no column name has two types here
    (``tests/unit/test_storage_schema.py`` checks it)."""
    found: set[str] = set()
    for cql in table_cql("ks", 1):
        found.update(re.findall(r"\b([a-z_]+) (?:timeuuid|uuid)\b", cql))
    found.update(column for _, column, cql_type in ADDED_COLUMNS if cql_type in ("uuid", "timeuuid"))
    return frozenset(found)


async def _added_columns_live(db: CqlSession) -> None:
    """Wait until every added column can be used. Another bridge's ALTER may be listed in
    ``system_schema`` (or refuse ours as existing) before the node serves the column: two
    bridges started together on a new keyspace, and the second died preparing its statements
    ("Undefined column name error_ct"), in a fault drill."""
    deadline = time.monotonic() + SCHEMA_SETTLE_S
    for table, column, _ in ADDED_COLUMNS:
        while True:
            try:
                # Prepared, not run: the node checks the column without reading any data.
                cql = f"SELECT {column} FROM {{ks}}.{table} LIMIT 1"  # nosec B608
                await db.prepare(f"schema.check.{table}.{column}", cql, idempotent=True)
                break
            except InvalidQuery as exc:
                if "Undefined column" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)  # the schema change is still being applied


def _not_served_yet(exc: Exception) -> bool:
    """The node refused a table or a column as unknown: one the keyspace has (``system_schema``
    listed it), a change that has not reached that node yet."""
    # A SchemaMissing answers tenants without the driver's words: they are in its detail.
    text = f"{exc} {getattr(exc, 'detail', '')}"
    return "Undefined column" in text or "unconfigured table" in text


async def once_served(prepare: Callable[[], Awaitable[None]]) -> None:
    """``prepare`` (the store's statements, at start), tried again for up to SCHEMA_SETTLE_S while a
    node refuses a table or column as unknown. A bridge that finds the keyspace complete (verify
    mode after ``queue-bridge schema``, or after another bridge's ALTER) read ``system_schema``
    from one node and prepares on others, which may not have the change yet: refused, it exited
    1 (``InvalidQuery`` is no outage). Past the bound the refusal is what it says: a bug."""
    deadline = time.monotonic() + SCHEMA_SETTLE_S
    delay = SCHEMA_RETRY_S
    while True:
        try:
            await prepare()
            return
        except (InvalidQuery, SchemaMissing) as exc:
            # (acsylla's adapter says SchemaMissing for "unconfigured table": a re-review.)
            if not _not_served_yet(exc) or time.monotonic() >= deadline:
                raise
            log.info("a node does not serve the schema yet (%s): preparing again in %.1f s", exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)  # each try prepares every statement again: not 10 times a second


def table_names(keyspace: str = "ks") -> list[str]:
    """The tables this release creates, in the order it creates them."""
    found = (re.search(rf"TABLE IF NOT EXISTS {keyspace}\.(\w+)", cql) for cql in table_cql(keyspace, 1))
    return [m.group(1) for m in found if m]


async def missing_parts(db: CqlSession, keyspace: str) -> list[str]:
    """What this release needs and the keyspace lacks: tables, then ``table.column`` of the columns
    added by later releases (empty: nothing to create). Read from ``system_schema``, which a
    node answers from its own copy of the schema."""
    # The keyspace name is restricted by the settings to [A-Za-z][A-Za-z0-9_]*: nothing a caller controls.
    options = {
        row["table_name"]: row
        for row in await db.execute_raw(
            "SELECT table_name, gc_grace_seconds FROM system_schema.tables "  # nosec B608
            f"WHERE keyspace_name = '{keyspace}'"
        )
    }
    tables = set(options)
    columns = {
        (row["table_name"], row["column_name"])
        for row in await db.execute_raw(
            f"SELECT table_name, column_name FROM system_schema.columns WHERE keyspace_name = '{keyspace}'"  # nosec B608
        )
    }
    missing = [table for table in table_names() if table not in tables]
    missing += [f"{t}.{c}" for t, c, _ in ADDED_COLUMNS if t in tables and (t, c) not in columns]
    missing += [
        f"{table} {name} = {value}"
        for table, wanted in TABLE_OPTIONS.items()
        if table in tables
        for name, value in wanted.items()
        if options[table].get(name) == CASSANDRA_DEFAULTS[name] != value
    ]
    return missing


def options_cql(keyspace: str) -> list[str]:
    """The table options this release sets on tables made by an earlier one."""
    return [
        f"ALTER TABLE {keyspace}.{table} WITH " + " AND ".join(f"{name} = {value}" for name, value in wanted.items())
        for table, wanted in TABLE_OPTIONS.items()
    ]


def _layout() -> dict[str, int]:
    return {
        "version": SCHEMA_VERSION,
        "ready_bucket_ms": READY_BUCKET_MS,
        "expiry_bucket_ms": EXPIRY_BUCKET_MS,
        "outbox_bucket_ms": OUTBOX_BUCKET_MS,
    }


async def check_layout(db: CqlSession, keyspace: str) -> bool:
    """Whether the keyspace records a layout (False: none yet). A recorded layout other than this
    release's raises :class:`LayoutMismatch`."""
    rows = await db.execute_raw(
        "SELECT version, ready_bucket_ms, expiry_bucket_ms, outbox_bucket_ms FROM {ks}.schema_meta "  # nosec B608
        f"WHERE name = '{LAYOUT_NAME}'"
    )
    if not rows:
        return False
    recorded = {name: rows[0].get(name) for name in _layout()}
    if recorded != _layout():
        raise LayoutMismatch(
            f"keyspace {keyspace} holds the layout {recorded}, this release writes {_layout()}: "
            "a bridge of another layout would read and write other partitions than the fleet's"
        )
    return True


async def ensure_schema(db: CqlSession, settings: Settings) -> None:
    """At a bridge's start: create what is missing (``BRIDGE_SCHEMA_MODE=create``) or wait for it
    (``verify``), then check the layout. A keyspace already complete gets no DDL at all: every
    sidecar of a fleet starts with this, and Cassandra 5.0 can give one table two ids when several
    nodes create it at once (CASSANDRA-10699), so only a fleet's very first start may run a CREATE."""
    keyspace = settings.cassandra_keyspace
    missing = await missing_parts(db, keyspace)
    needed = [part for part in missing if " = " not in part]  # options aside: nothing works without these
    if settings.schema_mode == "verify":
        if needed:
            raise SchemaNotReady(
                f"keyspace {keyspace} lacks {', '.join(needed[:5])}{' ...' if len(needed) > 5 else ''}: "
                "BRIDGE_SCHEMA_MODE=verify, so run `queue-bridge schema` once"
            )
        if missing:  # the queue works without them: said, not waited for
            log.warning("keyspace %s lacks the table options %s: run `queue-bridge schema`", keyspace, missing)
    elif needed:
        await create_schema(db, settings)
    elif missing:
        await _set_table_options(db, keyspace)  # only options an earlier release did not set
    if not await check_layout(db, keyspace):
        if settings.schema_mode == "verify":
            raise SchemaNotReady(f"keyspace {keyspace} has no layout record yet: run `queue-bridge schema` once")
        await db.execute_raw(layout_cql("{ks}"))
        await check_layout(db, keyspace)


async def create_schema(db: CqlSession, settings: Settings) -> None:
    """Create the keyspace and tables if missing, add columns released later, record the layout.
    A keyspace that records another layout is refused before any DDL: its tables are another
    release's, and `queue-bridge schema` altered them (options, columns) before refusing."""
    if await _has_layout_table(db, settings.cassandra_keyspace):
        await check_layout(db, settings.cassandra_keyspace)
    for cql in all_cql(settings.cassandra_keyspace, settings.cassandra_replication, settings.task_ttl_seconds):
        await db.execute_raw(cql)
    for table, column, cql_type in ADDED_COLUMNS:
        # Only constants of this module and the keyspace name, which the settings restrict to
        # [A-Za-z][A-Za-z0-9_]*: nothing a caller controls.
        rows = await db.execute_raw(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = '{ks}' "  # nosec B608
            f"AND table_name = '{table}' AND column_name = '{column}'"
        )
        if not rows:
            try:
                await db.execute_raw(f"ALTER TABLE {{ks}}.{table} ADD {column} {cql_type}")  # nosec B608
            except InvalidQuery as exc:
                # Bridges of a fleet start together: another one added it between our read and
                # our ALTER (a bridge died of this at start, in a CI fault drill).
                if "already exists" not in str(exc):
                    raise
    await _added_columns_live(db)
    await _set_table_options(db, settings.cassandra_keyspace)
    await db.execute_raw(layout_cql("{ks}"))


async def _has_layout_table(db: CqlSession, keyspace: str) -> bool:
    # The keyspace name is restricted by the settings to [A-Za-z][A-Za-z0-9_]*: nothing a caller controls.
    rows = await db.execute_raw(
        "SELECT table_name FROM system_schema.tables "  # nosec B608
        f"WHERE keyspace_name = '{keyspace}' AND table_name = 'schema_meta'"
    )
    return bool(rows)


async def _set_table_options(db: CqlSession, keyspace: str) -> None:
    """:data:`TABLE_OPTIONS` on tables an earlier release made without them (only where they
    differ: each ALTER is a schema change the whole cluster agrees on)."""
    rows = await db.execute_raw(
        "SELECT table_name, gc_grace_seconds FROM system_schema.tables "  # nosec B608
        f"WHERE keyspace_name = '{keyspace}'"
    )
    current = {row["table_name"]: row for row in rows}
    for table, wanted in TABLE_OPTIONS.items():
        differ = {
            name: value
            for name, value in wanted.items()
            if current.get(table, {}).get(name) == CASSANDRA_DEFAULTS[name] != value
        }
        if differ:
            settings_cql = " AND ".join(f"{name} = {value}" for name, value in differ.items())
            await db.execute_raw(f"ALTER TABLE {{ks}}.{table} WITH {settings_cql}")  # nosec B608
