"""A long-poll whose client hangs up while a broker call of its hint queue is under way (real
RabbitMQ, real aiormq channels).

The HTTP gateway's hang-up (``Requester.hang_up``) cut the fetch's wait by cancelling the whole
``AmqpHints.take``, a broker call in the middle of it included, and aiormq closes a channel whose
RPC is cancelled: a hang-up during a hint consumer's start closed the channel carrying every hint
consumer of the bridge (each waiting fetch of every queue answered null at the reopen), and one
during a ``basic.get`` closed the publish-and-get channel (every hint other fetches held went back
to its queue, their claims still under way). Found by review. A hang-up now only stops the wait:
the call runs to its end (bounded by ``BROKER_CALL_S``) and what it got goes back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from pamqp.commands import Basic

from bridge.domain.fetching import RequestAbandoned, Requester
from bridge.domain.models import AddCommand, FetchRequest
from bridge.domain.records import QueueKey
from bridge.transport.hints import BROKER_CALL_S, hint_queue_name
from tests.conftest import OWNERS, consumers_on, messages_ready, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]
# How long a cancellation is given to reach a held broker call: it does in a few turns of the
# loop when anything cancels it. Only a check that nothing does, well within BROKER_CALL_S (past
# it the call's own timeout cancels it, and closes its channel, whatever the fetch did).
CUT_WITHIN_S = 0.5
assert CUT_WITHIN_S < BROKER_CALL_S / 2


def _req(svc: str, worker: str, **kw: Any) -> FetchRequest:
    return FetchRequest.model_validate({"serviceId": svc, "workerId": worker, **kw})


def _hint_queue(bridge: Any, svc: str) -> str:
    return hint_queue_name(bridge.settings.queue_prefix, QueueKey(OWNER, svc))


class HeldReply:
    """The broker's answer to one RPC of a real aiormq channel, held back until ``release``: the
    call is on the wire, its reply due, for as long as the test wants. ``cut``: the call was
    cancelled meanwhile (aiormq then closes the channel)."""

    def __init__(self, channel: Any, wanted: Callable[[Any], bool], monkeypatch: pytest.MonkeyPatch) -> None:
        self.channel = channel
        self.armed = True  # the next wanted frame's reply is held
        self.sent = asyncio.Event()
        self.release = asyncio.Event()
        self.cut = False
        real_rpc, real_get = channel.rpc, channel.rpc_frames.get
        holding = False

        async def rpc(frame: Any, timeout: Any = None) -> Any:
            nonlocal holding
            if self.armed and wanted(frame):
                self.armed, holding = False, True
            return await real_rpc(frame, timeout=timeout)

        async def get() -> Any:
            # The channel's calls take turns (its lock): the first reply awaited after the wanted
            # frame was sent is its own.
            nonlocal holding
            if holding:
                holding = False
                self.sent.set()
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    self.cut = True
                    raise
            return await real_get()

        monkeypatch.setattr(channel, "rpc", rpc)
        monkeypatch.setattr(channel.rpc_frames, "get", get)


def takes_of(bridge: Any, monkeypatch: pytest.MonkeyPatch, svc: str) -> list[asyncio.Task[Any]]:
    """The tasks of the waiting takes of ``svc``'s hints (those a hang-up cuts)."""
    real = bridge.hints.take
    tasks: list[asyncio.Task[Any]] = []

    async def take(q: QueueKey, wait_ms: int) -> Any:
        if q.service == svc and wait_ms > 0:
            task = asyncio.current_task()
            assert task is not None
            tasks.append(task)
        return await real(q, wait_ms)

    monkeypatch.setattr(bridge.hints, "take", take)
    return tasks


async def hang_up_while_held(requester: Requester, held: HeldReply, takes: list[asyncio.Task[Any]]) -> None:
    """Hang up while ``held`` is on the wire; fail if the hang-up cancelled it; then let it end."""
    await wait_for(held.sent.is_set, 10.0, what="the broker call on its way")
    requester.hang_up()
    await wait_for(lambda: any(t.cancelling() for t in takes), 5.0, what="the hang-up cutting the wait")
    assert not await comes_true(lambda: held.cut, CUT_WITHIN_S), "the hang-up cancelled the broker call"
    assert not held.channel.is_closed
    held.release.set()


async def comes_true(condition: Callable[[], bool], within_s: float) -> bool:
    try:
        await wait_for(condition, within_s, interval=0.01)
    except AssertionError:
        return False
    return True


async def test_a_hang_up_while_a_hint_consumer_starts_leaves_the_other_queues_waiters_served(
    make_bridge, servers, monkeypatch
):
    """Interleaving A: fetch y is its queue's first waiter on the bridge, and its client hangs up
    while its hint consumer's basic.consume is on its way. The consumer of x's queue, on the same
    channel, went with the channel that cancellation closed: x was answered null at the reopen
    (or sat out its waitMs), and a hint of x's queue published by another bridge reached nobody."""
    bridge, other = await make_bridge(), await make_bridge()
    svc_x, svc_y = service_id(), service_id()
    name_x, name_y = _hint_queue(bridge, svc_x), _hint_queue(bridge, svc_y)
    url = servers.amqp_url("guest")
    x = asyncio.create_task(bridge.queue.fetch(OWNER, _req(svc_x, "x", waitMs=25_000)))

    def x_consuming() -> bool:
        waiting = bridge.hints._waiting.get(name_x)
        return waiting is not None and waiting.consumer_tag not in (None, "starting")

    await wait_for(x_consuming, 10.0, what="x waiting, its queue's hint consumer started")
    consume = await bridge.hints._consume.get_underlay_channel()
    held = HeldReply(consume, lambda f: isinstance(f, Basic.Consume) and f.queue == name_y, monkeypatch)
    takes = takes_of(bridge, monkeypatch, svc_y)
    await _hung_up_fetch(bridge, svc_y, held, takes)
    assert not consume.is_closed, "the hint consumers' channel was closed"
    assert await bridge.hints._consume.get_underlay_channel() is consume

    async def no_consumer_of_y() -> bool:
        return await consumers_on(url, name_y) == 0

    # The consumer started for y, who left, is cancelled as any consumer nobody waits on.
    await wait_for(no_consumer_of_y, 10.0, interval=0.1, what="y's hint consumer cancelled")
    assert await consumers_on(url, name_x) == 1, "x's hint consumer is gone"
    assert not x.done(), f"x was answered before any task came: {x.result() if x.done() else None}"
    # Added on another bridge (no waiter there): its hint goes through the broker, to x's consumer.
    cmd = AddCommand.model_validate({"serviceId": svc_x, "value": {"n": 1}})
    task_id = await other.queue.add(OWNER, cmd, message_id=None, traceparent=None)
    got = await asyncio.wait_for(x, 10.0)
    assert got is not None and got.task_id == task_id


async def test_a_hang_up_during_a_hint_get_leaves_the_hints_other_fetches_hold(bridge, servers, monkeypatch):
    """Interleaving B: the hang-up lands during a round's basic.get. The cancellation closed the
    publish-and-get channel: the hint another fetch held (taken, its claim under way) went back to
    its queue for a second claim, and that fetch's ack was lost. And the hint the get took as the
    wait was cut goes back to its queue at once, for the next fetch."""
    svc_z, svc_y = service_id(), service_id()
    name_z, name_y = _hint_queue(bridge, svc_z), _hint_queue(bridge, svc_y)
    url = servers.amqp_url("guest")
    await bridge.queue.add(
        OWNER, AddCommand.model_validate({"serviceId": svc_z, "value": 1}), message_id=None, traceparent=None
    )
    holding = await bridge.hints.take(QueueKey(OWNER, svc_z), 0)  # another fetch's, its claim under way
    assert holding is not None
    frames = await bridge.hints._channel_frames()
    held = HeldReply(frames, lambda f: isinstance(f, Basic.Get) and f.queue == name_y, monkeypatch)
    held.armed = False
    real_take = bridge.hints.take
    added: list[str] = []

    async def take(q: QueueKey, wait_ms: int) -> Any:
        if q.service == svc_y and wait_ms > 0 and not added:
            # The wait's first get finds the hint of a task added a moment before, as the client
            # hangs up: held on the wire, it comes after the hang-up.
            cmd = AddCommand.model_validate({"serviceId": svc_y, "value": 2})
            added.append(await bridge.queue.add(OWNER, cmd, message_id=None, traceparent=None))
            held.armed = True
        return await real_take(q, wait_ms)

    monkeypatch.setattr(bridge.hints, "take", take)
    takes = takes_of(bridge, monkeypatch, svc_y)
    await _hung_up_fetch(bridge, svc_y, held, takes)
    assert not frames.is_closed, "the publish-and-get channel was closed"
    assert await bridge.hints._channel_frames() is frames
    await holding.done()  # its claim decided: acknowledged on the channel it was taken on
    assert await messages_ready(url, name_z) == 0, "the hint another fetch held went back to its queue"

    async def given_back() -> bool:
        return await messages_ready(url, name_y) == 1

    await wait_for(given_back, 10.0, interval=0.1, what="the hint got after the hang-up back in its queue")
    got = await bridge.queue.fetch(OWNER, _req(svc_y, "w2"))
    assert got is not None and got.task_id == added[0]


async def _hung_up_fetch(bridge: Any, svc: str, held: Any, takes: Any) -> None:
    """A long-poll of ``svc`` whose client hangs up while ``held`` holds its broker call's reply:
    abandoned (``RequestAbandoned``), once the call has ended."""
    requester = Requester(lambda: True)
    fetch = asyncio.create_task(bridge.queue.fetch(OWNER, _req(svc, "y", waitMs=25_000), still_wanted=requester))
    await hang_up_while_held(requester, held, takes)
    with pytest.raises(RequestAbandoned):
        await asyncio.wait_for(fetch, 10.0)
