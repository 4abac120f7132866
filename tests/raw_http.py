"""HTTP requests written byte by byte on connections of their own (tests of hang-ups, slow and
half-sent requests): what aiohttp's client would not send, or would not leave open."""

from __future__ import annotations

import asyncio


def post(path: str, key: str, body: bytes | None = None) -> bytes:
    """A JSON POST with bearer ``key``: the request line and headers only (``body`` None: the
    caller writes the rest), or the whole request with its Content-Length and ``body``."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
    )
    if body is None:
        return head.encode()
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def send(port: int, data: bytes) -> asyncio.StreamWriter:
    """``data`` written on a connection of its own to 127.0.0.1:``port``, left open for the caller
    (to hang up, or to finish the request)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return writer
