"""The tables whose rows only expire get the short tombstone grace, on a new keyspace and on one an
earlier release made without it, against the real Cassandra (see tests/unit/test_storage_grace.py
for why)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import settings_from
from tests.integration.test_schema_modes import DDL, fresh_keyspace  # noqa: F401  (a fixture, used by name)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

EXPIRE_ONLY = (
    "ready",
    "ready_buckets",
    "expiry_shards",
    "expiries",
    "expiry_marks",
    "outbox_shards",
    "outbox",
    "services",
)


@pytest.fixture
def keyspace(fresh_keyspace: tuple[dict[str, str], Any]) -> tuple[dict[str, str], Any, list[str]]:  # noqa: F811
    """A keyspace of its own (not created yet), its bridge environment, a session, and the raw
    statements the session runs (``fresh_keyspace`` of test_schema_modes.py)."""
    env, db = fresh_keyspace
    return env, db, db.statements


async def _graces(db: Any, keyspace: str) -> dict[str, int]:
    rows = await db.execute_raw(
        f"SELECT table_name, gc_grace_seconds FROM system_schema.tables WHERE keyspace_name = '{keyspace}'"
    )
    return {row["table_name"]: int(row["gc_grace_seconds"]) for row in rows}


async def test_a_new_keyspace_and_an_upgraded_one_keep_expired_rows_a_day(
    keyspace: tuple[dict[str, str], Any, list[str]],
) -> None:
    from bridge.storage.schema import SHORT_GC_GRACE_S, ensure_schema

    env, db, statements = keyspace
    name = env["BRIDGE_CASSANDRA_KEYSPACE"]
    settings = settings_from(env)
    await ensure_schema(db, settings)
    graces = await _graces(db, name)
    assert {t: graces[t] for t in EXPIRE_ONLY} == dict.fromkeys(EXPIRE_ONLY, SHORT_GC_GRACE_S), "a new keyspace"
    assert graces["leases"] == 864_000, "tables deleted from keep Cassandra's default"
    # As an earlier release made them: Cassandra's default grace.
    for table in EXPIRE_ONLY:
        await db.execute_raw(f"ALTER TABLE {{ks}}.{table} WITH gc_grace_seconds = 864000")
    statements.clear()
    await ensure_schema(db, settings)
    graces = await _graces(db, name)
    assert {t: graces[t] for t in EXPIRE_ONLY} == dict.fromkeys(EXPIRE_ONLY, SHORT_GC_GRACE_S), "an upgraded keyspace"
    ddl = sorted(s for s in statements if s.lstrip().upper().startswith(DDL))
    assert ddl == sorted(f"ALTER TABLE {{ks}}.{t} WITH gc_grace_seconds = {SHORT_GC_GRACE_S}" for t in EXPIRE_ONLY)
    statements.clear()
    await ensure_schema(db, settings)
    assert not [s for s in statements if s.lstrip().upper().startswith(DDL)], "set once, then no DDL at a start"
