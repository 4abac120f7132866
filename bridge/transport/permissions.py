"""The narrowest RabbitMQ permissions that work, per role, for the names a bridge is configured with.

One source of truth for ``queue-bridge permissions`` (prints ``rabbitmqctl`` lines), the shipped
definitions (``deploy/compose``), the local stack and the tests that prove each forbidden action is
refused by the broker. RabbitMQ permissions are three regular expressions per user and vhost:
configure (declare, delete), write (publish to an exchange, bind a queue) and read (consume, get,
bind from an exchange).

- **bridge**: declares and consumes its own queues and exchanges, publishes results, and replies
  through the default exchange (``amq.default``: direct reply-to).
- **engine** (a trusted user): publishes adds to the bridge's exchange and consumes its results
  queue. It cannot declare anything, so it cannot bind its own queue to the results exchange.
- **worker**: publishes fetch, ack (and adds for its own tenant) to the bridge's exchange; nothing
  else. It cannot consume or bind any queue, cannot publish results, and cannot publish to the
  default exchange (no forged replies). Direct reply-to needs no permission.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

NOTHING = "^$"


@dataclass(frozen=True)
class Permission:
    configure: str
    write: str
    read: str

    def rabbitmqctl(self, user: str, vhost: str = "/") -> str:
        # Every argument quoted for the shell: a user or vhost name is the operator's (or the
        # URL's) text, and one with a space, a quote or a ';' made a line that set the wrong
        # permissions or ran something else when pasted.
        return shlex.join(["rabbitmqctl", "set_permissions", "-p", vhost, user, self.configure, self.write, self.read])


def bridge_names(exchange: str, results_exchange: str, queue_prefix: str, results_queue: str | None) -> list[str]:
    """Every exchange and queue the bridge declares."""
    names = [exchange, f"{exchange}.dead", f"{exchange}.unrouted", results_exchange]
    names += [
        f"{queue_prefix}.{q}"
        for q in ("add", "fetch", "ack", "lifecycle", "unrouted", "dead-letter", "duty", "add-retry")
    ]
    if results_queue:
        names.append(results_queue)
    return names


def _escape(name: str) -> str:
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", name)


def _exactly(names: list[str], patterns: tuple[str, ...] = ()) -> str:
    unique = dict.fromkeys(names)  # the results exchange and queue may share a name
    return "^(" + "|".join([*(_escape(n) for n in unique), *patterns]) + ")$"


def hint_queues(queue_prefix: str) -> str:
    """The pattern of the bridge's hint queues (``bridge.transport.hints``): one per service queue."""
    return _escape(queue_prefix) + r"\.hints\.p?[0-9a-f]{24}"


def role_permissions(
    exchange: str, results_exchange: str, queue_prefix: str, results_queue: str | None
) -> dict[str, Permission]:
    own = bridge_names(exchange, results_exchange, queue_prefix, results_queue)
    # The results queue is the engine's: the bridge declares it and binds it to the results
    # exchange (configure, write on the queue, read on the exchange), and never consumes it. Read
    # on it would let the bridge's user take the engine's results; it stays only when the queue
    # shares its name with something the bridge reads (the results exchange, by default).
    readable = bridge_names(exchange, results_exchange, queue_prefix, None)
    hints = hint_queues(queue_prefix)
    return {
        "bridge": Permission(
            _exactly(own, (hints,)), _exactly([*own, "amq.default"], (hints,)), _exactly(readable, (hints,))
        ),
        "engine": Permission(NOTHING, _exactly([exchange]), _exactly([results_queue]) if results_queue else NOTHING),
        "worker": Permission(NOTHING, _exactly([exchange]), NOTHING),
    }


def amqp_user(url: str) -> str:
    """The user of an AMQP URL (RabbitMQ's default ``guest`` when none is given)."""
    return unquote(urlparse(url).username or "guest")


def amqp_vhost(url: str) -> str:
    """The virtual host of an AMQP URL: its path without the leading slash, percent-decoded
    (``/%2F`` is ``/``, ``/prod`` is ``prod``); ``/`` when the path is empty, as the clients
    the bridge uses read it."""
    path = urlparse(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"
