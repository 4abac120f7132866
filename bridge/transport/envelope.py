"""Reading a request's envelope (who sent it, its deadline, its reply_to, its body) and writing
reply bodies. Every problem found here is the caller's: a :mod:`bridge.domain.errors` error."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bridge.domain import jsonvalue
from bridge.domain.errors import BadRequest, PayloadTooLarge, Unauthorized
from bridge.errors import BridgeError
from bridge.transport import wire
from bridge.transport.add_retry import DEFERRED_HEADER
from bridge.transport.replies import DIRECT_REPLY_PREFIX, BadReplyTo, reply_node
from bridge.transport.request import RequestMessage
from bridge.transport.tolerant_decoding import MAX_DEPTH, TOO_DEEP
from bridge.transport.wire import iso

__all__ = [
    "DEADLINE_HEADER",
    "ENVELOPE_ALLOWANCE",
    "IDEMPOTENCY_HEADER",
    "OWNER_PATTERN",
    "AddKey",
    "Identity",
    "check_reply_to",
    "check_text",
    "deadline_of",
    "idempotency_of",
    "iso",  # moved to bridge.transport.wire, still importable from here
    "read_body",
    "reply_body",
    "sent_before_ms",
    "usable_reply_to",
]

DEADLINE_HEADER = "x-deadline"
IDEMPOTENCY_HEADER = "x-idempotency-key"
IDEMPOTENCY_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{0,255}")
OWNER_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{1,255}")
#: A queue the broker named (``queue.declare`` with an empty name). No client can declare a queue
#: whose name starts with ``amq.`` (403 ACCESS_REFUSED), so such a name is never one of the
#: bridge's queues nor any queue an operator named; only its declarer knows it (128 random bits).
SERVER_NAMED_QUEUE = re.compile(r"amq\.gen-[A-Za-z0-9_+/=-]{1,247}")
#: A request body may be this much larger than BRIDGE_MAX_VALUE_BYTES (the rest of the request).
ENVELOPE_ALLOWANCE = 65_536


class Identity:
    """Who sent a message: the broker-validated ``user_id``, or the owner a trusted engine names."""

    def __init__(self, trusted_users: list[str]) -> None:
        self.trusted = frozenset(trusted_users)

    def owner_of(self, message: RequestMessage) -> str:
        user = message.user_id
        if not user:
            raise Unauthorized("the message has no user_id property; set it to your AMQP user name")
        headers = message.headers or {}
        if "x-owner" in headers and headers["x-owner"] is None:
            # A void value (a Java client's null): taken for absent, the request acted for the
            # trusted user itself, its tasks filed under the engine's own name (found by review).
            raise BadRequest("the x-owner header must be a string (it is void)")
        named = self._named_owner(headers.get("x-owner"))
        if user in self.trusted:
            return named or user
        if named is not None and named != user:
            raise Unauthorized(f"user {user!r} may not act for owner {named!r}")
        return user

    @staticmethod
    def _named_owner(header: Any) -> str | None:
        """The x-owner header, checked like any other caller input (any user can send it). Empty
        is the same as absent (docs/asyncapi.yaml, Owners: a trusted user acts for the x-owner
        "if present and non-empty, else the user-id")."""
        if header is None:
            return None
        if isinstance(header, bytes):
            try:
                header = header.decode()
            except UnicodeDecodeError:
                raise BadRequest("the x-owner header is not valid UTF-8") from None
        if not isinstance(header, str):
            raise BadRequest("the x-owner header must be a string")
        if not header:
            return None
        if not OWNER_PATTERN.fullmatch(header):
            raise BadRequest("the x-owner header must be 1 to 255 printable characters")
        return header


def deadline_of(message: RequestMessage) -> int | None:
    """The caller's deadline (``x-deadline`` header, milliseconds since the epoch), if it set one."""
    value = (message.headers or {}).get(DEADLINE_HEADER)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"the {DEADLINE_HEADER} header must be an integer (milliseconds since the epoch)")
    return value


@dataclass(frozen=True)
class AddKey:
    """How an add is de-duplicated: ``key`` (None: not at all), and whether the key only guards
    against a redelivery of this very message (``first_copy``: this is its first delivery, so no
    other copy can exist yet and the key is recorded without an LWT)."""

    key: str | None
    first_copy: bool = False
    # A redelivery of a message whose first delivery recorded its key that way: that delivery may
    # be storing still, its channel closed under it (``WorkQueue.store_add``).
    first_copy_may_be_storing: bool = False


def idempotency_of(message: RequestMessage) -> AddKey:
    """The add's idempotency key (contract 1.5): the ``x-idempotency-key`` header when present
    (an empty one: the caller has no key of its own), else the ``message-id`` (1.4 and before).

    Without a key of the caller's own, a ``message-id`` still makes a broker redelivery of this
    message (after a bridge died holding it) answer the task its first delivery stored: that
    costs no LWT on the first delivery (RabbitMQ flags every redelivery). The bundled Python
    client sends the header because its AMQP library fills in a random ``message-id`` on every
    message, which under the 1.4 rule cost an LWT per add for a key nobody could repeat."""
    headers = message.headers or {}
    if IDEMPOTENCY_HEADER in headers and headers[IDEMPOTENCY_HEADER] is None:
        # Void: neither a key nor "no key" (empty); taken for absent, the message id became the key.
        raise BadRequest(f"the {IDEMPOTENCY_HEADER} header must be a string (it is void)")
    header = headers.get(IDEMPOTENCY_HEADER)
    if header is None:
        return AddKey(message.message_id or None)
    if isinstance(header, bytes):
        try:
            header = header.decode()
        except UnicodeDecodeError:
            raise BadRequest(f"the {IDEMPOTENCY_HEADER} header is not valid UTF-8") from None
    if not isinstance(header, str) or not IDEMPOTENCY_PATTERN.fullmatch(header):
        raise BadRequest(f"the {IDEMPOTENCY_HEADER} header must be a string of 0 to 255 printable characters")
    if header:
        return AddKey(header)
    if not message.message_id:
        return AddKey(None)
    # A copy from the bridge's retry lane (bridge.transport.add_retry) may have a twin: the original,
    # if its acknowledgement was lost after the copy was confirmed. So may an add dead-lettered
    # once (``x-death``) and moved back by an operator (a shovel, a move in the management UI): it
    # comes unflagged, and its task may have been stored long ago. Both take the LWT, and neither
    # has a delivery storing it now to wait for.
    headers = message.headers or {}
    deferred = DEFERRED_HEADER in headers or "x-death" in headers
    return AddKey(
        message.message_id,
        first_copy=not message.redelivered and not deferred,
        first_copy_may_be_storing=bool(message.redelivered) and not deferred,
    )


def _is_text(value: str) -> bool:
    """False for a string decoded from bytes that are not UTF-8: they come as lone surrogates
    (:mod:`bridge.transport.tolerant_decoding`)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(message: RequestMessage) -> None:
    """The text of the content header must be UTF-8, as AMQP defines a short string: the
    properties the bridge reads and the names of the application headers. Anything else is the
    caller's mistake (``bad_request``), refused before it is used: an owner or an idempotency key
    made of it could not even be stored, and a header without a name in text is a broken table,
    not an unknown entry to ignore. (Other properties are never read; a header's value is checked
    where it is read, as x-owner's is.)"""
    texts = (
        ("user-id", message.user_id),
        ("reply-to", message.reply_to),
        ("correlation-id", message.correlation_id),
        ("message-id", message.message_id),
    )
    for name, value in texts:
        if value and not _is_text(value):
            raise BadRequest(f"the {name} property is not valid UTF-8")
    if message.headers and not all(isinstance(key, str) and _is_text(key) for key in message.headers):
        raise BadRequest("the name of an application header is not valid UTF-8")
    if message.headers and any(value is TOO_DEEP for value in message.headers.values()):
        raise BadRequest(f"an application header nests tables or arrays deeper than {MAX_DEPTH} levels")


def usable_reply_to(reply_to: str | None) -> bool:
    """Whether the bridge publishes replies to ``reply_to``: a direct reply-to name (its form is
    checked further by :func:`check_reply_to`) or a server-named queue, nothing else.

    The bridge publishes its replies through the default exchange, which reaches any queue by
    name, with its own broker-validated ``user_id``. Any other name would be a queue of the
    caller's choosing that the caller itself may not write to: the engine's results queue (whose
    consumers trust the bridge's ``user_id``), the bridge's own request or dead-letter queues, any
    queue of the vhost. A request naming one is refused (:func:`check_reply_to`) and its error is
    not published there either."""
    if not reply_to:
        return False
    return reply_to.startswith(DIRECT_REPLY_PREFIX) or SERVER_NAMED_QUEUE.fullmatch(reply_to) is not None


def check_reply_to(message: RequestMessage) -> None:
    """A reply_to the bridge does not publish to (:func:`usable_reply_to`), or a direct reply-to
    name the broker could not have made (issue 13.3), is refused before the request runs."""
    reply_to = message.reply_to
    if not reply_to:
        return
    if not usable_reply_to(reply_to):
        raise BadRequest(
            "reply_to must be direct reply-to (send amq.rabbitmq.reply-to) or a server-named queue (amq.gen-...)"
        )
    try:
        reply_node(reply_to)
    except BadReplyTo as exc:
        raise BadRequest(str(exc)) from None


def sent_before_ms(message: RequestMessage) -> int | None:
    """An upper bound of when the request was sent, from the AMQP ``timestamp`` property (whole
    seconds): the request was sent before the end of that second."""
    ts = message.timestamp
    if ts is None:
        return None
    return (int(ts.timestamp()) + 1) * 1000


def read_body(message: RequestMessage, max_value_bytes: int) -> Any:
    """The request body as JSON: ``payload_too_large`` beyond the limit, ``bad_request`` if not JSON."""
    limit = max_value_bytes + ENVELOPE_ALLOWANCE
    if len(message.body) > limit:
        raise PayloadTooLarge(f"the message body is {len(message.body)} bytes; the limit is {limit}")
    try:
        return jsonvalue.loads(message.body)
    except jsonvalue.JsonError as exc:
        raise BadRequest(f"the body is {exc}") from None


def reply_body(result: Any = None, *, error: BridgeError | None = None, extra: dict[str, Any] | None = None) -> bytes:
    """``{"result": ...}`` (plus ``extra``) or ``{"error": {"code", "message"}}`` (see :mod:`bridge.transport.wire`)."""
    if error is not None:
        return wire.encode(wire.error(error))
    return wire.encode(wire.reply(result, extra=extra))
