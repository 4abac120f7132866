"""A :class:`~bridge.crypto.keys.KeyProvider` backed by a local JSON keyring file.

File format::

    {"owners": {"<owner>": {"current": "<key id>",
                            "keys": {"<key id>": "<base64 of 32 bytes>", ...}}}}

The whole file is validated on load; a :class:`ValueError` names the owner / key and what is
wrong (never the key material).  The file is re-read when it changes (mtime, size or inode, checked
at most once per ``check_interval`` seconds), so operators can rotate keys without a restart:
add a key, point ``current`` at it, keep the old ids so existing data stays readable.  A reload
that fails keeps the previous keyring and logs a warning; it is retried when the file changes again.

Make and rotate key-rings with the command line (:mod:`bridge.cli.keyring`)::

    queue-bridge keyring generate keys.json --owner tenant-a --owner tenant-b [--force]
    queue-bridge keyring rotate keys.json --owner tenant-a [--create]

or in code with :func:`generate_keyring`, :func:`rotate_keyring` and :func:`write_keyring`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.crypto.errors import UnknownKey, UnknownOwner
from bridge.crypto.keys import KEY_SIZE, OwnerKey

__all__ = [
    "KeyringFileProvider",
    "generate_keyring",
    "load_keyring",
    "new_key_id",
    "parse_keyring",
    "reject_duplicate_names",
    "replace_file",
    "rotate_keyring",
    "write_keyring",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _OwnerRing:
    current: OwnerKey
    keys: Mapping[str, OwnerKey]


_Ring = Mapping[str, _OwnerRing]
_Signature = tuple[int, int, int, int]  # (st_mtime_ns, st_size, st_ino, st_ctime_ns)


def new_key_id() -> str:
    """A fresh, unique key id (timestamp for readability + random suffix for uniqueness)."""
    return f"k{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(4)}"


def _new_secret_b64() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_SIZE)).decode("ascii")


def generate_keyring(owners: Sequence[str]) -> dict[str, Any]:
    """A new keyring document with one fresh random key per owner (dev tooling and tests)."""
    if isinstance(owners, str):
        raise TypeError("owners must be a list of owner names, not a string")
    doc: dict[str, Any] = {"owners": {}}
    for owner in owners:
        if not owner:
            raise ValueError("owner names must be non-empty")
        if owner in doc["owners"]:
            raise ValueError(f"duplicate owner {owner!r}")
        key_id = new_key_id()
        doc["owners"][owner] = {"current": key_id, "keys": {key_id: _new_secret_b64()}}
    return doc


def rotate_keyring(doc: dict[str, Any], owner: str, *, make_current: bool = True) -> str:
    """Add a fresh key for ``owner`` to ``doc`` (in place), make it current, return its id.

    Old keys are kept so existing data stays readable.  Creates the owner if missing (its first
    key is current whatever ``make_current`` says). ``make_current=False`` stages the key: every
    bridge can open what it seals once the file has reached them all, and :func:`promote_key`
    makes it current then (a fleet's bridges reload a changed file at different moments: a task
    sealed with a key that the bridge fetching it has not loaded yet waits out a lease).
    """
    entry = doc.setdefault("owners", {}).setdefault(owner, {"current": None, "keys": {}})
    key_id = new_key_id()
    while key_id in entry["keys"]:
        key_id = new_key_id()
    entry["keys"][key_id] = _new_secret_b64()
    if make_current or entry["current"] is None:
        entry["current"] = key_id
    return key_id


def promote_key(doc: dict[str, Any], owner: str, key_id: str) -> None:
    """Make ``owner``'s key ``key_id`` (already in ``doc``) its current key, in place."""
    entry = doc.get("owners", {}).get(owner)
    if entry is None:
        raise KeyError(f"no owner {owner!r}")
    if key_id not in entry["keys"]:
        raise KeyError(f"owner {owner!r} has no key {key_id!r} (keys: {', '.join(sorted(entry['keys']))})")
    entry["current"] = key_id


def write_keyring(path: Path, doc: Mapping[str, Any], *, backup: bool = True, new: bool = False) -> None:
    """Validate ``doc`` and replace the file with it durably (see :func:`replace_file`); the
    version it replaces is kept as ``<name>.bak`` unless ``backup`` is false. ``new``: a new
    key-ring (``keyring generate``), never readable by others whatever file was there: a
    placeholder made by ``touch`` or a configuration tool (0644) passed its mode on, and every
    owner's keys were readable by every local user from then on, through every rotation."""
    parse_keyring(doc, source=str(path))
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    replace_file(Path(path), text.encode("utf-8"), backup=backup, keep_mode=not new)


def replace_file(path: Path, data: bytes, *, backup: bool = False, mode: int = 0o600, keep_mode: bool = True) -> Path:
    """Replace the file at ``path`` with ``data`` at once and durably; return the file written.

    * A symlink is followed and its target replaced: replacing the link with a plain file would
      leave whatever else reads the target (a mounted secret, another path) on the old version.
    * The new file gets the old one's mode, and its owner and group when running as root (else
      its group, if the caller is a member): written 0600 by whoever ran the command, it was
      unreadable to the bridge's own user, which kept the old keys and then could not start.
      A new file gets ``mode``, as does any file when ``keep_mode`` is false. The temporary file is
      never readable by others while written.
    * The data is fsynced before the rename and the directory after it: without that a power
      loss could leave the renamed file empty (the rename reached the disk, the data had not).
    * ``backup``: the previous version is kept as ``<name>.bak``, same mode and owner, written
      the same way (a bad edit, or a disk that lost the new version, still has the old keys);
      a previous version that holds no key (empty, garbled) goes to ``<name>.bak.invalid``
      instead when ``<name>.bak`` holds keys, which stay there.
    """
    target = Path(os.path.realpath(path))
    try:
        old: os.stat_result | None = target.stat()
    except FileNotFoundError:
        old = None
    if backup and old is not None:
        previous, bak = target.read_bytes(), target.with_name(target.name + ".bak")
        # Never a key-ring's backup replaced by what is not one: a file left empty or garbled (a
        # disk full mid-write, a `>` slip), then `generate --force`, put it over the last good
        # copy of every owner's keys (found by review, 2026-12-07). Nor are those bytes lost:
        # a key-ring cut short or with a stray comma still holds the newest keys, which the
        # older .bak lacks; they go to ``<name>.bak.invalid`` (a re-review).
        if not _holds_keyring(previous) and bak.exists() and _holds_keyring(bak.read_bytes()):
            bak = target.with_name(target.name + ".bak.invalid")
        _write_new(bak, previous, old, mode)
    _write_new(target, data, old, mode, keep_mode=keep_mode)
    _fsync_dir(target.parent)
    return target


def _holds_keyring(data: bytes) -> bool:
    """Whether ``data`` holds a key (a JSON object whose owners have keys): a template with no
    owners is not a backup worth keeping over one that has them."""
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    owners = doc.get("owners") if isinstance(doc, dict) else None
    return isinstance(owners, dict) and any(isinstance(o, dict) and o.get("keys") for o in owners.values())


def _write_new(target: Path, data: bytes, like: os.stat_result | None, mode: int, *, keep_mode: bool = True) -> None:
    """Write ``data`` to a fresh temporary file beside ``target`` (mode and owner of ``like``),
    fsync it and rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            _same_owner(fh.fileno(), like)
            os.fchmod(fh.fileno(), _mode_like(like, mode, keep_mode))
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_like(like: os.stat_result | None, mode: int, keep_mode: bool) -> int:
    """The old file's mode, or ``mode`` for a new file; without ``keep_mode`` the old mode less
    what it gives others (a placeholder's 0644 becomes 0640: group kept, as its group is by
    ``_same_owner``, so a bridge reading through its group still can)."""
    if like is None:
        return mode
    old = stat.S_IMODE(like.st_mode)
    return old if keep_mode else (old & ~stat.S_IRWXO & ~stat.S_IXGRP & ~stat.S_IXUSR) | stat.S_IRUSR | stat.S_IWUSR


def _same_owner(fd: int, like: os.stat_result | None) -> None:
    # Before the mode: chown clears set-id bits, and a key-ring has none to keep anyway.
    if like is None:
        return
    if os.geteuid() == 0:
        os.fchown(fd, like.st_uid, like.st_gid)
    elif like.st_gid != os.getegid() and like.st_gid in os.getgroups():
        os.fchown(fd, -1, like.st_gid)  # a bridge reading through its group keeps reading


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory; the file itself is on disk by now.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def parse_keyring(doc: object, *, source: str = "keyring") -> dict[str, _OwnerRing]:
    """Validate a keyring document; raise ValueError naming the owner/key and the problem."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: top level must be a JSON object")
    owners = doc.get("owners")
    if not isinstance(owners, dict):
        raise ValueError(f"{source}: missing or invalid 'owners' object")
    ring: dict[str, _OwnerRing] = {}
    for owner, entry in owners.items():
        if not owner:
            raise ValueError(f"{source}: empty owner name")
        ring[owner] = _parse_owner(owner, entry, where=f"{source}: owner {owner!r}")
    return ring


def _parse_owner(owner: str, entry: object, *, where: str) -> _OwnerRing:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry must be an object with 'current' and 'keys'")
    keys_doc = entry.get("keys")
    if not isinstance(keys_doc, dict) or not keys_doc:
        raise ValueError(f"{where}: 'keys' must be a non-empty object of key id -> base64 key")
    keys = {key_id: _parse_key(owner, key_id, encoded, where=where) for key_id, encoded in keys_doc.items()}
    current = entry.get("current")
    if not isinstance(current, str) or not current:
        raise ValueError(f"{where}: 'current' must be a key id string")
    if current not in keys:
        raise ValueError(f"{where}: current key id {_shown(current)} is missing from 'keys'")
    return _OwnerRing(current=keys[current], keys=keys)


_HEX = re.compile(r"[0-9A-Fa-f]+")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")  # a key is 44: an id of 32 hex digits stays shown


def _shown(key_id: str) -> str:
    """A key id as the file's errors print it (logs, the CLI): redacted if it is a key itself. A
    secret pasted where an id goes (an id and its key swapped, the key as ``current``) was printed
    whole by the error saying so (found by review, 2026-12-07). Also without its padding, and any
    long run of base64 characters (most of a key is a secret too)."""
    text = key_id.strip()
    try:
        is_key = len(base64.b64decode(text + "=" * (-len(text) % 4), validate=True)) == KEY_SIZE
    except (binascii.Error, ValueError):
        is_key = False
    if is_key:
        return f"<redacted: {len(key_id)} characters that decode to a {KEY_SIZE}-byte key, a secret in place of an id?>"
    if _BASE64_RUN.fullmatch(text) and not _HEX.fullmatch(text):  # a hex fingerprint is an id, shown
        return f"<redacted: {len(key_id)} characters that look like key material, a secret in place of an id?>"
    return repr(key_id)


def _parse_key(owner: str, key_id: str, encoded: object, *, where: str) -> OwnerKey:
    if not key_id:
        raise ValueError(f"{where}: empty key id")
    if not isinstance(encoded, str):
        raise ValueError(f"{where}: key {_shown(key_id)} must be a base64 string")
    try:
        secret = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: key {_shown(key_id)} is not valid base64") from None
    if len(secret) != KEY_SIZE:
        raise ValueError(f"{where}: key {_shown(key_id)} decodes to {len(secret)} bytes, expected {KEY_SIZE}")
    return OwnerKey(owner=owner, key_id=key_id, secret=secret)


def load_keyring(path: Path) -> dict[str, _OwnerRing]:
    """Read and validate a keyring file (ValueError on invalid content, OSError on I/O)."""
    raw = Path(path).read_bytes()
    try:
        doc = json.loads(raw, object_pairs_hook=reject_duplicate_names)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # The message of a JSON error quotes no document content beyond a position.
        raise ValueError(f"{path}: not valid JSON ({exc.__class__.__name__} at {_position(exc)})") from None
    except ValueError as exc:  # a name given twice
        raise ValueError(f"{path}: {exc}") from None
    return parse_keyring(doc, source=str(path))


def reject_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:  # json's object_pairs_hook
    """An object that names a key id (or an owner) twice is refused: JSON readers keep the last
    one silently, so a line copied in a hand edit without its id changed gave the id a second
    secret, and every task sealed under the first failed authentication and was condemned as
    tampered with (a wrong key cannot be told from tampering)."""
    doc: dict[str, Any] = {}
    for name, value in pairs:
        if name in doc:
            raise ValueError(f"the name {_shown(name)} appears twice in one object (a key id or an owner given twice?)")
        doc[name] = value
    return doc


def _position(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno} column {exc.colno}"
    return "unknown position"


def _signature(path: Path) -> _Signature:
    st = path.stat()
    # ctime too: a chown or chmod that makes the file unreadable changes nothing else.
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _warn_if_others_can_read(path: Path) -> None:
    """A key-ring any local user can read gives them every owner's keys: said at start and at each
    reload, not refused (the bridge would then stop serving every owner)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("keyring %s is readable by every local user (mode %o): chmod o-rwx it", path, stat.S_IMODE(mode))


class KeyringFileProvider:
    """Serve owner keys from a JSON keyring file, reloading it when it changes.

    Construction loads the file and raises ValueError/OSError if it is unusable.  Change checks
    are a ``stat`` at most once per ``check_interval`` seconds (``clock`` is injectable for tests);
    the file is only read when its signature (mtime, size, inode) changed.  This small synchronous
    I/O happens on the calling thread, which is fine for a local file.
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._check_interval = check_interval
        self._clock = clock
        signature = _signature(self._path)
        self._ring: _Ring = load_keyring(self._path)
        _warn_if_others_can_read(self._path)
        self._signature: _Signature | None = signature
        self._loaded: _Signature | None = signature  # the version of the file in use
        self._unreadable: _Signature | None = None  # a version of the file that could not be read
        self._last_check = clock()
        self._listeners: list[Callable[[], None]] = []
        self.reloads = 0
        self.failed_reloads = 0
        # The file on disk is not the key-ring in use (gone, unreadable or malformed): the previous
        # keys are kept, and a restart would fail. Exported as a gauge (found by review: one
        # warning, then a crash loop at the next restart, hours later).
        self.rejected = False

    generate_keyring = staticmethod(generate_keyring)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def owners(self) -> frozenset[str]:
        return frozenset(self._ring)

    @property
    def digest(self) -> str:
        """Which key-ring is in use, comparable across bridges without showing a secret or an
        owner: a digest of its owners, key ids and current ids (not the keys). Exported as
        ``queue_bridge_keyring_loaded_info{digest}``: before ``keyring promote``, every bridge
        shows the staged key-ring's (a two-step rotation could only be checked in the logs)."""
        lines = sorted(
            f"{owner}\0{key_id}\0{int(key_id == ring.current.key_id)}"
            for owner, ring in self._ring.items()
            for key_id in ring.keys
        )
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]

    @property
    def key_count(self) -> int:
        return sum(len(ring.keys) for ring in self._ring.values())

    def __repr__(self) -> str:
        return f"KeyringFileProvider({str(self._path)!r}, owners={len(self._ring)})"

    async def current_key(self, owner: str) -> OwnerKey:
        return self._owner(owner).current

    async def key_by_id(self, owner: str, key_id: str) -> OwnerKey:
        try:
            return self._owner(owner).keys[key_id]
        except KeyError:
            raise UnknownKey(f"owner {owner!r} has no key {key_id!r}") from None

    async def close(self) -> None:
        return None

    def _owner(self, owner: str) -> _OwnerRing:
        self.maybe_reload()
        try:
            return self._ring[owner]
        except KeyError:
            raise UnknownOwner(f"no keys for owner {owner!r}") from None

    def on_reload(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every reload that changed the keyring (a cache in front of this
        provider forgets what it holds: a key rotated out because it leaked must stop sealing at
        once, not when the cache's entries expire)."""
        self._listeners.append(listener)

    def maybe_reload(self, *, force: bool = False) -> bool:
        """Reload the file if it changed (rate-limited unless ``force``); True if reloaded."""
        now = self._clock()
        if not force and now - self._last_check < self._check_interval:
            return False
        self._last_check = now
        try:
            signature: _Signature | None = _signature(self._path)
        except OSError as exc:
            if self._signature is not None:  # warn once per disappearance, not every second
                log.warning("keyring %s: cannot stat (%s); keeping the previous keyring", self._path, exc)
                self.failed_reloads += 1
            self._signature, self.rejected = None, True
            return False
        # Judged at every check, against the version in use: a file rolled back to it (the same
        # signature) is the key-ring in use again, though the broken one was seen last (a re-review).
        self.rejected = signature != self._loaded
        if signature == self._signature and not force:
            return False
        try:
            ring = load_keyring(self._path)
        except OSError as exc:
            # Not recorded: read again at the next check. A file written by another user (a
            # `keyring rotate` run as someone else: mode 0600) is unreadable until its owner or
            # mode is fixed, which changes neither its mtime nor its size: recorded, it was never
            # read again, and this bridge kept the old keys (the new ones' tasks unopenable here,
            # a removed key still usable) until it restarted.
            if signature != self._unreadable:  # warned once per version of the file
                self.failed_reloads += 1
                log.warning("keyring %s cannot be read, keeping the previous keyring: %s", self._path, exc)
            self._unreadable, self.rejected = signature, True
            return False
        except ValueError as exc:
            self._signature = signature  # malformed: read again once the file changes
            self.failed_reloads += 1
            self.rejected = True
            log.warning("keyring reload failed, keeping the previous keyring: %s", exc)
            return False
        self._signature, self._unreadable, self.rejected, self._loaded = signature, None, False, signature
        self._ring = ring
        _warn_if_others_can_read(self._path)
        self.reloads += 1
        log.info("keyring %s reloaded (%d owners)", self._path, len(ring))
        for listener in self._listeners:
            listener()
        return True
