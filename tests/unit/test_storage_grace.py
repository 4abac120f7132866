"""Which tables keep their tombstones a day instead of Cassandra's ten (``TABLE_OPTIONS``).

An expired cell is a tombstone that Cassandra keeps ``gc_grace_seconds``, and TimeWindowCompaction
drops a window's SSTable only once all of it is past that grace: tables whose rows only ever expire
kept every window on disk for the TTL plus 10 days, and reads from a partition's start (a lane's
``ready_buckets`` with no cursor) passed over 10 days of tombstones. A short grace is safe where
nothing is deleted (an expired cell expires on every replica that holds it: no replica can bring
back what a tombstone it missed shadowed), and where a delete brought back is harmless
(``parked``, ``parks``: checked against its lease; ``cursors``: an older position; ``scheduler_progress``:
an owed bucket's record, read once more)."""

from __future__ import annotations

import re

from bridge.storage.schema import SHORT_GC_GRACE_S, TABLE_OPTIONS, options_cql, printed_cql, table_cql

# Tables whose rows only expire (written with a TTL, never deleted), read or compacted by time.
EXPIRE_ONLY = {
    *("ready", "ready_buckets", "expiry_shards", "expiries", "expiry_marks", "outbox_shards", "outbox"),
    "services",  # an owner's services are listed from its partition's start (found by review, 2026-12-06)
}
# Tables deleted from, whose deletes brought back are harmless (see bridge/storage/schema.py).
# (``parks``: a park's row checked against its lease, as ``parked``; an owed record: a bucket read again)
DELETES_HARMLESS = {"parked", "parks", "cursors", "scheduler_progress"}


def _create(table: str) -> str:
    [cql] = [c for c in table_cql("ks", 1) if re.search(rf"TABLE IF NOT EXISTS ks\.{table} \(", c)]
    return cql


def test_tables_whose_rows_only_expire_keep_their_tombstones_a_day() -> None:
    short = {t for t, wanted in TABLE_OPTIONS.items() if wanted.get("gc_grace_seconds") == SHORT_GC_GRACE_S}
    missing = sorted(EXPIRE_ONLY - short)
    assert not missing, f"tables that only expire keep Cassandra's 10-day grace: {missing}"
    assert short == EXPIRE_ONLY | DELETES_HARMLESS, sorted(short)
    for table in sorted(short):
        assert f"gc_grace_seconds = {SHORT_GC_GRACE_S}" in _create(table), f"{table} is created without it"
        assert f"ALTER TABLE ks.{table} WITH gc_grace_seconds = {SHORT_GC_GRACE_S}" in options_cql("ks")
        printed = printed_cql("ks", "{'class': 'SimpleStrategy', 'replication_factor': 1}", 1)
        assert any(
            line == f"-- ALTER TABLE ks.{table} WITH gc_grace_seconds = {SHORT_GC_GRACE_S}"
            for cql in printed
            for line in cql.splitlines()
        ), table


def test_the_printed_schema_sets_no_table_option_a_dba_may_have_raised() -> None:
    """`queue-bridge schema` sets a table's grace only where it is still Cassandra's default; the
    printed CQL set it everywhere, and a DBA applying it after an upgrade reset a grace raised for
    weekly repairs to a day (deleted parked rows could come back). Printed as comments now, with
    the condition (found by review, 2026-12-07)."""
    printed = printed_cql("ks", "{'class': 'SimpleStrategy', 'replication_factor': 1}", 1)
    applied = [line for cql in printed for line in cql.splitlines() if not line.startswith("--")]
    assert not [line for line in applied if "gc_grace_seconds" in line and line.startswith("ALTER")]


def test_no_statement_deletes_from_a_table_that_only_expires() -> None:
    """The short grace of these tables is safe only while nothing deletes from them: a delete that
    a replica missed, once its tombstone is purged a day later, could come back from that replica.
    A statement that deletes from one of them must come with a reason this is harmless, as
    ``parked``'s and ``cursors``' have."""
    from bridge.storage.statements import STATEMENTS

    deleting = {
        (name, table)
        for name, (cql, _) in STATEMENTS.items()
        for table in EXPIRE_ONLY
        if re.search(rf"\bDELETE\b.*\bFROM \{{ks\}}\.{table}\b", cql, re.S)
    }
    assert not deleting, deleting
