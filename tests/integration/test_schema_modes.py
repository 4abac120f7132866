"""The schema at a bridge's start (BRIDGE_SCHEMA_MODE), against the real Cassandra.

Every sidecar of a fleet starts with this step. A bridge used to run every CREATE and the layout's
compare-and-set at each start: on a Cassandra 5.0 cluster several nodes creating one table at once
can give it two ids (CASSANDRA-10699), so a complete keyspace now gets no DDL at all, and a fleet
can leave the DDL to one `queue-bridge schema` (``verify``). A keyspace of another layout is
refused, as the layout record always said it would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.cli import cli, no_traceback, ok
from tests.conftest import settings_from, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DDL = ("CREATE", "ALTER", "DROP")


@pytest.fixture
async def fresh_keyspace(bridge_env: dict[str, str]) -> AsyncIterator[tuple[dict[str, str], Any]]:
    """A keyspace name of its own (not created yet), the bridge environment that names it, and a
    real driver session whose raw statements are recorded."""
    from bridge.storage.cassandra import CassandraSession

    keyspace = f"qb_schema_{uuid.uuid4().hex[:8]}"
    env = {**bridge_env, "BRIDGE_CASSANDRA_KEYSPACE": keyspace}
    db = CassandraSession(settings_from(env))
    await db.connect()
    statements: list[str] = []
    execute_raw = db.execute_raw

    async def recorded(cql: str) -> Any:
        statements.append(cql)
        return await execute_raw(cql)

    db.execute_raw = recorded  # type: ignore[method-assign]
    db.statements = statements  # type: ignore[attr-defined]
    try:
        yield env, db
    finally:
        await execute_raw(f"DROP KEYSPACE IF EXISTS {keyspace}")
        await db.close()


async def _keyspace_exists(db: Any, keyspace: str) -> bool:
    rows = await db.execute_raw(f"SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = '{keyspace}'")
    return bool(rows)


async def test_a_complete_keyspace_gets_no_ddl_at_start(fresh_keyspace) -> None:
    from bridge.storage.schema import ensure_schema

    env, db = fresh_keyspace
    settings = settings_from(env)
    await ensure_schema(db, settings)  # the fleet's first start: it creates everything
    assert any(s.lstrip().upper().startswith("CREATE TABLE") for s in db.statements)
    db.statements.clear()
    await ensure_schema(db, settings)  # every later start (a restart, a scale-up)
    ddl = [s for s in db.statements if s.lstrip().upper().startswith(DDL)]
    writes = [s for s in db.statements if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert not ddl, f"a complete keyspace got DDL at start: {ddl}"
    assert not writes, f"a complete keyspace got writes at start: {writes}"


async def test_a_keyspace_missing_a_column_gets_only_that_column(fresh_keyspace) -> None:
    """An upgrade: the release added a column; a bridge adds it (and creates nothing else)."""
    from bridge.storage.schema import ensure_schema

    env, db = fresh_keyspace
    settings = settings_from(env)
    await ensure_schema(db, settings)
    await db.execute_raw("ALTER TABLE {ks}.leases DROP expires_at")
    db.statements.clear()
    await ensure_schema(db, settings)
    alters = [s for s in db.statements if s.lstrip().upper().startswith("ALTER")]
    assert alters == ["ALTER TABLE {ks}.leases ADD expires_at bigint"]
    db.statements.clear()
    await ensure_schema(db, settings)
    assert not [s for s in db.statements if s.lstrip().upper().startswith(DDL)]


async def test_verify_mode_waits_for_the_schema_command_and_runs_no_ddl(fresh_keyspace, caplog) -> None:
    """BRIDGE_SCHEMA_MODE=verify: the bridge creates nothing; it waits (BRIDGE_START_TIMEOUT)
    until `queue-bridge schema` has run, then serves."""
    import logging

    from bridge.app import Bridge

    env, db = fresh_keyspace
    keyspace = env["BRIDGE_CASSANDRA_KEYSPACE"]
    caplog.set_level(logging.WARNING, logger="bridge.app")
    b = Bridge(settings_from(env, schema_mode="verify", start_timeout=60))
    starting = asyncio.create_task(b.start())
    try:
        await wait_for(lambda: "the schema is not ready" in caplog.text or starting.done(), 30, what="a try")
        assert not starting.done(), "it exited instead of waiting for the schema"
        assert "queue-bridge schema" in caplog.text
        assert not await _keyspace_exists(db, keyspace), "verify mode created the keyspace"
        ok(await cli("schema", env=env, limit=60))
        await asyncio.wait_for(starting, 40)
        assert b.transport.is_ready()
    finally:
        if not starting.done():
            starting.cancel()
        with contextlib.suppress(Exception):
            await b.stop()


async def test_verify_mode_without_a_start_timeout_says_what_to_run(fresh_keyspace) -> None:
    env, db = fresh_keyspace
    proc = await cli("run", env=env, extra={"BRIDGE_SCHEMA_MODE": "verify", "BRIDGE_HTTP_PORT": "0"}, limit=30)
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr
    assert "queue-bridge schema" in proc.stderr
    assert not await _keyspace_exists(db, env["BRIDGE_CASSANDRA_KEYSPACE"])


async def test_a_keyspace_of_another_layout_is_refused(fresh_keyspace) -> None:
    """A keyspace recorded with other bucket widths: the bridge would read and write other
    partitions than the fleet's. It exits 2 and says why; `queue-bridge schema` refuses it too."""
    from bridge.storage.schema import READY_BUCKET_MS, ensure_schema

    env, db = fresh_keyspace
    await ensure_schema(db, settings_from(env))
    await db.execute_raw(
        f"UPDATE {{ks}}.schema_meta SET ready_bucket_ms = {READY_BUCKET_MS * 2} WHERE name = 'queue-bridge'"
    )
    proc = await cli("run", env=env, extra={"BRIDGE_HTTP_PORT": "0"}, limit=30)
    no_traceback(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "layout" in proc.stderr and str(READY_BUCKET_MS * 2) in proc.stderr
    # As an earlier release left it: `schema` would set the option (DDL) if it went on.
    await db.execute_raw("ALTER TABLE {ks}.parked WITH gc_grace_seconds = 864000")
    schema = await cli("schema", env=env, limit=60)
    no_traceback(schema)
    assert schema.returncode == 2 and "layout" in schema.stderr, "bad configuration, as `run` says it (it exited 1)"
    # Refused before any DDL: it altered the other layout's tables first, then refused.
    assert await _gc_grace(db, env["BRIDGE_CASSANDRA_KEYSPACE"], "parked") == 864_000


async def _gc_grace(db: Any, keyspace: str, table: str) -> int:
    rows = await db.execute_raw(
        "SELECT gc_grace_seconds FROM system_schema.tables "
        f"WHERE keyspace_name = '{keyspace}' AND table_name = '{table}'"
    )
    return int(rows[0]["gc_grace_seconds"])


async def test_tables_read_past_their_tombstones_keep_them_a_day_not_ten(fresh_keyspace) -> None:
    """`parked` (a row deleted at each redrive, discard or cancel of a parked task, and every stats
    request reads the queue's partition from its start) and `cursors` kept their tombstones for
    Cassandra's default 10 days: after a mass redrive of some 100,000 parked tasks, that queue's
    stats and parked listing failed (TombstoneOverwhelming) for as long. A keyspace an earlier
    release made gets the option at the next start, with that one ALTER, and then no DDL."""
    from bridge.storage.schema import SHORT_GC_GRACE_S, ensure_schema

    env, db = fresh_keyspace
    keyspace = env["BRIDGE_CASSANDRA_KEYSPACE"]
    settings = settings_from(env)
    await ensure_schema(db, settings)
    for table in ("parked", "cursors"):
        assert await _gc_grace(db, keyspace, table) == SHORT_GC_GRACE_S
    assert await _gc_grace(db, keyspace, "leases") == 864_000  # the others keep Cassandra's default
    # As an earlier release made it:
    await db.execute_raw("ALTER TABLE {ks}.parked WITH gc_grace_seconds = 864000")
    db.statements.clear()
    await ensure_schema(db, settings)
    assert await _gc_grace(db, keyspace, "parked") == SHORT_GC_GRACE_S
    ddl = [s for s in db.statements if s.lstrip().upper().startswith(DDL)]
    assert ddl == ["ALTER TABLE {ks}.parked WITH gc_grace_seconds = 86400"], ddl
    db.statements.clear()
    await ensure_schema(db, settings)
    assert not [s for s in db.statements if s.lstrip().upper().startswith(DDL)]
    # An operator's own value (repairs run weekly) is left alone.
    await db.execute_raw("ALTER TABLE {ks}.cursors WITH gc_grace_seconds = 604800")
    db.statements.clear()
    await ensure_schema(db, settings)
    assert await _gc_grace(db, keyspace, "cursors") == 604_800
    assert not [s for s in db.statements if s.lstrip().upper().startswith(DDL)]


@pytest.mark.parametrize("lwt", [False, True])
async def test_a_datastax_driver_error_is_answered_by_its_type_not_its_text(cassandra_settings, monkeypatch, lwt):
    """cassandra-driver's text names the replica (``Connection to 10.9.8.7:9042 is defunct``):
    it went into every tenant's ``unavailable`` answer. The answer names the type only."""
    from cassandra.connection import ConnectionShutdown

    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.errors import StorageUnavailable, UnknownOutcome
    from bridge.storage.repository import CassandraTaskStore

    db = CassandraSession(cassandra_settings)
    await db.connect()
    try:
        await CassandraTaskStore(db, lambda: 0, 3600).prepare()

        def defunct(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionShutdown("Connection to 10.9.8.7:9042 is defunct")

        monkeypatch.setattr(db.session, "execute_async", defunct)
        bound = db._prepared["services.all"].bind((10,))
        with pytest.raises((StorageUnavailable, UnknownOutcome)) as err:
            await db._run(bound, lwt=lwt)  # as a plain statement, and as a compare-and-set
        assert "10.9.8.7" not in err.value.message and "ConnectionShutdown" in err.value.message, err.value.message
    finally:
        await db.close()


async def test_a_keyspace_named_with_capitals_is_found_in_verify_mode(bridge_env: dict[str, str]) -> None:
    """The DDL and statements name the keyspace unquoted, so Cassandra makes it lower case, and the
    schema checks compared the name as given: with BRIDGE_CASSANDRA_KEYSPACE=QB_Schema_... they
    found no table, `queue-bridge schema` ran to its end, and every verify-mode bridge (the
    Kubernetes example's sidecars) waited for a schema that was there, for good. Found by review."""
    from bridge.app import Bridge
    from bridge.storage.cassandra import CassandraSession

    keyspace = f"QB_Schema_{uuid.uuid4().hex[:8]}"
    env = {**bridge_env, "BRIDGE_CASSANDRA_KEYSPACE": keyspace}
    b = Bridge(settings_from(env, schema_mode="verify", start_timeout=0))
    try:
        ok(await cli("schema", env=env, limit=60))
        await asyncio.wait_for(b.start(), 40)
        assert b.transport.is_ready()
    finally:
        with contextlib.suppress(Exception):
            await b.stop()
        db = CassandraSession(settings_from(bridge_env))
        await db.connect()
        await db.execute_raw(f"DROP KEYSPACE IF EXISTS {keyspace}")
        await db.close()
