"""Errors with a stable wire code. Transport turns them into ``{"error": {"code", "message"}}``."""

from __future__ import annotations


class BridgeError(Exception):
    code = "internal"
    #: add commands failing with a transient error are requeued (with backoff) instead of dead-lettered.
    transient = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(BridgeError):
    code = "bad_request"


class PayloadTooLarge(BridgeError):
    code = "payload_too_large"


class Unauthorized(BridgeError):
    code = "unauthorized"


class UnknownOwner(BridgeError):
    """No encryption key exists for the owner: nothing can be stored for it."""

    code = "unknown_owner"


class IntegrityError(BridgeError):
    """A stored ciphertext failed authentication: the task is dead-lettered, never returned."""

    code = "integrity_error"


class Unavailable(BridgeError):
    """Cassandra or the key provider is down or timed out. Safe to retry."""

    code = "unavailable"
    transient = True


class KeyMissing(Unavailable):
    """The key that sealed a task is not available now: an outage of keys, never corruption."""
