"""Docs live with the code: the README's configuration table and commands stay true."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    documented = set(re.findall(r"`(BRIDGE_[A-Z_]+)`", README))
    # "`BRIDGE_CASSANDRA_USERNAME` / `_PASSWORD`" documents both
    if "BRIDGE_CASSANDRA_USERNAME" in documented:
        documented.add("BRIDGE_CASSANDRA_PASSWORD")
    fields = {"BRIDGE_" + name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from the README table"
    assert documented - fields == set(), "the README documents settings that do not exist"


def test_readme_first_screen_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    first_screen = "\n".join(README.splitlines()[:25])
    assert "make run" in first_screen
    assert "make test" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_every_request_outcome_label_is_in_the_readme() -> None:
    """`deferred` and `left_to_broker` (adds) were counted in queue_bridge_requests_total but not
    documented: an alert on "outcome not ok" written from the README fired on them. Found by
    review, 2026-12-06."""
    from bridge.errors import ErrorCode
    from bridge.gateway import server as gateway
    from bridge.transport import errors, fate, handlers

    outcomes = {fate.OK, fate.EXPIRED, errors.BUSY, handlers.DEFERRED, handlers.LEFT_TO_BROKER}
    outcomes |= {gateway.CLIENT_GONE, gateway.OK}
    outcomes |= {code.value for code in ErrorCode}
    missing = {o for o in outcomes if f"`{o}`" not in README and f'outcome="{o}"' not in README}
    # The error codes are documented as "an error code" there and listed in the wire protocol.
    missing -= {code.value for code in ErrorCode}
    assert missing == set()


def test_every_statement_storage_md_names_exists() -> None:
    """storage.md traces each request to its statements by name (``bridge/storage/statements.py``
    says so): a name it gives that no statement has (``ready.limit`` renamed ``ready.options``)
    left a reader with nothing to find. A ``table.column`` of the schema is not a statement."""
    import re

    from bridge.storage import schema
    from bridge.storage.statements import STATEMENTS

    doc = (ROOT / "docs" / "storage.md").read_text()
    schema_text = Path(schema.__file__).read_text()
    families = {name.split(".")[0] for name in STATEMENTS}

    def is_column(table: str, column: str) -> bool:
        created = re.search(rf"\{{ks}}\.{table} \((.*?)PRIMARY KEY", schema_text, re.S)
        in_create = created is not None and re.search(rf"\b{column} \w", created.group(1)) is not None
        return in_create or f'("{table}", "{column}",' in schema_text

    named = set(re.findall(r"`([a-z_]+)\.([a-z_]+)`", doc))
    missing = sorted(
        f"{t}.{c}" for t, c in named if t in families and f"{t}.{c}" not in STATEMENTS and not is_column(t, c)
    )
    assert missing == []
