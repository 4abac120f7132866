"""The wire contract's error codes as exceptions, one class per :class:`~bridge.errors.ErrorCode`.

A reply ``{"error": {"code", "message"}}`` is raised as the class of its code
(:func:`error_from_reply`; :class:`BridgeClientError` for a code this client does not know).
When no reply can come, a :class:`TransportError` is raised instead: :class:`RequestTimeout` (no
reply in time) or :class:`ConnectionLost` (the connection to RabbitMQ failed before the reply).
Retry on :class:`TransportError` and :class:`UnavailableError`: every bridge request is safe to
repeat but an add without a ``message_id`` (a retried one may store a second task: give adds a
``message_id`` to retry them). The whole tree is drawn in
:mod:`bridge.errors`.
"""

from __future__ import annotations

from bridge.errors import BridgeError, ErrorCode

__all__ = [
    "BadRequestError",
    "BridgeClientError",
    "BrokerRefused",
    "ConnectionLost",
    "IntegrityError",
    "InternalError",
    "PayloadTooLargeError",
    "RequestTimeout",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
    "UnknownOwnerError",
    "error_from_reply",
]


class BridgeClientError(BridgeError):
    """An error the bridge answered (``code`` is the reply's), or a :class:`TransportError`."""

    code = "error"


class BadRequestError(BridgeClientError):
    code = ErrorCode.BAD_REQUEST


class PayloadTooLargeError(BridgeClientError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnauthorizedError(BridgeClientError):
    code = ErrorCode.UNAUTHORIZED


class UnknownOwnerError(BridgeClientError):
    code = ErrorCode.UNKNOWN_OWNER


class IntegrityError(BridgeClientError):
    """The task's stored ciphertext failed authentication; the bridge dead-lettered it."""

    code = ErrorCode.INTEGRITY_ERROR


class UnavailableError(BridgeClientError):
    """Cassandra or the key provider is down at the bridge: retry the request."""

    code = ErrorCode.UNAVAILABLE


class InternalError(BridgeClientError):
    code = ErrorCode.INTERNAL


class TransportError(BridgeClientError):
    """No reply came (never a code on the wire): the request may or may not have run; retry it
    (an add only with a ``message_id``, or it may be stored twice)."""

    code = "transport"


class RequestTimeout(TransportError):
    """No reply within the client's timeout (the bridge is slow, paused, or not consuming).

    ``waited_s`` is how long the reply was awaited: the timeout plus what the request itself may
    take (a long-poll fetch's wait, a redrive's pace), so a message can say the real wait."""

    code = "timeout"

    def __init__(self, message: str = "", code: str | None = None, *, waited_s: float | None = None) -> None:
        super().__init__(message, code)
        self.waited_s = waited_s


class ConnectionLost(TransportError):
    """The connection to RabbitMQ failed (or could not be made) before the reply arrived.

    ``sent`` is False when the request never left this client (RabbitMQ could not be reached, or
    the publish failed): it cannot have run at the bridge, and cannot run there later."""

    code = "connection_lost"

    def __init__(self, message: str = "", code: str | None = None, *, sent: bool = True) -> None:
        super().__init__(message, code)
        self.sent = sent


class BrokerRefused(TransportError):
    """RabbitMQ refused the request before any bridge saw it: the exchange does not exist (no
    bridge has declared it yet, or a wrong name) or this user may not publish to it. The message
    is the broker's. Retrying helps only once a bridge is up or the permission granted, so
    :meth:`Worker.run <bridge.client.Worker.run>` retries it with a growing pause."""

    code = "broker_refused"


#: One class per wire code (tests/unit/test_error_model.py ties it to ErrorCode both ways).
WIRE_ERRORS: dict[str, type[BridgeClientError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        PayloadTooLargeError,
        UnauthorizedError,
        UnknownOwnerError,
        IntegrityError,
        UnavailableError,
        InternalError,
    )
}


def error_from_reply(error: object) -> BridgeClientError:
    if isinstance(error, dict):
        code = str(error.get("code", "error"))
        message = str(error.get("message", ""))
    else:
        code, message = "error", str(error)
    return WIRE_ERRORS.get(code, BridgeClientError)(message, code)
