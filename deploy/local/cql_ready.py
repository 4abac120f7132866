#!/usr/bin/env python3
"""Wait until a Cassandra node speaks CQL: a real native-protocol handshake, stdlib only.

Each attempt opens a TCP connection and sends OPTIONS (expects SUPPORTED), then STARTUP
(expects READY, or AUTHENTICATE when the node requires a password: it is up either way).
It asks for protocol v5 first and falls back to v4 when the node refuses v5.

Usage: cql_ready.py [--host 127.0.0.1] [--port 9042] [--timeout 180] [--once]
                    [--pid PID] [--log FILE] [--fail-pattern TEXT] [--quiet]

Exit codes: 0 ready; 1 timed out (or --once failed); 2 the --pid process is gone;
3 --fail-pattern appeared in --log.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

HEADER = struct.Struct(">BBhBi")  # version, flags, stream, opcode, body length
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE, OP_OPTIONS, OP_SUPPORTED = 0x00, 0x01, 0x02, 0x03, 0x05, 0x06
PROTOCOL_ERROR = 0x000A
MAX_BODY = 1 << 20


class HandshakeError(Exception):
    """The peer answered, but not like a ready CQL node."""


class UnsupportedVersionError(HandshakeError):
    """The node refused the protocol version we asked for."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("connection closed by peer")
        buf += chunk
    return bytes(buf)


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">H", len(raw)) + raw


def _read_string(body: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">H", body, pos)
    pos += 2
    return body[pos : pos + n].decode(errors="replace"), pos + n


def _parse_multimap(body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    (count,) = struct.unpack_from(">H", body, 0)
    pos = 2
    for _ in range(count):
        key, pos = _read_string(body, pos)
        (nvalues,) = struct.unpack_from(">H", body, pos)
        pos += 2
        values = []
        for _ in range(nvalues):
            value, pos = _read_string(body, pos)
            values.append(value)
        out[key] = values
    return out


def _request(sock: socket.socket, version: int, stream: int, opcode: int, body: bytes = b"") -> tuple[int, bytes]:
    sock.sendall(HEADER.pack(version, 0, stream, opcode, len(body)) + body)
    rversion, _flags, rstream, ropcode, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if not rversion & 0x80:
        raise HandshakeError(f"not a CQL response (first byte 0x{rversion:02x})")
    if not 0 <= length <= MAX_BODY:
        raise HandshakeError(f"bad body length {length}")
    rbody = _recv_exact(sock, length)
    if ropcode == OP_ERROR:
        code = struct.unpack_from(">i", rbody, 0)[0] if len(rbody) >= 4 else -1
        message = _read_string(rbody, 4)[0] if len(rbody) >= 6 else ""
        if code == PROTOCOL_ERROR and "version" in message.lower():
            raise UnsupportedVersionError(message)
        raise HandshakeError(f"ERROR 0x{code:04x}: {message}")
    if rstream != stream:
        raise HandshakeError(f"response on stream {rstream}, expected {stream}")
    return ropcode, rbody


def handshake(host: str, port: int, version: int, io_timeout: float) -> str:
    """One OPTIONS + STARTUP exchange; returns a one-line description of the node."""
    with socket.create_connection((host, port), timeout=io_timeout) as sock:
        sock.settimeout(io_timeout)
        opcode, body = _request(sock, version, 1, OP_OPTIONS)
        if opcode != OP_SUPPORTED:
            raise HandshakeError(f"OPTIONS answered with opcode 0x{opcode:02x}, expected SUPPORTED")
        supported = _parse_multimap(body)
        cql_version = (supported.get("CQL_VERSION") or ["3.0.0"])[0]
        startup = struct.pack(">H", 1) + _string("CQL_VERSION") + _string(cql_version)
        opcode, _ = _request(sock, version, 2, OP_STARTUP, startup)
        if opcode not in (OP_READY, OP_AUTHENTICATE):
            raise HandshakeError(f"STARTUP answered with opcode 0x{opcode:02x}, expected READY")
        state = "READY" if opcode == OP_READY else "AUTHENTICATE"
        protocols = ",".join(supported.get("PROTOCOL_VERSIONS", []))
        return f"protocol v{version} {state}, CQL {cql_version}, protocols [{protocols}]"


def probe(host: str, port: int, io_timeout: float) -> str:
    try:
        return handshake(host, port, 5, io_timeout)
    except UnsupportedVersionError:
        return handshake(host, port, 4, io_timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LogWatcher:
    """Scans only what was appended to a log file since the last call."""

    def __init__(self, path: str, pattern: str, offset: int = 0) -> None:
        self.path, self.pattern, self.offset, self.tail = path, pattern.encode(), offset, b""

    def seen(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return False
        self.offset += len(data)
        window = self.tail + data
        self.tail = window[-len(self.pattern) :]
        return self.pattern in window


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("host_pos", nargs="?", metavar="HOST")
    parser.add_argument("port_pos", nargs="?", type=int, metavar="PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9042)
    parser.add_argument("--timeout", type=float, default=180.0, help="overall seconds (default 180)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between attempts")
    parser.add_argument("--io-timeout", type=float, default=3.0, help="per-socket-operation seconds")
    parser.add_argument("--once", action="store_true", help="a single attempt, no retry")
    parser.add_argument("--pid", type=int, help="give up (exit 2) as soon as this process is gone")
    parser.add_argument("--log", help="log file to watch for --fail-pattern")
    parser.add_argument("--log-offset", type=int, default=0, help="scan --log from this byte on")
    parser.add_argument("--fail-pattern", default="Exception encountered during startup")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    host = args.host_pos or args.host
    port = args.port_pos or args.port

    watcher = LogWatcher(args.log, args.fail_pattern, args.log_offset) if args.log else None
    deadline = time.monotonic() + args.timeout
    last_error = "no attempt"
    while True:
        try:
            info = probe(host, port, args.io_timeout)
        except (OSError, HandshakeError, struct.error) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        else:
            if not args.quiet:
                print(f"CQL ready on {host}:{port} ({info})")
            return 0
        if args.once:
            break
        if watcher is not None and watcher.seen():
            print(f"'{args.fail_pattern}' in {args.log}", file=sys.stderr)
            return 3
        if args.pid is not None and not _pid_alive(args.pid):
            print(f"process {args.pid} exited before CQL came up on {host}:{port}", file=sys.stderr)
            return 2
        if time.monotonic() >= deadline:
            break
        time.sleep(args.interval)
    if not args.quiet:
        print(f"CQL not ready on {host}:{port} ({last_error})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
