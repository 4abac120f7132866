"""The schema facts the storage adapters rely on."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bridge.config import load_settings
from bridge.crypto import generate_keyring, write_keyring
from bridge.storage import schema
from bridge.storage.errors import InvalidQuery
from bridge.storage.schema import ADDED_COLUMNS, TABLE_OPTIONS, _layout, table_cql, table_names, uuid_columns
from bridge.storage.statements import STATEMENTS

_COLUMN = re.compile(r"\b([a-z_]+) (timeuuid|uuid|text|blob|bigint|int|tinyint|smallint|boolean|timestamp|counter)\b")


def test_no_column_name_has_two_types() -> None:
    """acsylla hands uuid columns out as text; its adapter turns them back by column name, which is
    only right while a name means one type in every table."""
    types: dict[str, set[str]] = {}
    for cql in table_cql("ks", 1):
        for name, cql_type in _COLUMN.findall(cql):
            types.setdefault(name, set()).add(cql_type)
    for _, name, cql_type in ADDED_COLUMNS:
        types.setdefault(name, set()).add(cql_type)
    assert {name: t for name, t in types.items() if len(t) > 1} == {}
    assert uuid_columns() == {name for name, t in types.items() if t & {"uuid", "timeuuid"}}
    assert {"task_id", "seq", "claim_id", "completion_id", "done_task"} <= uuid_columns()


def test_only_the_errors_read_selects_a_lease_s_last_error() -> None:
    """A fail's error may be as large as a value (1 MiB): the reads of many leases at once (the
    scheduler's 50 deadlines, purge, redrive, the parked listing) leave it out, and the parked
    listing reads errors by ``lease.errors`` within its budget."""
    from bridge.storage.statements import STATEMENTS

    selecting_errors = {name for name, (cql, _) in STATEMENTS.items() if cql.startswith("SELECT") and "error_ct" in cql}
    assert selecting_errors == {"lease.get", "lease.errors"}


def test_the_result_relay_s_sweep_reads_no_result_it_does_not_owe() -> None:
    """The duty holder sweeps every outbox bucket (10 s of completions) once: it read each entry
    whole, result included (up to a value's size each, nearly all published long ago), so a
    bucket of 2,000 results of 10 KiB was 20 MB read to find none to send. It now reads the keys
    and ``published`` flags, then the unpublished entries whole (``outbox.get``)."""
    from bridge.storage.statements import STATEMENTS

    for name in ("outbox.bucket", "outbox.unsharded_bucket"):
        assert "result_ct" not in STATEMENTS[name][0] and "published" in STATEMENTS[name][0]
    for name in ("outbox.get", "outbox.unsharded_get"):
        assert "result_ct" in STATEMENTS[name][0]


class _CompleteKeyspace:
    """A session on a keyspace that holds all of this release's schema (as ``system_schema`` says),
    on a node that does not serve yet what another bridge (or ``queue-bridge schema``) just added:
    the first prepare naming it is refused, as the node refuses it until the change reaches it."""

    keyspace = "ks"

    def __init__(self, refusal: str, *, times: int = 1) -> None:
        self.statements: Counter[str] = Counter()
        self.refusal = refusal
        self.times = times
        self.refused = 0
        self.prepared: set[str] = set()

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def execute_raw(self, cql: str) -> list[dict[str, Any]]:
        if "system_schema.tables" in cql:
            return [
                {"table_name": t, "gc_grace_seconds": TABLE_OPTIONS.get(t, {}).get("gc_grace_seconds", 864_000)}
                for t in table_names()
            ]
        if "system_schema.columns" in cql:
            return [{"table_name": t, "column_name": c} for t, c, _ in ADDED_COLUMNS]
        if "schema_meta" in cql:
            return [_layout()]
        raise AssertionError(f"no DDL or write expected on a complete keyspace: {cql}")

    async def prepare(self, name: str, cql: str, *, idempotent: bool) -> None:
        if "error_ct" in cql and self.refused < self.times:
            self.refused += 1
            # As the default driver's adapter maps the node's refusal (a re-review: "unconfigured
            # table" became SchemaMissing there, which the wait did not catch, and the start exited).
            from acsylla import errors as cass

            from bridge.storage.acsylla_session import _storage_error

            raise _storage_error(cass.CassErrorServerInvalidQuery(self.refusal), lwt=False)
        self.prepared.add(name)


_NOT_THERE_YET = [
    "Undefined column name error_ct in table ks.leases",
    "unconfigured table leases",
]


def _bridge(tmp_path: Path, db: _CompleteKeyspace, **overrides: Any) -> Any:
    from bridge.app import Bridge

    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, generate_keyring(["worker-a"]))
    b = Bridge(load_settings(_env_file=None, keyring=keyring, http_port=0, **overrides))
    b.db = db
    b.store.db = db
    return b


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["verify", "create"])
@pytest.mark.parametrize("refusal", _NOT_THERE_YET)
async def test_a_complete_keyspace_whose_change_has_not_reached_the_node_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str, refusal: str
) -> None:
    """A bridge that finds the keyspace complete (verify mode after `queue-bridge schema`, or
    after another bridge's ALTER) prepared its statements at once; a prepare that reached a node
    the change had not reached yet was refused ("Undefined column name"), InvalidQuery is no
    outage, and the start exited 1. Only a bridge that had made the change itself waited
    (``_added_columns_live``). Such a refusal is now tried again while the change spreads."""
    monkeypatch.setattr(schema, "SCHEMA_RETRY_S", 0.0, raising=False)  # no waiting here
    db = _CompleteKeyspace(refusal)
    b = _bridge(tmp_path, db, schema_mode=mode)
    await b._connect_store()
    assert db.refused == 1
    assert db.prepared == set(STATEMENTS)


@pytest.mark.anyio
async def test_a_column_that_never_comes_is_a_bug_after_the_settling_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Bounded: past SCHEMA_SETTLE_S the refusal is what it says (a statement naming a column
    that does not exist is a bug), not an outage retried for BRIDGE_START_TIMEOUT."""
    monkeypatch.setattr(schema, "SCHEMA_RETRY_S", 0.0, raising=False)
    monkeypatch.setattr(schema, "SCHEMA_SETTLE_S", 0.0)
    db = _CompleteKeyspace(_NOT_THERE_YET[0], times=10**9)
    b = _bridge(tmp_path, db, schema_mode="verify")
    with pytest.raises(InvalidQuery, match="Undefined column"):
        await b._connect_store()


@pytest.mark.anyio
async def test_other_invalid_cql_is_not_waited_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(schema, "SCHEMA_RETRY_S", 0.0, raising=False)
    db = _CompleteKeyspace("line 1:7 no viable alternative at input 'FROM'")
    b = _bridge(tmp_path, db, schema_mode="verify")
    with pytest.raises(InvalidQuery, match="no viable alternative"):
        await b._connect_store()
    assert db.refused == 1
