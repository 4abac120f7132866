"""``keyring generate|rotate|promote``: the one key-ring command line (file format in
:mod:`bridge.crypto.keyring_file`).

Both write the file durably, keep the version they replace as ``<name>.bak`` and keep its mode
and owner (:func:`bridge.crypto.keyring_file.replace_file`); both hold an exclusive lock on
``<name>.lock`` beside the key-ring while they read and write it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from bridge.cli.base import fail, keyring_app


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<name>.lock`` beside the key-ring (its symlink's target).

    Two rotations at once each read the file, add their key and write it back: the second write
    dropped the first one's key, and whatever was sealed with it became unreadable. The lock is a
    file of its own (the key-ring is replaced by a rename, so a lock on it would be on the old
    inode); it is never removed (removing it would let a third process lock a new inode while a
    second still holds the old one)."""
    target = Path(os.path.realpath(path))
    lock_path = target.with_name(target.name + ".lock")
    try:
        # Read-only is enough for flock, so a lock file another user created stays usable; it
        # holds nothing, hence readable by all.
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        fail(f"cannot open the lock file {lock_path}: {exc.strerror or exc}")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            typer.echo(f"waiting for the lock on {lock_path} (another command is changing the file)", err=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_doc(path: Path) -> Any:
    from bridge.crypto.keyring_file import reject_duplicate_names

    try:
        # A key id given twice is refused, as the bridges refuse it: read leniently, the last
        # secret would win and be written back clean, and the tasks sealed under the first would
        # be condemned as tampered with once the bridges loaded it.
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=reject_duplicate_names)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path} is not valid JSON ({type(exc).__name__})")
    except ValueError as exc:
        fail(f"{path}: {exc}; fix the file by hand (keep the secret the tasks were sealed with)")


def _refuse_to_destroy(path: Path) -> None:
    """Fail if ``path`` holds a key-ring (or cannot be read to tell): --force is for a file that
    is not one. Replacing a live key-ring loses every key in it for good, and every task sealed
    with them with it."""
    from bridge.crypto.keyring_file import parse_keyring

    try:
        raw = path.read_bytes()
    except OSError as exc:
        fail(
            f"cannot read {path} to check that it is not a live key-ring ({exc.strerror or exc}); "
            "add --destroy-existing-keys to replace it anyway"
        )
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
        if b'"owners"' in raw:
            # A key-ring a hand edit left unparsable (a trailing comma, a stray quote): the bridges
            # kept their keys, and its other entries are as live as ever (found by re-review).
            fail(
                f'{path} looks like a key-ring (it names "owners") but is not valid JSON: replacing it loses '
                "every key in it for good. Fix it, or add --destroy-existing-keys to replace it anyway "
                "(the old file is kept: as .bak, or as .bak.invalid when .bak holds keys)"
            )
        return  # not JSON, so not a key-ring: --force replaces it
    try:
        ring = parse_keyring(doc, source=str(path))
    except ValueError as exc:
        if isinstance(doc, dict) and isinstance(doc.get("owners"), dict) and doc["owners"]:
            # A key-ring with an entry broken (a hand edit): the bridges kept their keys, and the
            # other entries are as live as ever. Not "not a key-ring" (found by review).
            fail(
                f"{path} is a key-ring with {len(doc['owners'])} owners that does not parse ({exc}): replacing it "
                "loses every key in it for good. Fix the entry, or add "
                "--destroy-existing-keys to replace it anyway (the old file is kept: as .bak, or as .bak.invalid "
                "when .bak holds keys)"
            )
        return  # not a key-ring: --force replaces it
    keys = sum(len(owner.keys) for owner in ring.values())
    fail(
        f"{path} is a key-ring with {len(ring)} owner(s) and {keys} key(s): replacing it loses them for "
        "good, and every task sealed with them becomes unreadable. Rotate instead (keyring rotate), or add "
        "--destroy-existing-keys to replace it anyway (the old file is kept as .bak)"
    )


@keyring_app.command("generate")
def keyring_generate(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The key-ring file to write.")],
    owners: Annotated[list[str], typer.Option("--owner", help="An owner to create a key for (repeatable).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file that is not a key-ring.")] = False,
    destroy: Annotated[
        bool,
        typer.Option(
            "--destroy-existing-keys",
            help="Overwrite an existing key-ring: its keys are lost, and the tasks sealed with them "
            "(the old file is kept as PATH.bak).",
        ),
    ] = False,
) -> None:
    """Write a new key-ring with one fresh key per owner (mode 0600; over a file, its mode less others')."""
    from bridge.crypto import generate_keyring, write_keyring

    try:
        doc = generate_keyring(owners)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--owner") from None
    with locked(path):
        if path.exists() and not (force or destroy):
            fail(f"{path} exists; use --force to overwrite it")
        if path.exists() and not destroy:
            _refuse_to_destroy(path)
        try:
            write_keyring(path, doc, new=True)
        except OSError as exc:
            fail(f"cannot write {path}: {exc.strerror or exc}")
    typer.echo(f"wrote {path} with owners: {', '.join(owners)}")


@keyring_app.command("rotate")
def keyring_rotate(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The key-ring file to update in place.")],
    owner: Annotated[str, typer.Option("--owner", help="The owner that gets a new current key.")],
    create: Annotated[
        bool, typer.Option("--create", help="Add the owner if the key-ring has none of that name.")
    ] = False,
    stage: Annotated[
        bool,
        typer.Option(
            "--stage",
            help="Add the key without making it current; `keyring promote` once every bridge has the "
            "file (a fleet: a task sealed with a key a fetching bridge has not loaded yet waits out a lease).",
        ),
    ] = False,
) -> None:
    """Add a new current key for an owner; old keys are kept so existing tasks stay readable."""
    from bridge.crypto import rotate_keyring, write_keyring

    if not owner:
        raise typer.BadParameter("must not be empty", param_hint="--owner")
    with locked(path):
        doc = _read_valid_doc(path)
        existed = owner in doc["owners"]
        if not existed and not create:
            # A typo in --owner made a new owner with a key nobody uses, and left the owner meant
            # on the key the operator wanted gone.
            known = ", ".join(sorted(doc["owners"])) or "none"
            fail(f"{path} has no owner {owner!r} (owners: {known}); add --create to add it")
        key_id = rotate_keyring(doc, owner, make_current=not stage)
        try:
            write_keyring(path, doc)
        except OSError as exc:
            fail(f"cannot write {path}: {exc.strerror or exc}")
    if not existed:
        typer.echo(f"owner {owner!r}: added with key {key_id}")
    elif stage:
        typer.echo(
            f"owner {owner!r}: staged key {key_id} (not current); once every bridge has this file: "
            # Quoted for the shell: owners are any broker user name, and the line is pasted.
            + shlex.join(["queue-bridge", "keyring", "promote", str(path), "--owner", owner, key_id])
        )
    else:
        typer.echo(f"owner {owner!r}: new current key {key_id}")


@keyring_app.command("promote")
def keyring_promote(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The key-ring file to update in place.")],
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The staged key to make current.")],
    owner: Annotated[str, typer.Option("--owner", help="The owner whose key it is.")],
) -> None:
    """Make a key staged by `rotate --stage` the owner's current key (new tasks are sealed with it)."""
    from bridge.crypto import write_keyring
    from bridge.crypto.keyring_file import promote_key

    with locked(path):
        doc = _read_valid_doc(path)
        try:
            promote_key(doc, owner, key_id)
        except KeyError as exc:
            fail(f"{path}: {exc.args[0]}")
        try:
            write_keyring(path, doc)
        except OSError as exc:
            fail(f"cannot write {path}: {exc.strerror or exc}")
    typer.echo(f"owner {owner!r}: current key {key_id}")


def _read_valid_doc(path: Path) -> Any:
    from bridge.crypto.keyring_file import parse_keyring

    doc = _read_doc(path)
    try:
        parse_keyring(doc, source=str(path))
    except ValueError as exc:
        fail(f"not a valid key-ring: {exc}")
    return doc
