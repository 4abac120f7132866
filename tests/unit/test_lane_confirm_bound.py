"""The add retry lane's publish waits for its confirm a bounded time (no servers).

The lane shares the confirmed results channel on the main connection. With that connection gone
stuck (a black hole: no frame back, no close) while the adds connection kept delivering, every
add moved to the lane waited for a confirm that never came, its slot of the adds window held,
until aiormq gave the connection up (three heartbeats: about three minutes at 60 s): a broken
owner's flood stalled every owner's adds. Found by a review.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from bridge.transport import add_retry
from tests.unit.test_fuzz import REPLY_TO, _Message, _transport
from tests.unit.test_stray_cancellation import ADD, _run

pytestmark = pytest.mark.anyio


class _Unconfirmed:
    """The results channel's default exchange on a stuck connection: a publish never confirmed."""

    def __init__(self) -> None:
        self.never = asyncio.Event()
        self.published = 0

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        self.published += 1
        await self.never.wait()


async def test_a_lane_publish_never_confirmed_gives_up_within_its_bound_and_the_add_is_retried_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # raising=False: on a lane without the bound the add waits for ever (the test's own limit ends it)
    monkeypatch.setattr(add_retry, "LANE_CONFIRM_TIMEOUT_S", 0.2, raising=False)
    transport, _ = _transport()
    handlers = transport.handlers
    exchange = _Unconfirmed()
    handlers.lane.attach(cast(Any, exchange))
    handlers.lane.in_place_limit = 0  # the owner holds its share of the window: its add goes to the lane
    failures: list[BaseException] = []
    handlers.lane.on_failure = failures.append
    message = _Message(ADD, "add", {}, "engine", REPLY_TO)
    started = time.monotonic()
    await _run(handlers.add, message)
    assert time.monotonic() - started < 2, "the add waited past the lane's bound"
    assert exchange.published == 1
    assert message.settled == ["ack"], "the lane did not take it: retried in place (here stored) as before"
    assert [type(exc) for exc in failures] == [TimeoutError], "the channel's renewal is told of the failure"


async def test_the_lane_bound_is_what_the_results_channel_allows() -> None:
    from bridge.transport.results import CONFIRM_TIMEOUT_S

    # An add holds its slot of the adds window while it waits: no longer than a result would.
    assert 0 < add_retry.LANE_CONFIRM_TIMEOUT_S <= CONFIRM_TIMEOUT_S


async def test_an_add_whose_lane_copy_may_exist_claims_its_key_with_the_lwt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review of the bound above: the copy left for the lane but its confirm came after
    the bound, so the original was retried in place, and its first write recorded its key
    unguarded (a first delivery's). The copy, back from the lane, stored first with the LWT; the
    original's plain record overwrote it and stored a second task. After a failed lane publish,
    the original's write claims the key with the LWT, as a retry's does."""
    from tests.unit.test_stray_cancellation import KeyUnusableOnce

    monkeypatch.setattr(add_retry, "LANE_CONFIRM_TIMEOUT_S", 0.1)
    transport, _ = _transport()
    h = transport.handlers
    h._consuming = lambda: True
    queue = KeyUnusableOnce(h.queue)
    h.queue = cast(Any, queue)
    copies: list[Any] = []

    class _ConfirmLate:
        async def publish(self, copy: Any, **kwargs: Any) -> None:
            copies.append(copy)  # the broker took the copy; its confirm comes after the bound
            await asyncio.Event().wait()

    h.lane.attach(cast(Any, _ConfirmLate()))
    h.lane.in_place_limit = 0  # the owner's share of in-place retries is used: the lane first
    add = _Message(ADD, "add", {"x-idempotency-key": ""}, "engine", REPLY_TO)
    add.message_id = "m-1"
    await _run(h.add, add)
    # The key travels in the copy's header; its message id is the bridge's own (add_retry._copy_id).
    assert copies and copies[0].headers["x-idempotency-key"] == "m-1" and copies[0].message_id != "m-1"
    assert queue.writes and all(w["first_copy"] is False for w in queue.writes), queue.writes
    assert add.settled == ["ack"]
