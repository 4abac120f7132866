"""``gateway-key``: a new API key for the HTTP gateway (format in :mod:`bridge.gateway.keys`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bridge.cli.base import app, fail
from bridge.cli.keyring import locked


@app.command("gateway-key")
def gateway_key(
    owner: Annotated[str, typer.Option("--owner", help="The owner the key acts for.")],
    trusted: Annotated[
        bool, typer.Option("--trusted", help="The key may name any owner with X-Owner (for an engine).")
    ] = False,
    key_id: Annotated[
        str | None, typer.Option("--id", help="The key's id (letters, digits, '-'; default: random).")
    ] = None,
    keys_file: Annotated[
        Path | None,
        typer.Option(
            "--keys-file", help="Also append the entry to this keys file (created with mode 0600 if missing)."
        ),
    ] = None,
) -> None:
    """Make a new API key for the HTTP gateway: prints the key (shown once, never stored) and the
    entry for BRIDGE_GATEWAY_KEYS_FILE (which holds only the SHA-256 of the key's secret)."""
    from bridge.gateway.keys import new_key

    try:
        key, entry = new_key(owner, trusted=trusted, key_id=key_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--id" if key_id is not None else "--owner") from None
    if keys_file is not None:
        # Locked as the key-ring's commands are: two runs at once each read the list and wrote it
        # back with their own entry, and the first one's key was lost (or a revoked one returned).
        with locked(keys_file):
            doc = _read(keys_file) if keys_file.exists() else []
            if any(e.get("id") == entry["id"] for e in doc):
                fail(f"{keys_file} already has a key with id {entry['id']!r}")
            _write(keys_file, [*doc, entry])
    typer.echo(f"key (shown once; give it to the client as 'Authorization: Bearer <key>'):\n{key}")
    if keys_file is not None:
        typer.echo(f"entry appended to {keys_file}:")
    else:
        typer.echo("entry to append to the list in BRIDGE_GATEWAY_KEYS_FILE:")
    typer.echo(json.dumps(entry))


@app.command("gateway-key-revoke")
def gateway_key_revoke(
    key_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="The ids of the keys to revoke.")],
    keys_file: Annotated[Path, typer.Option("--keys-file", help="The gateway's keys file (BRIDGE_GATEWAY_KEYS_FILE).")],
) -> None:
    """Revoke gateway API keys: removes their entries from the keys file at once (the bridges stop
    accepting them within a second). An id not in the file fails the command and changes nothing."""
    with locked(keys_file):
        doc = _read(keys_file)
        present = {e.get("id") for e in doc}
        missing = [k for k in key_ids if k not in present]
        if missing:
            fail(f"{keys_file} has no key with id {', '.join(repr(k) for k in missing)}; nothing revoked")
        _write(keys_file, [e for e in doc if e.get("id") not in set(key_ids)])
    typer.echo(f"revoked {', '.join(key_ids)} in {keys_file}")


def _read(path: Path) -> list[Any]:
    """The list of a valid keys file; a failure (exit 1) otherwise."""
    from bridge.gateway.keys import parse_keys

    try:
        doc: list[Any] = json.loads(path.read_bytes())
        parse_keys(doc, str(path))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path} is not valid JSON ({type(exc).__name__})")
    except ValueError as exc:
        fail(f"not a valid keys file: {exc}")
    return doc


def _write(path: Path, doc: list[Any]) -> None:
    """Replace the file at once (a bridge re-reading it sees the old or the new list, never half),
    as the key-ring is: a fresh temporary name (a fixed ``.tmp`` left over by a crashed run kept
    its old mode through O_TRUNC), the old file's mode and owner (the bridge must keep reading
    it), a symlink's target, fsynced."""
    from bridge.crypto.keyring_file import replace_file

    try:
        replace_file(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
