"""The RabbitMQ nodes a connection may use: one URL's credentials, vhost and options, several hosts.

A bridge is a sidecar, so a fleet has one connection (or three) per pod on one RabbitMQ cluster.
When the node a bridge is connected to goes away, the bridge must reconnect to another node, not
wait for that one to come back; and a fleet should not pile onto the first node of a list. Hence
``BRIDGE_AMQP_HOSTS``: the nodes of the cluster, tried in an order shuffled once per process (the
Java client's and Spring's address-list shuffling), starting after the node that was lost.

Pure functions (no I/O): both the bridge's transport and the Python client use them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

__all__ = ["node_urls", "parse_host", "without_password"]


def parse_host(host: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port or None).

    Raises ValueError with a message fit for an operator on anything else."""
    text = host.strip()
    if not text:
        raise ValueError("an empty host")
    if "/" in text or "@" in text:
        raise ValueError(f"{host!r} is not host[:port] (give the credentials and vhost in BRIDGE_AMQP_URL)")
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{host!r} is not host[:port] ({exc})") from None
    if not parts.hostname:
        raise ValueError(f"{host!r} is not host[:port]")
    return parts.hostname, port


def without_password(url: str) -> str:
    """``url`` with its password masked (for logs and ``queue-bridge config``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    return _with_host(url, host, parts.port, userinfo=f"{parts.username}:**********")


def without_secrets(url: str) -> str:
    """``url`` with its password and its query's values masked: a key server's URL may carry a
    token as a query parameter (``?token=...``), which reads every owner's key."""
    url = without_password(url)
    parts = urlsplit(url)
    if not parts.query:
        return url
    masked = "&".join(f"{pair.partition('=')[0]}=**********" if pair else pair for pair in parts.query.split("&"))
    return urlunsplit(parts._replace(query=masked))


def _with_host(url: str, host: str, port: int | None, *, userinfo: str | None = None) -> str:
    parts = urlsplit(url)
    if userinfo is None:
        userinfo, _, _ = parts.netloc.rpartition("@")
    where = f"[{host}]" if ":" in host else host
    if port is not None:
        where = f"{where}:{port}"
    netloc = f"{userinfo}@{where}" if userinfo else where
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def node_urls(url: str, hosts: Sequence[str], rng: random.Random | None = None) -> list[str]:
    """The URLs to try, in order: ``url`` alone without ``hosts``; else ``url`` with each host
    (and port, where one is given; else the URL's own port) in place of its host, shuffled by
    ``rng`` (a fleet spreads its connections over the nodes)."""
    if not hosts:
        return [url]
    own_port = urlsplit(url).port
    urls = []
    for host in hosts:
        name, port = parse_host(host)
        urls.append(_with_host(url, name, port if port is not None else own_port))
    (rng or random.Random()).shuffle(urls)  # nosec B311 - spreading load, not a secret
    return urls
