"""Hints on the wire (``bridge.transport.hints``): what a bridge publishes, another decodes."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.crypto import Sealed
from bridge.domain.hints import CARRIED_PAYLOAD_MAX, Hint, carried
from bridge.domain.records import Payload
from bridge.transport.hints import decode, encode

sealed = st.builds(
    Sealed, st.text(min_size=1, max_size=20), st.binary(min_size=12, max_size=12), st.binary(max_size=64)
)
payloads = st.builds(
    Payload,
    sealed,
    st.none() | sealed,
    st.none() | st.text(max_size=60),
    st.none() | st.integers(min_value=0, max_value=2**53),
)


@given(
    payload=st.none() | payloads,
    recovered=st.booleans(),
    epoch=st.integers(0, 2**31 - 2),
    has_token=st.booleans(),
)
def test_a_hint_survives_the_wire(payload: Payload | None, recovered: bool, epoch: int, has_token: bool) -> None:
    """A re-exposed task's hint (lane 0) names the epoch of its expired lease, a fresh one's none."""
    lane, named = (0, epoch) if recovered else (1, None)
    hint = Hint(uuid.uuid1(), lane, uuid.uuid1(), named, has_token, payload)
    assert decode(encode(hint)) == hint


def test_only_small_payloads_without_a_token_ride_on_hints() -> None:
    small = Payload(Sealed("k1", b"n" * 12, b"c" * 100), None, None, 1)
    large = Payload(Sealed("k1", b"n" * 12, b"c" * (CARRIED_PAYLOAD_MAX + 1)), None, None, 1)
    assert carried(small) is small
    assert carried(large) is None
    with_token = Payload(Sealed("k1", b"n" * 12, b"c" * 100), Sealed("k1", b"n" * 12, b"t" * 10), None, 1)
    assert carried(with_token) is None, "tasks with a token are read (and verified) from the store"


@pytest.mark.parametrize("body", [b'{"t": "x"}', b'{"t": "00000000-0000-0000-0000-000000000000", "l": 1}'])
def test_malformed_hints_raise_what_the_consumer_catches(body: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode(body)


def _hint_with(lane: int, epoch: str) -> bytes:
    t = "00000000-0000-1000-8000-000000000000"
    return f'{{"t": "{t}", "l": {lane}, "s": "{t}", "e": {epoch}, "k": 0}}'.encode()


@pytest.mark.parametrize(
    "body",
    [
        b"[1]",
        b'"x"',
        b"1",
        b"null",
        b'{"p": 2}',
        b'{"p": [1]}',
        b'{"t": 1, "l": 1, "s": "00000000-0000-1000-8000-000000000000", "e": null, "k": 0}',
        b'{"t": "00000000-0000-1000-8000-000000000000", "l": 1, "s": [1], "e": null, "k": 0}',
        # An epoch of another type (a string, a fraction, past Cassandra's int) parsed, and the
        # claim failed on it: the hint went back, at the top of its queue, for every fetch.
        _hint_with(0, '"3"'),
        _hint_with(0, "1.5"),
        _hint_with(0, "4294967296"),
        _hint_with(7, "null"),
        _hint_with(0, "null"),
        _hint_with(1, "2"),
    ],
)
def test_json_that_is_no_hint_is_a_value_error(body: bytes) -> None:
    """What the "malformed hint dropped" guards catch (an AttributeError went past them)."""
    with pytest.raises(ValueError, match="hint"):
        decode(body)


@pytest.mark.anyio
@pytest.mark.parametrize("local", [True, False])
async def test_a_hint_published_again_keeps_its_tasks_life(local: bool) -> None:
    """A hint handed back (its waiting fetch cancelled, its worker gone) was published again with
    no expiration: in a queue nobody fetched from it outlived its task for ever (found by the
    session's re-review, 2026-12-06). Published again, it expires with its task, as at first."""
    from types import SimpleNamespace

    from bridge.config import Settings
    from bridge.domain.records import LANE_FRESH
    from bridge.domain.timeline import new_task_id
    from bridge.transport.hints import AmqpHints, LocalHint

    now = 1_800_000_000_000
    hints = AmqpHints(Settings(keyring=None, task_ttl=3600), now_ms=lambda: now)
    published: list[str | None] = []

    async def publish(body: bytes, priority: int | None, queue_name: str, *, expiration: str | None = None) -> None:
        published.append(expiration)

    hints._publish = publish  # type: ignore[method-assign]
    task_id = new_task_id(now - 600_000)  # added ten minutes ago: 50 minutes of its hour left
    hint = Hint(task_id, LANE_FRESH, task_id, None, False)
    message = LocalHint(hint, "q", 0) if local else SimpleNamespace(body=encode(hint), priority=0, routing_key="q")
    await hints.republish(message)  # type: ignore[arg-type]
    [expiration] = published
    assert expiration is not None and 3_000_000 <= int(expiration) <= 3_010_000, expiration
