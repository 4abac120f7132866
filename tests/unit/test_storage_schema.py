"""The schema facts the storage adapters rely on."""

from __future__ import annotations

import re

from bridge.storage.schema import ADDED_COLUMNS, table_cql, uuid_columns

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
