"""A waiting fetch cut short by its caller's hang-up (``bridge.domain.fetching._unless_gone``)
waits for the cut wait's end (a broker call in it runs to its end, up to 3 s): a cancellation of
its own meanwhile (a stop's) is not swallowed."""

from __future__ import annotations

import asyncio

import pytest

from bridge.domain.fetching import RequestAbandoned, Requester, _unless_gone

pytestmark = pytest.mark.anyio


async def _slow_to_cut(release: asyncio.Event) -> str:
    """A wait that, cancelled, ends only once released (as ``hints._to_its_end`` does)."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await release.wait()
        raise
    return "never"


async def test_a_hang_up_abandons_the_wait() -> None:
    release = asyncio.Event()
    requester = Requester(lambda: True)
    fetch = asyncio.create_task(_unless_gone(_slow_to_cut(release), requester))
    await asyncio.sleep(0)
    requester.hang_up()
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(RequestAbandoned):
        await asyncio.wait_for(fetch, 2)


async def test_a_stop_while_the_cut_wait_ends_cancels_the_fetch() -> None:
    """Before: the stop's cancel was swallowed with the cut wait's, and the fetch went on (to
    clear the worker's pointer in a store being closed), answered as abandoned (found by the
    re-review, 2026-12-07)."""
    release = asyncio.Event()
    requester = Requester(lambda: True)
    fetch = asyncio.create_task(_unless_gone(_slow_to_cut(release), requester))
    await asyncio.sleep(0)
    requester.hang_up()
    await asyncio.sleep(0.01)  # now waiting for the cut wait's end
    fetch.cancel()  # the stop
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(fetch, 2)
    assert fetch.cancelled()
