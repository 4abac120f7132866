"""The gateway's API keys: who a bearer credential is, and which owner it acts for.

A key is ``qb_<id>_<secret>`` (``Authorization: Bearer qb_<id>_<secret>``). The keys file
(``BRIDGE_GATEWAY_KEYS_FILE``) is a JSON list with one entry per key::

    [{"id": "k1a2b3c4d5e6", "owner": "tenant-a", "sha256": "<hex of SHA-256 of the secret>", "trusted": false}]

It never holds a secret: a presented key is looked up by its id and the SHA-256 of its secret is
compared with the stored one in constant time (:func:`hmac.compare_digest`; an unknown id is
compared against a dummy digest, so timing tells nothing either). A ``trusted`` key may name the
owner with ``X-Owner``, as the users of ``BRIDGE_TRUSTED_USERS`` do with ``x-owner`` on AMQP.

The file is read at start (a missing or invalid file stops the bridge) and re-read when it changes
(checked at most once a second): keys are added and revoked without a restart. A file that is
gone, unreadable or does not parse fails closed: no key is accepted until it is fixed (logged as
an error). ``queue-bridge gateway-key-revoke`` removes a key without editing the file by hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config import ConfigError
from bridge.domain.errors import Unavailable
from bridge.gateway.errors import Unauthenticated
from bridge.transport.envelope import OWNER_PATTERN

log = logging.getLogger("bridge.gateway")

KEY_PREFIX = "qb_"
ID_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")  # no "_": the first one after the id ends it
SECRET_PATTERN = re.compile(r"[\x21-\x7e]{1,512}")  # printable ASCII, no spaces
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
RECHECK_S = 1.0
_DUMMY_DIGEST = hashlib.sha256(b"no such key").digest()


class KeysUnavailable(Unavailable):
    """The keys file cannot be used (gone, unreadable, not valid): no key is accepted (503)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    owner: str
    digest: bytes  # SHA-256 of the secret
    trusted: bool = False


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of a key's secret, as the keys file stores it."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(owner: str, *, trusted: bool = False, key_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """A fresh key (shown once) and its entry for the keys file."""
    key_id = key_id or secrets.token_hex(6)
    if not ID_PATTERN.fullmatch(key_id):
        raise ValueError("a key id is 1 to 64 letters, digits or '-'")
    if not OWNER_PATTERN.fullmatch(owner):
        raise ValueError("an owner is 1 to 255 printable characters")
    secret = secrets.token_urlsafe(32)
    entry = {"id": key_id, "owner": owner, "sha256": hash_secret(secret), "trusted": trusted}
    return f"{KEY_PREFIX}{key_id}_{secret}", entry


def parse_keys(doc: Any, source: str = "the keys file") -> dict[str, ApiKey]:
    """Validate a keys document; ``ValueError`` naming the entry at fault."""
    if not isinstance(doc, list):
        raise ValueError(f"{source}: must be a JSON list of {{id, owner, sha256, trusted}}")
    keys: dict[str, ApiKey] = {}
    for i, entry in enumerate(doc):
        where = f"{source}: entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = set(entry) - {"id", "owner", "sha256", "trusted"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        key_id, owner, digest, trusted = (entry.get(f) for f in ("id", "owner", "sha256", "trusted"))
        if not isinstance(key_id, str) or not ID_PATTERN.fullmatch(key_id):
            raise ValueError(f"{where}: id must be 1 to 64 letters, digits or '-'")
        if key_id in keys:
            raise ValueError(f"{where}: id {key_id!r} is used twice")
        if not isinstance(owner, str) or not OWNER_PATTERN.fullmatch(owner):
            raise ValueError(f"{where}: owner must be 1 to 255 printable characters")
        if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
            raise ValueError(f"{where}: sha256 must be 64 lower-case hex digits (the SHA-256 of the secret)")
        if trusted is None:
            trusted = False
        if not isinstance(trusted, bool):
            raise ValueError(f"{where}: trusted must be true or false")
        keys[key_id] = ApiKey(key_id, owner, bytes.fromhex(digest), trusted)
    return keys


class KeysFileUnreadable(ValueError):
    """The keys file exists but cannot be read (its mode or owner): fixing that changes neither its
    mtime nor its size, so it is read again at every look, not only once it changes."""


def read_keys_file(path: Path) -> dict[str, ApiKey]:
    """The keys of a file; ``ValueError`` if it cannot be read or is invalid."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise KeysFileUnreadable(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({type(exc).__name__})") from None
    return parse_keys(doc, str(path))


def split_key(token: str) -> tuple[str, str] | None:
    """``qb_<id>_<secret>`` as (id, secret), or None when it is not of that form."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or not ID_PATTERN.fullmatch(key_id) or not SECRET_PATTERN.fullmatch(secret):
        return None
    return key_id, secret


class KeyFile:
    """The keys of ``BRIDGE_GATEWAY_KEYS_FILE``, re-read when the file changes."""

    def __init__(self, path: Path, *, recheck_s: float = RECHECK_S, monotonic: Callable[[], float] = time.monotonic):
        self.path = path
        self.recheck_s = recheck_s
        self._monotonic = monotonic
        self._stamp: tuple[int, int, int] | None = None
        self._checked = monotonic()
        self._broken: str | None = None  # why the file last read could not be used (fail closed)
        try:
            # The stamp before the read (as refresh() does): a change made while the file is read
            # then differs from it and is read at the next look, not missed until the next change.
            self._stamp = self._stat()
            self._keys = read_keys_file(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"BRIDGE_GATEWAY_KEYS_FILE: {exc}") from None

    def __len__(self) -> int:
        return len(self._keys)

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self) -> None:
        """Re-read the file if it changed since the last look (at most once per ``recheck_s``).

        A file that is gone, cannot be read or does not parse fails closed: no key is accepted
        until it is fixed. Keeping the keys read before (as this once did) kept a revoked key in
        force after the usual slips of a revocation by hand (the file emptied, deleted, or left
        with a trailing comma), with nothing but a warning to show for it; a gateway that
        answers 401 to everyone is noticed and fixed, a leaked key still accepted is not."""
        now = self._monotonic()
        if now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            stamp: tuple[int, int, int] | None = self._stat()
        except OSError as exc:
            self._fail_closed(None, f"unreadable ({exc.strerror or exc})")
            return
        if stamp == self._stamp:
            return
        try:
            keys = read_keys_file(self.path)
        except KeysFileUnreadable as exc:
            self._fail_closed(None, str(exc))
            return
        except ValueError as exc:
            self._fail_closed(stamp, f"invalid ({exc})")
            return
        self._stamp = stamp
        self._keys = keys
        self._broken = None
        log.info("gateway keys reloaded", extra={"keys": len(keys)})

    def _fail_closed(self, stamp: tuple[int, int, int] | None, why: str) -> None:
        if self._keys or stamp != self._stamp:  # said once per version of the file, not every second
            log.error("gateway keys file %s: no API key is accepted until it is fixed", why)
        self._stamp = stamp
        self._keys = {}
        self._broken = why

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an ``Authorization`` header presents; :class:`Unauthenticated` otherwise."""
        if authorization is None:
            raise Unauthenticated("no credentials: send Authorization: Bearer qb_<id>_<secret>")
        scheme, _, token = authorization.strip().partition(" ")
        parts = split_key(token.strip()) if scheme.lower() == "bearer" else None
        if parts is None:
            raise Unauthenticated("malformed credentials: send Authorization: Bearer qb_<id>_<secret>")
        self.refresh()
        if self._broken is not None:
            # Closed, but not ``unauthorized``: that says the key is wrong, and clients (this
            # project's among them) do not retry it; a worker stopped for a file caught half
            # written by an editor (truncated, then written) for the second it was read.
            # Not why: the reason names the file's path and its entries (key ids), and any
            # caller with a well-formed token reads this; the operator has it in the log.
            raise KeysUnavailable("the gateway's keys file cannot be used now: no API key can be checked; retry")
        key_id, secret = parts
        key = self._keys.get(key_id)
        presented = hashlib.sha256(secret.encode()).digest()
        matches = hmac.compare_digest(presented, key.digest if key is not None else _DUMMY_DIGEST)
        if key is None or not matches:
            # One answer for an unknown id and a wrong secret: nothing to learn from it.
            raise Unauthenticated("invalid API key")
        return key
