"""Review 11: ``Expect`` on paths no route matches (404) or on a wrong method (405), against a
stand-in queue over a raw socket.

aiohttp answers ``Expect`` before any middleware, with the matched route's expect handler; an
unmatched request had aiohttp's default one: a client with no key announcing a gigabyte was told
``100 Continue`` (to upload it) before it was authenticated, and any other expectation got a
plain-text 417 the contract does not know. Every path answers it as the matched routes do now.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.unit.test_gateway import _standin_server

pytestmark = pytest.mark.anyio


async def _exchange(port: int, head: str, body: bytes = b"") -> tuple[bytes, bytes]:
    """``head`` sent alone; the first status line back, then (after ``body`` is sent, if any)
    everything else until the server closes or 10 s pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.readline(), 10)
        if body:
            writer.write(body)
            await writer.drain()
        rest = b""
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in rest or not rest.rstrip().endswith(b"}"):
                chunk = await reader.read(4096)
                if not chunk:
                    break
                rest += chunk
        return first, rest
    finally:
        writer.close()


async def test_expect_on_an_unmatched_path_is_answered_as_on_the_matched_ones(tmp_path: Path) -> None:
    server, _queue, base, keys, _observed = await _standin_server(tmp_path)
    port = int(base.rsplit(":", 1)[1])
    auth = f"Authorization: Bearer {keys['w']}\r\n"
    try:
        for method, path, status in (
            ("POST", "/no/such/path", b"404"),
            ("POST", "/api/queue/s/nothing", b"404"),
            ("GET", "/api/queue/s/fetch", b"405"),  # POST only
            ("PUT", "/api/queue/stats", b"405"),  # GET only
        ):
            base_head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            # No key, a gigabyte announced: refused at once, never asked for.
            first, rest = await _exchange(
                port, base_head + "Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
            )
            assert first.startswith(b"HTTP/1.1 401"), (method, path, first)
            assert b'"unauthorized"' in rest, (method, path, rest)
            # Any other expectation: the contract's JSON 417, not aiohttp's plain text.
            first, rest = await _exchange(port, base_head + auth + "Content-Length: 2\r\nExpect: something\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 417"), (method, path, first)
            assert b"application/json" in rest and b'"bad_request"' in rest, (method, path, rest)
            # A good key and size: told to go on, then answered the route's error as JSON.
            first, rest = await _exchange(
                port, base_head + auth + "Content-Length: 2\r\nExpect: 100-continue\r\n\r\n", b"{}"
            )
            assert first.startswith(b"HTTP/1.1 100"), (method, path, first)
            assert rest.split(b"\r\n", 2)[1].startswith(b"HTTP/1.1 " + status), (method, path, rest)
            reply = json.loads(rest.split(b"\r\n\r\n", 2)[-1])
            assert reply["error"]["code"] == "bad_request", (method, path, reply)
            if status == b"405":
                assert b"Allow: " in rest, (method, path, rest)
    finally:
        await server.stop()
