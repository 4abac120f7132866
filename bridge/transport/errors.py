"""The transport's own failures, as the rest of the bridge sees them (no aio-pika or aiormq type)."""

from __future__ import annotations

from urllib.parse import urlsplit

from bridge.domain.errors import Unavailable
from bridge.errors import BridgeError

__all__ = ["BUSY", "BrokerUnreachable", "Busy", "amqp_where", "observed_outcome"]

# How a shed request is counted (``queue_bridge_requests_total{outcome}``): not ``unavailable``,
# which operators alert on as the sign of a store or key-provider outage.
BUSY = "busy"


class Busy(Unavailable):
    """A request a bridge turned away on purpose, nothing of it done: a cap reached (a gateway
    key's requests in flight, the redrives or long lifecycle requests one bridge runs), the bridge
    stopping, a request queue being declared again. ``unavailable`` on the wire (the contract's
    retryable code, unchanged: the caller sends it again) and counted :data:`BUSY`: counted
    ``unavailable``, one tenant's runaway client or a routine deploy paged on-call as an outage."""


def observed_outcome(exc: BaseException, code: str) -> str:
    """The outcome to count for a request that ended on ``exc``, answered ``code``."""
    return BUSY if isinstance(exc, Busy) else code


class BrokerUnreachable(BridgeError):
    """RabbitMQ could not be used at start: out of reach (connection refused, a name that does not
    resolve, a timeout), a login refused (wrong password), or a user without the permissions the
    bridge needs (a declaration refused). Raised by :meth:`bridge.app.Bridge.start` only: once
    started, the robust connection rides out an outage. ``where`` is ``host:port``, never a
    password (``secret``, the URL's, is masked should the cause quote the URL)."""

    code = "broker_unreachable"

    def __init__(self, where: str, cause: BaseException, *, secret: str | None = None) -> None:
        detail = str(cause) or type(cause).__name__
        if secret:  # as a URL's credentials only: a bare word may be a user's name, as well as its password
            detail = detail.replace(f":{secret}@", ":**********@")
        super().__init__(f"cannot connect to RabbitMQ at {where}: {type(cause).__name__}: {detail}")
        self.where = where


def amqp_where(url: str) -> tuple[str, str | None]:
    """``host:port`` of an AMQP URL (the default port of its scheme when none is given), and its
    password as written in the URL (to keep it out of messages)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        host = parts.hostname or "localhost"
    except ValueError:
        return "<unparsable BRIDGE_AMQP_URL>", None
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}", parts.password or None
