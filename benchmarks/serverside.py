"""Cassandra requests as Cassandra counts them: per client connection, by the process that holds it.

A bridge's own counter (``queue_bridge_cassandra_requests_total``) counts the statements the bridge
sends. The drivers send requests of their own beside them: a heartbeat (OPTIONS) on every idle
connection every 10 s (``heartbeat_interval_sec`` / ``idle_heartbeat_interval``), on the control
connection and on each pool connection, plus the control connection's metadata and schema queries.
Cassandra counts every request a connection sends, whatever it is (``request_count`` of
``system_views.clients``, Cassandra 4.0+: one row per connection, keyed by the client's ``address``
and ``port``; ``Dispatcher.processRequest`` counts each request before executing it).

The rows say nothing of which process a connection belongs to: this module finds, in /proc, the
local address and port of every TCP connection to Cassandra's port that each given process holds,
so a window's requests are summed over the bridges' connections only, not over the benchmark's own
probe session (which reads the table) nor over another client of the same server.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CLIENTS_CQL = "SELECT address, port, request_count FROM system_views.clients"
ESTABLISHED = "01"

Conn = tuple[str, int]  # (client address, client port), as system_views.clients keys its rows


def _ip(value: Any) -> str:
    """A client address as one spelling: an IPv4-mapped IPv6 address as the IPv4 one."""
    ip = ipaddress.ip_address(value if isinstance(value, bytes | int) else str(value).strip("/"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _proc_addr(hexed: str) -> Conn:
    """``0100007F:A3F2`` (/proc/net/tcp: the address in host byte order, 32-bit words) -> (ip, port)."""
    addr, port = hexed.split(":")
    raw = bytes.fromhex(addr)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _ip(packed), int(port, 16)


def tcp_connections(remote_port: int) -> dict[int, Conn]:
    """Established TCP connections to ``remote_port`` on this host: socket inode -> local (ip, port)."""
    out: dict[int, Conn] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != ESTABLISHED:
                continue
            if int(fields[2].rsplit(":", 1)[1], 16) != remote_port:
                continue
            out[int(fields[9])] = _proc_addr(fields[1])
    return out


def socket_inodes(pid: int) -> set[int]:
    """The sockets process ``pid`` holds (its /proc/<pid>/fd links ``socket:[inode]``). A process
    whose descriptors cannot be listed (gone, not ours) raises: its connections would be missed."""
    out: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def connections_to(port: int, groups: Mapping[str, list[int]]) -> dict[Conn, str]:
    """The client side of every connection to ``port`` held by the given processes: (local ip, local
    port) -> the name of the group holding it."""
    conns = tcp_connections(port)
    out: dict[Conn, str] = {}
    for name, pids in groups.items():
        for pid in pids:
            for inode in socket_inodes(pid):
                if inode in conns:
                    out[conns[inode]] = name
    return out


@dataclass(frozen=True)
class Snapshot:
    """``system_views.clients`` at one moment: each connection's request count, and who holds it."""

    at: float  # time.monotonic() when the counts were read
    requests: dict[Conn, int]
    owners: dict[Conn, str]


async def snapshot(db: Any, port: int, groups: Mapping[str, list[int]]) -> Snapshot:
    """Read every connection's request count (through ``db``, the benchmark's own session: its
    connections are in ``groups`` too, or they count as another client's). Connections are
    attributed before and after the read: one opened meanwhile is attributed all the same."""
    owners = connections_to(port, groups)
    rows = await db.execute_raw(CLIENTS_CQL)
    at = time.monotonic()
    owners.update(connections_to(port, groups))
    requests = {(_ip(r["address"]), int(r["port"])): int(r["request_count"] or 0) for r in rows}
    return Snapshot(at=at, requests=requests, owners=owners)


@dataclass
class Window:
    """Requests Cassandra received between two snapshots."""

    seconds: float
    by_owner: dict[str, int] = field(default_factory=dict)  # group -> requests in the window
    connections: dict[str, int] = field(default_factory=dict)  # group -> its connections counted
    other: int = 0  # requests on connections held by none of the groups (another client of the server)
    opened: dict[str, int] = field(default_factory=dict)  # group -> connections first seen at the end (counted whole)
    closed: dict[str, int] = field(default_factory=dict)  # group -> connections gone at the end (requests missed)

    def total(self, owners: set[str]) -> int:
        return sum(n for name, n in self.by_owner.items() if name in owners)


def between(start: Snapshot, end: Snapshot) -> Window:
    w = Window(seconds=end.at - start.at)
    for conn, count in end.requests.items():
        before = start.requests.get(conn)
        owner = end.owners.get(conn) or start.owners.get(conn)
        if before is None or count < before:  # new (or a port reused by a new connection)
            before = 0
            if owner is not None:
                w.opened[owner] = w.opened.get(owner, 0) + 1
        if owner is None:
            w.other += count - before
            continue
        w.by_owner[owner] = w.by_owner.get(owner, 0) + count - before
        w.connections[owner] = w.connections.get(owner, 0) + 1
    for conn in start.requests.keys() - end.requests.keys():
        owner = start.owners.get(conn)
        if owner is not None:
            w.closed[owner] = w.closed.get(owner, 0) + 1
    return w
