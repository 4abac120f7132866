"""``keyring generate|rotate``: the one key-ring command line (file format in
:mod:`bridge.crypto.keyring_file`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.base import fail, keyring_app


@keyring_app.command("generate")
def keyring_generate(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The key-ring file to write.")],
    owners: Annotated[list[str], typer.Option("--owner", help="An owner to create a key for (repeatable).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a new key-ring with one fresh key per owner (file mode 0600)."""
    from bridge.crypto import generate_keyring, write_keyring

    if path.exists() and not force:
        fail(f"{path} exists; use --force to overwrite it")
    try:
        doc = generate_keyring(owners)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--owner") from None
    try:
        write_keyring(path, doc)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    typer.echo(f"wrote {path} with owners: {', '.join(owners)}")


@keyring_app.command("rotate")
def keyring_rotate(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The key-ring file to update in place.")],
    owner: Annotated[str, typer.Option("--owner", help="The owner that gets a new current key (created if new).")],
) -> None:
    """Add a new current key for an owner; old keys are kept so existing tasks stay readable."""
    from bridge.crypto import rotate_keyring, write_keyring
    from bridge.crypto.keyring_file import parse_keyring

    if not owner:
        raise typer.BadParameter("must not be empty", param_hint="--owner")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path} is not valid JSON ({type(exc).__name__})")
    try:
        parse_keyring(doc, source=str(path))
    except ValueError as exc:
        fail(f"not a valid key-ring: {exc}")
    existed = owner in doc["owners"]
    key_id = rotate_keyring(doc, owner)
    try:
        write_keyring(path, doc)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    what = "new current key" if existed else "added with key"
    typer.echo(f"owner {owner!r}: {what} {key_id}")
