"""The errors of the wire contract, one class per :class:`~bridge.errors.ErrorCode`.

The tree and the root are in :mod:`bridge.errors`; what the transport does with the AMQP message
for each code is :data:`bridge.transport.fate.FATES`.
"""

from __future__ import annotations

from bridge.errors import BridgeError, ErrorCode

__all__ = [
    "BadRequest",
    "BridgeError",
    "ClockOff",
    "IntegrityError",
    "KeyMissing",
    "KeysUnavailable",
    "MaybeApplied",
    "NotSent",
    "PayloadTooLarge",
    "Unauthorized",
    "Unavailable",
    "UnknownOwner",
]


class BadRequest(BridgeError):
    code = ErrorCode.BAD_REQUEST


class PayloadTooLarge(BridgeError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class Unauthorized(BridgeError):
    code = ErrorCode.UNAUTHORIZED


class UnknownOwner(BridgeError):
    """No encryption key exists for the owner: nothing can be stored for it."""

    code = ErrorCode.UNKNOWN_OWNER


class IntegrityError(BridgeError):
    """A stored ciphertext failed authentication: the task is dead-lettered, never returned."""

    code = ErrorCode.INTEGRITY_ERROR


class Unavailable(BridgeError):
    """Cassandra or the key provider is down or timed out. Safe to retry."""

    code = ErrorCode.UNAVAILABLE


class MaybeApplied(Unavailable):
    """A write timed out after it was sent: it may or may not have been applied. Retrying the
    same request is safe only for an idempotent write; a counter increment must not be repeated."""


class NotSent(Unavailable):
    """Nothing of the attempt was stored: the request never reached Cassandra (no host
    reachable), or the add found another copy's record still being stored and wrote nothing."""


class KeysUnavailable(Unavailable):
    """The key provider failed when asked for an owner's keys (the key server is away, or
    answered something unusable): an outage of keys, scoped to that owner's request."""


class OwnerKeyUnusable(KeysUnavailable):
    """The key server answered, but this owner's entry is unusable (``BadKeyAnswer``): that owner's
    misconfiguration, not an outage of the server; it lasts until an operator fixes the entry."""


class ClockOff(Unavailable):
    """This bridge's clock may be off by more than it may file or place by: another bridge serves
    the request. Not retried in place (the condition is this bridge's, for seconds or more)."""


class KeyMissing(Unavailable):
    """The key that sealed a task is not available now: an outage of keys, never corruption."""
