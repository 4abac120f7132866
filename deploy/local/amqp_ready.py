#!/usr/bin/env python3
"""Wait until an AMQP 0-9-1 broker answers the protocol header, stdlib only.

Each attempt sends b"AMQP\\x00\\x00\\x09\\x01" and expects a Connection.Start method frame
(class 10, method 10, version 0-9) back, then closes the socket.

Usage: amqp_ready.py [--host 127.0.0.1] [--port 5672] [--timeout 120] [--once] [--quiet]

Exit codes: 0 ready; 1 timed out (or --once failed).
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_END = 1, 0xCE
MAX_FRAME = 1 << 20


class HandshakeError(Exception):
    """The peer answered, but not with Connection.Start."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("connection closed by peer")
        buf += chunk
    return bytes(buf)


def _server_properties(payload: bytes) -> dict[str, str]:
    """Pick the string fields (product, version, ...) out of Connection.Start's server-properties."""
    props: dict[str, str] = {}
    (table_len,) = struct.unpack_from(">I", payload, 6)
    pos, end = 10, 10 + table_len
    while pos < end:
        key_len = payload[pos]
        key = payload[pos + 1 : pos + 1 + key_len].decode(errors="replace")
        pos += 1 + key_len
        kind = chr(payload[pos])
        pos += 1
        if kind == "S":
            (n,) = struct.unpack_from(">I", payload, pos)
            props[key] = payload[pos + 4 : pos + 4 + n].decode(errors="replace")
            pos += 4 + n
        elif kind == "F":  # nested table (capabilities): skip it
            (n,) = struct.unpack_from(">I", payload, pos)
            pos += 4 + n
        elif kind == "t":
            pos += 1
        else:  # a type we do not need: stop, the frame itself was already validated
            break
    return props


def handshake(host: str, port: int, io_timeout: float) -> str:
    with socket.create_connection((host, port), timeout=io_timeout) as sock:
        sock.settimeout(io_timeout)
        sock.sendall(PROTOCOL_HEADER)
        header = _recv_exact(sock, 7)
        if header.startswith(b"AMQP"):
            raise HandshakeError(f"broker refused protocol 0-9-1, offers {header + _recv_exact(sock, 1)!r}")
        frame_type, channel, size = struct.unpack(">BHI", header)
        if frame_type != FRAME_METHOD or channel != 0 or not 10 <= size <= MAX_FRAME:
            raise HandshakeError(f"unexpected frame: type {frame_type}, channel {channel}, size {size}")
        payload = _recv_exact(sock, size)
        if _recv_exact(sock, 1)[0] != FRAME_END:
            raise HandshakeError("missing frame-end octet")
        class_id, method_id, major, minor = struct.unpack_from(">HHBB", payload, 0)
        if (class_id, method_id) != (10, 10):
            raise HandshakeError(f"expected Connection.Start (10,10), got ({class_id},{method_id})")
        try:
            props = _server_properties(payload)
        except (struct.error, IndexError):
            props = {}
        product = f"{props.get('product', '?')} {props.get('version', '?')}"
        return f"Connection.Start, AMQP {major}-{minor}, {product}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("host_pos", nargs="?", metavar="HOST")
    parser.add_argument("port_pos", nargs="?", type=int, metavar="PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--timeout", type=float, default=120.0, help="overall seconds (default 120)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between attempts")
    parser.add_argument("--io-timeout", type=float, default=3.0, help="per-socket-operation seconds")
    parser.add_argument("--once", action="store_true", help="a single attempt, no retry")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    host = args.host_pos or args.host
    port = args.port_pos or args.port

    deadline = time.monotonic() + args.timeout
    last_error = "no attempt"
    while True:
        try:
            info = handshake(host, port, args.io_timeout)
        except (OSError, HandshakeError, struct.error) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        else:
            if not args.quiet:
                print(f"AMQP ready on {host}:{port} ({info})")
            return 0
        if args.once or time.monotonic() >= deadline:
            break
        time.sleep(args.interval)
    if not args.quiet:
        print(f"AMQP not ready on {host}:{port} ({last_error})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
