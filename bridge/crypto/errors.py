"""Exceptions raised by :mod:`bridge.crypto`.

Every error derives from :class:`CryptoError`, itself a :class:`bridge.errors.BridgeError` whose
``code`` is the wire code the error answers if it reaches a caller untranslated (the tree is drawn
in :mod:`bridge.errors`).  How callers are expected to map them:

* :class:`KeyUnavailable` -- the key provider is down, slow or misbehaving.  Transient: answer
  ``unavailable`` and let the client retry.
* :class:`UnknownOwner` -- the provider has no keys at all for this owner: answer
  ``unauthorized`` / ``unknown_owner``.
* :class:`UnknownKey` -- the owner exists but the requested key id does not (never existed or was
  revoked).  Data sealed under it can no longer be opened.
* :class:`TamperedCiphertext` -- authentication failed.  No plaintext is ever returned in that case.

Messages may name owners and key ids but never contain key material or plaintext.
"""

from __future__ import annotations

from bridge.errors import BridgeError, ErrorCode

__all__ = ["BadKeyAnswer", "CryptoError", "KeyUnavailable", "TamperedCiphertext", "UnknownKey", "UnknownOwner"]


class CryptoError(BridgeError):
    """Base class of every error raised by :mod:`bridge.crypto`."""


class KeyUnavailable(CryptoError):
    """The key provider is unreachable, timed out, or answered something unusable (transient).

    ``stale_ok``: whether a key cached before may stand in meanwhile (``CachingKeyProvider``'s
    stale-if-error): true when the source gave no answer (down, timed out, an error of its own);
    false when it answered about this owner (refused it: 401/403, an unusable entry), which a
    cached key must not mask (a tenant suspended by disabling its key)."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str = "", code: str | None = None, *, stale_ok: bool = True) -> None:
        super().__init__(message, code)
        self.stale_ok = stale_ok


class BadKeyAnswer(KeyUnavailable):
    """The key server answered, but its entry for this owner is unusable (a key of the wrong
    length, not base64, another key's id), or it answers an error for this owner only (while it
    serves others): that owner's trouble, not the server's (no backoff of the whole server).
    Not served stale unless said so (an error status of the server's own, a timeout)."""

    def __init__(self, message: str = "", code: str | None = None, *, stale_ok: bool = False) -> None:
        super().__init__(message, code, stale_ok=stale_ok)


class UnknownOwner(CryptoError):
    """The key provider has no keys for this owner."""

    code = ErrorCode.UNKNOWN_OWNER


class UnknownKey(CryptoError):
    """The key id is not known for this owner (never existed, or revoked)."""

    code = ErrorCode.INTEGRITY_ERROR


class TamperedCiphertext(CryptoError):
    """Authenticated decryption failed: wrong key, wrong context (AAD) or modified data."""

    code = ErrorCode.INTEGRITY_ERROR
