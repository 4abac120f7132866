"""Review 11: what a held gateway request keeps in memory (pure logic, a stand-in queue).

The request models ignore unknown fields, so a fetch body could be padded up to the body limit with
``"x": [{}, {}, ...]``: about 24 bytes of Python objects per byte sent. The gateway kept that
parsed body alive for the whole request, through a 30 s long-poll, and one key may hold 256 of
them: gigabytes held, the sidecar OOM-killed for every tenant. It is dropped once the model is built.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

import pytest

from tests.unit.test_gateway import _post, _standin_server

pytestmark = pytest.mark.anyio

HELD = 8


def _padded_fetch(limit: int) -> bytes:
    head, tail = b'{"workerId": "w", "waitMs": 20000, "x": [', b"{}]}"
    n = (limit - len(head) - len(tail) - 64) // 3
    body = head + b"{}," * n + tail
    assert len(body) <= limit
    return body


async def test_a_held_long_poll_does_not_keep_its_parsed_body(tmp_path: Path) -> None:
    server, queue, base, keys, _observed = await _standin_server(tmp_path)
    body = _padded_fetch(server.limit)
    queue.hold = asyncio.Event()
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        polls = [asyncio.create_task(_post(base, "/api/queue/s/fetch", keys["w"], body)) for _ in range(HELD)]
        for _ in range(1000):  # all of them in the stand-in's fetch (a condition, bounded)
            if queue.held == HELD:
                break
            await asyncio.sleep(0.01)
        assert queue.held == HELD
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        queue.hold.set()
        assert [r[0] for r in await asyncio.gather(*polls)] == [200] * HELD
    finally:
        tracemalloc.stop()
        queue.hold.set()
        await server.stop()
    # The parsed padding alone is ~24x the bytes sent (~1.6 MB a request here); what is left
    # (the requests, their connections, the client's side) is a small fraction of it.
    parsed_one = 24 * len(body)
    assert grown < 2 * parsed_one, f"{HELD} held long-polls grew memory by {grown / 1e6:.1f} MB"
