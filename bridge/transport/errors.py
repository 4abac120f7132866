"""The transport's own failures, as the rest of the bridge sees them (no aio-pika or aiormq type)."""

from __future__ import annotations

from urllib.parse import urlsplit

from bridge.errors import BridgeError

__all__ = ["BrokerUnreachable", "amqp_where"]


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
