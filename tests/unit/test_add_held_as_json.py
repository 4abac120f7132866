"""An add held through its retries keeps its value as JSON bytes, not as the parsed tree
(``bridge.transport.handlers._as_json``); the add itself runs against the real servers in
tests/integration (test_add_edges.py, test_queue_semantics.py)."""

from __future__ import annotations

import json
import os
from typing import Any

from bridge.config import load_settings
from bridge.domain import jsonvalue
from bridge.domain.models import AddCommand, parse
from bridge.transport.handlers import _as_json

HELD = 10  # adds held at once


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _growth(make: Any) -> tuple[int, list[Any]]:
    """The resident memory ``HELD`` results of ``make`` take (measured by the kernel: tracemalloc
    counts orjson's output buffer at its largest, not as it is kept)."""
    before = _rss()
    held = [make() for _ in range(HELD)]
    return _rss() - before, held


def test_a_held_add_costs_its_json_not_its_tree() -> None:
    """A 1 MiB value of small JSON objects is some 24 MiB of Python objects, held through the
    add's retries (30 s in a Cassandra brownout, a window of 64 at once: 1.5 GiB for one tenant's
    adds, past a sidecar's 1 GiB; found by review, 2026-12-07)."""
    settings = load_settings(_env_file=None)
    body = json.dumps({"serviceId": "s", "value": [{} for _ in range(300_000)], "token": {"wf": 1}}).encode()
    compact, kept = _growth(lambda: _as_json(parse(AddCommand, jsonvalue.loads(body)), settings))
    tree, trees = _growth(lambda: parse(AddCommand, jsonvalue.loads(body)))
    assert compact < HELD * 3 * len(body), f"{HELD} adds held as {compact >> 20} MiB for bodies of {len(body)} bytes"
    assert tree > 5 * compact, (tree >> 20, compact >> 20)  # what they were held as
    assert jsonvalue.dumps(kept[0].value) == jsonvalue.dumps(trees[0].value)
    assert jsonvalue.dumps(kept[0].token) == b'{"wf":1}'
