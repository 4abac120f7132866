"""Authenticated encryption of task fields: AES-256-GCM with a random 96-bit nonce per seal.

Every sealed value is bound, through the GCM associated data, to its full context: format
version, owner, service, task id, field name and key id.  A ciphertext copied to another task,
another field, another service or another owner -- or any modified byte of nonce, ciphertext or
tag -- fails to open with :class:`~bridge.crypto.errors.TamperedCiphertext`.

Random 96-bit nonces are safe for well under 2**32 seals per key; keys are rotated far sooner.
Sealing costs a few microseconds: no key derivation, and one :class:`AESGCM` object is cached per
secret.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.crypto.errors import TamperedCiphertext
from bridge.crypto.keys import OwnerKey

__all__ = ["FORMAT_VERSION", "NONCE_SIZE", "TAG_SIZE", "Sealed", "associated_data", "open_sealed", "seal"]

FORMAT_VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16

_AAD_MAGIC = b"QBAD"  # "queue-bridge associated data"
_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed value: the id of the key it was sealed with, the nonce, and ciphertext || tag."""

    key_id: str
    nonce: bytes
    ciphertext: bytes  # includes the 16-byte GCM tag


def associated_data(
    *, owner: str, service: str, task_id: str, field: str, key_id: str, bind: Sequence[str] = ()
) -> bytes:
    """Canonical, unambiguous encoding of a sealed value's context.

    ``b"QBAD" || u8 FORMAT_VERSION || u8 count`` followed by each of owner, service, task_id,
    field, key_id and then each string of ``bind`` as ``u32 big-endian length || UTF-8 bytes``.
    Length prefixes and the count make the encoding injective: ``("ab", "c")`` and ``("a", "bc")``
    encode differently, and so do a context with and without extra bound strings. ``bind`` ties a
    ciphertext to facts stored beside it in clear (a task's trace context, whether it has a
    token), so that rewriting them is detected like rewriting the ciphertext.
    """
    parts = (owner, service, task_id, field, key_id, *bind)
    out = bytearray(_AAD_MAGIC)
    out.append(FORMAT_VERSION)
    out.append(len(parts))
    for part in parts:
        encoded = part.encode("utf-8")
        out += _LEN.pack(len(encoded))
        out += encoded
    return bytes(out)


@functools.lru_cache(maxsize=1024)
def _aead(secret: bytes) -> AESGCM:
    return AESGCM(secret)


def seal(
    key: OwnerKey, plaintext: bytes, *, service: str, task_id: str, field: str, bind: Sequence[str] = ()
) -> Sealed:
    """Encrypt ``plaintext`` under ``key`` for the given context (the owner is ``key.owner``)."""
    nonce = os.urandom(NONCE_SIZE)
    aad = associated_data(owner=key.owner, service=service, task_id=task_id, field=field, key_id=key.key_id, bind=bind)
    return Sealed(key_id=key.key_id, nonce=nonce, ciphertext=_aead(key.secret).encrypt(nonce, plaintext, aad))


def open_sealed(
    key: OwnerKey, sealed: Sealed, *, service: str, task_id: str, field: str, bind: Sequence[str] = ()
) -> bytes:
    """Decrypt and authenticate ``sealed``; raise :class:`TamperedCiphertext` on any mismatch.

    The caller looks the key up with ``key_by_id(owner, sealed.key_id)``; a key whose id differs
    from ``sealed.key_id`` is rejected before decrypting.
    """
    if key.key_id != sealed.key_id:
        raise TamperedCiphertext(
            f"sealed value names key {sealed.key_id!r}, but key {key.key_id!r} of owner {key.owner!r} was given"
        )
    if len(sealed.nonce) != NONCE_SIZE or len(sealed.ciphertext) < TAG_SIZE:
        raise TamperedCiphertext("sealed value has a malformed nonce or a truncated ciphertext")
    aad = associated_data(owner=key.owner, service=service, task_id=task_id, field=field, key_id=key.key_id, bind=bind)
    try:
        return _aead(key.secret).decrypt(sealed.nonce, sealed.ciphertext, aad)
    except InvalidTag:
        raise TamperedCiphertext(
            f"authentication failed for {field!r} of task {task_id!r} (owner {key.owner!r}, key {key.key_id!r})"
        ) from None
