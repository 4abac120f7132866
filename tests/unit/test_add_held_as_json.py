"""An add held through its retries keeps its value as JSON bytes, not as the parsed tree
(``bridge.transport.handlers._as_json``); the add itself runs against the real servers in
tests/integration (test_add_edges.py, test_queue_semantics.py)."""

from __future__ import annotations

import json
import os
from typing import Any

from bridge.config import load_settings
from bridge.domain import jsonvalue
from bridge.domain.models import AckWithNextRequest, AddCommand, FailRequest, parse
from bridge.transport.handlers import _as_json
from bridge.transport.wire import outcome_as_json

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


def test_a_held_ack_or_fail_costs_its_json_not_its_tree() -> None:
    """An ack is held through its reads, its compare-and-set and a retry, 64 at once: a result
    of 1 MiB of small objects was held as some 24 MiB of Python objects (1.5 GiB for a window of
    them; found by review, 2026-12-07). So was a fail's error."""
    settings = load_settings(_env_file=None)
    big = [{} for _ in range(300_000)]
    named = {"serviceId": "s", "workerId": "w", "taskId": "9f0c2d9e-8a3b-11ef-8000-000000000001", "epoch": 1}
    for model, fields in (
        (AckWithNextRequest, {"result": big}),
        (AckWithNextRequest, {"error": big}),
        (FailRequest, {"error": big}),
    ):
        body = json.dumps({**named, **fields}).encode()
        compact, kept = _growth(lambda: outcome_as_json(parse(model, jsonvalue.loads(body)), settings.max_value_bytes))  # noqa: B023
        tree, trees = _growth(lambda: parse(model, jsonvalue.loads(body)))  # noqa: B023
        assert compact < HELD * 3 * len(body), (model.__name__, fields.keys(), compact >> 20)
        assert tree > 5 * compact, (tree >> 20, compact >> 20)
        (name,) = fields
        assert jsonvalue.dumps(getattr(kept[0], name)) == jsonvalue.dumps(getattr(trees[0], name))
        if model is AckWithNextRequest:  # what goes to the engine is the same
            assert jsonvalue.dumps(kept[0].outcome) == jsonvalue.dumps(trees[0].outcome)


def test_an_ack_without_an_error_keeps_its_result_as_the_outcome() -> None:
    settings = load_settings(_env_file=None)
    named = {"serviceId": "s", "workerId": "w"}
    for sent, outcome in (
        ({"result": 0}, b'{"result":0}'),
        ({}, b'{"result":null}'),
        ({"error": None, "result": ""}, b'{"result":""}'),
    ):
        req = outcome_as_json(parse(AckWithNextRequest, {**named, **sent}), settings.max_value_bytes)
        assert jsonvalue.dumps(req.outcome) == outcome, sent


def test_an_ack_with_an_error_is_not_refused_for_its_result() -> None:
    """The error is the outcome (``AckRequest.outcome``): its result is dropped, not written again
    and measured, or a result grown past the limit refused the ack (found by the re-review)."""
    settings = load_settings(_env_file=None, max_value_bytes=1_000)
    body = '{"serviceId": "s", "workerId": "w", "error": "boom", "result": [' + ",".join(["1e15"] * 100) + "]}"
    req = outcome_as_json(parse(AckWithNextRequest, jsonvalue.loads(body.encode())), settings.max_value_bytes)
    assert jsonvalue.dumps(req.outcome) == b'{"error":"boom"}'


def test_a_small_ack_keeps_its_tree() -> None:
    """Converting costs an ack about half its parse again: only a body past 16 KiB is converted
    (a smaller one's tree is at most some 400 KiB)."""
    from bridge.transport.wire import TREE_KEPT_MAX_BYTES

    named = {"serviceId": "s", "workerId": "w", "result": {"n": [1, 2, 3]}}
    req = parse(AckWithNextRequest, named)
    assert outcome_as_json(req, 1 << 20, body_bytes=TREE_KEPT_MAX_BYTES) is req
    held = outcome_as_json(req, 1 << 20, body_bytes=TREE_KEPT_MAX_BYTES + 1)
    assert isinstance(held.result, type(jsonvalue.fragment(b"1")))
    assert jsonvalue.dumps(held.outcome) == jsonvalue.dumps(req.outcome) == b'{"result":{"n":[1,2,3]}}'
