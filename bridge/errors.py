"""The one exception tree of queue-bridge, and the wire error codes.

Every exception the bridge or its client raises on purpose derives from :class:`BridgeError`,
which carries a ``code`` and a ``message``. The code is one of :class:`ErrorCode` (what goes on the
wire in ``{"error": {"code", "message"}}``) or, for errors that never travel, a local name. What the
transport does with the AMQP message for each wire code is one table,
:data:`bridge.transport.fate.FATES`.

Exception hierarchy::

    BridgeError (code, message)                                   bridge.errors
    ├── BadRequest ............................ bad_request        bridge.domain.errors
    │   └── NotFound, MethodNotAllowed, ....... (HTTP 404, 405,     bridge.gateway.errors
    │       UnsupportedMediaType, HttpError      415, other 4xx)
    ├── PayloadTooLarge ....................... payload_too_large
    ├── Unauthorized .......................... unauthorized
    │   ├── Unauthenticated ................... (HTTP 401)         bridge.gateway.errors
    │   └── Forbidden ......................... (HTTP 403)
    ├── UnknownOwner .......................... unknown_owner
    ├── IntegrityError ........................ integrity_error
    ├── Unavailable ........................... unavailable (retryable)
    │   ├── Busy (turned away on purpose: a cap,  bridge.transport.errors
    │   │   a stop; counted outcome="busy")
    │   ├── ClockOff (this bridge's clock may be too far off to file or place: another bridge serves it)
    │   ├── KeyMissing
    │   ├── KeysUnavailable (the key provider failed for an owner)
    │   │   └── OwnerKeyUnusable (that owner's key-server entry is unusable)
    │   ├── MaybeApplied (a timed-out write: never repeat a counter increment)
    │   ├── NotSent (never reached Cassandra: certainly not applied)
    │   └── StorageError                                          bridge.storage.errors
    │       ├── StorageUnavailable
    │       │   ├── StorageNotSent (also a NotSent)
    │       │   │   └── SchemaMissing (the keyspace or a table dropped)
    │       │   └── SchemaNotReady (start only: waits for  bridge.storage.schema
    │       │       `queue-bridge schema`)
    │       └── UnknownOutcome (also a MaybeApplied)
    ├── RequestAbandoned ...................... (no reply: nobody  bridge.domain.fetching
    │                                                waits for it)
    ├── InvalidQuery .......................... internal (a bug)   bridge.storage.errors
    ├── CryptoError ........................... (per subclass)     bridge.crypto.errors
    │   ├── KeyUnavailable .................... unavailable
    │   │   ├── BadKeyAnswer (one owner's key-server entry unusable, or the server failing
    │   │   │   for that owner only)
    │   │   ├── _AnsweredError (an error status answered; never leaves bridge.crypto.keyserver)
    │   │   ├── _Malformed (a 200 not a JSON object, or too large: the server's trouble unless others served)
    │   │   └── _TimedOut (a lookup unanswered in time; never leaves bridge.crypto.keyserver)
    │   ├── UnknownOwner (crypto) ............. unknown_owner
    │   ├── UnknownKey ........................ integrity_error
    │   └── TamperedCiphertext ................ integrity_error
    ├── ConfigError ........................... config           bridge.config
    │   └── LayoutMismatch (start only) ....... exit 2           bridge.storage.schema
    ├── BrokerUnreachable ..................... (start only)     bridge.transport.errors
    └── BridgeClientError ..................... (the reply's)    bridge.client.errors
        ├── BadRequestError, PayloadTooLargeError, UnauthorizedError, UnknownOwnerError,
        │   IntegrityError, UnavailableError, InternalError ...... one per ErrorCode
        └── TransportError .................... (no reply: retry the request)
            ├── RequestTimeout ................ timeout
            ├── ConnectionLost ................ connection_lost
            └── BrokerRefused ................. broker_refused (no exchange, no permission)

Anything else raised while serving a request (a bug) is answered ``internal``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["BridgeError", "ErrorCode", "wire_code"]


class ErrorCode(StrEnum):
    """The error codes of the wire contract (docs/asyncapi.yaml ``ErrorCode``), all of them."""

    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_OWNER = "unknown_owner"
    INTEGRITY_ERROR = "integrity_error"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class BridgeError(Exception):
    """Root of every queue-bridge exception: a stable ``code`` and a human ``message``.

    Subclasses set ``code`` as a class attribute; an instance may override it."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


def wire_code(exc: BaseException) -> ErrorCode:
    """The wire code that answers ``exc``: its own if it has one, else ``internal``."""
    code = getattr(exc, "code", None) if isinstance(exc, BridgeError) else None
    try:
        return ErrorCode(code) if code is not None else ErrorCode.INTERNAL
    except ValueError:
        return ErrorCode.INTERNAL
